"""The total-recall experiment: teach four facts, wipe the context, answer from memory; unrelated prompts unchanged.

Shared by ``scripts/total_recall.py``, the acceptance test and ``notebooks/total_recall.ipynb``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

FACTS = [
    "The secret project code is Omega-99.",
    "The CEO's favorite fruit is a apple.",
    "My shopping list is eggs, milk, bread",
    "The meeting is at 4:32 PM exactly.",
]
# (prompt, the taught answer its completion must contain)
QUESTIONS = [
    ("The secret project code is", "Omega-99"),
    ("The CEO's favorite fruit is", "apple"),
    ("My shopping list is", "eggs, milk, bread"),
    ("The meeting is at", "4:32 PM"),
]
UNRELATED = ["The capital of France is", "The largest planet in the solar system is",
             "Water boils at a temperature of"]


@dataclass
class TotalRecallResult:
    teach_seconds: float
    recalled: dict[str, bool] = field(default_factory=dict)
    answers: dict[str, str] = field(default_factory=dict)
    bare_answers: dict[str, str] = field(default_factory=dict)
    unchanged: dict[str, bool] = field(default_factory=dict)
    report: object = None

    @property
    def passed(self) -> bool:
        return all(self.recalled.values()) and all(self.unchanged.values())

    def __str__(self) -> str:
        lines = [f"teach: {self.teach_seconds:.1f} s"]
        for prompt, ok in self.recalled.items():
            lines.append(f"  [{'recalled' if ok else 'MISSED  '}] {prompt!r} -> {self.answers[prompt]!r}")
        for prompt, ok in self.unchanged.items():
            lines.append(f"  [{'as bare ' if ok else 'CHANGED '}] {prompt!r} -> {self.answers[prompt]!r}")
        lines.append(f"recall {sum(self.recalled.values())}/{len(self.recalled)}, "
                     f"locality {sum(self.unchanged.values())}/{len(self.unchanged)}")
        return "\n".join(lines)


def run_total_recall(engine, max_new_tokens: int = 16) -> TotalRecallResult:
    """Teach :data:`FACTS` into ``engine`` and check recall and locality with greedy decoding."""
    prompts = [q for q, _ in QUESTIONS] + UNRELATED
    bare = {p: engine.generate(p, max_new_tokens=max_new_tokens, use_memory=False) for p in prompts}
    start = time.perf_counter()
    report = engine.teach(FACTS)
    result = TotalRecallResult(teach_seconds=time.perf_counter() - start, bare_answers=bare, report=report)
    for prompt in prompts:
        result.answers[prompt] = engine.generate(prompt, max_new_tokens=max_new_tokens)
    for prompt, answer in QUESTIONS:
        result.recalled[prompt] = answer in result.answers[prompt]
    for prompt in UNRELATED:
        result.unchanged[prompt] = result.answers[prompt] == bare[prompt]
    return result
