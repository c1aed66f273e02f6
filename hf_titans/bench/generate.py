"""The generation-overhead benchmark: tokens per second with the memory versus the bare model, in one run.

The memory is taught a few facts so that it speaks for the ``speaks`` prompts (soft prompt in front, through
``inputs_embeds``); the ``silent`` prompts are unrelated, so it only computes the key and the gate and then
hands the prompt to the bare model. Every case generates exactly ``new_tokens`` tokens greedily
(``min_new_tokens = max_new_tokens``) on the same prompts for both sides; timings alternate between the two
sides and the median of ``repeats`` runs is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch

from ..config import MemoryConfig
from ..engine import HybridTitansEngine

FACTS = [
    "The secret project code is Omega-99.",
    "The CEO's favorite fruit is a durian.",
    "The meeting with the auditors is at 4:32 PM exactly.",
    "The password for the lab wifi is purple-giraffe-17.",
    "Our new office is on the ninth floor of the Larkspur building.",
    "The name of the captain's parrot is Admiral Biscuit.",
    "The delivery drone is called Kestrel and flies at night.",
    "The winner of the 2031 chess cup was Ilse Marquardt.",
]
SPEAKS_PROMPTS = [
    "The secret project code is", "The CEO's favorite fruit is", "The meeting with the auditors is at",
    "The password for the lab wifi is", "Our new office is on the", "The name of the captain's parrot is",
    "The delivery drone is called", "The winner of the 2031 chess cup was",
]
SILENT_PROMPTS = [
    "Write a short story about a lighthouse keeper.", "The capital of Australia is",
    "Photosynthesis is the process by which", "Here is a recipe for pancakes:", "The French Revolution began in",
    "A good way to learn programming is", "The largest planet in the solar system is", "Once upon a time,",
]


def _time(fn: Callable[[], Any]) -> float:
    """Wall seconds of ``fn()``, waiting for queued GPU work on both ends (CUDA runs asynchronously)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def run_generate(model, tokenizer, new_tokens: Sequence[int] = (64, 256), batch_sizes: Sequence[int] = (1, 8),
                 repeats: int = 3, config: MemoryConfig | None = None, gates: Sequence[str] = ("speaks", "silent"),
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    engine = HybridTitansEngine(model, tokenizer, config)
    t = time.perf_counter()
    report = engine.teach(FACTS)
    teach_seconds = time.perf_counter() - t
    log(f"taught {report.written}/{len(FACTS)} facts in {teach_seconds:.1f} s")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cases = []
    for gate in gates:
        pool = SPEAKS_PROMPTS if gate == "speaks" else SILENT_PROMPTS
        for b in batch_sizes:
            prompts = [pool[i % len(pool)] for i in range(b)]
            inputs = engine.prepare_inputs(prompts)
            speaks = [bool(s) for s in inputs["speaks"]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(engine.device)
            for length in new_tokens:
                kw = dict(max_new_tokens=length, min_new_tokens=length, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id)

                def bare():
                    with torch.no_grad():
                        out = model.generate(**enc, **kw)
                    assert out.shape[1] - enc["input_ids"].shape[1] == length

                def memory():
                    engine.generate(prompts, **kw)

                bare()  # warm-up
                memory()
                bare_times, memory_times = [], []
                for r in range(repeats):
                    order = (bare, memory) if r % 2 == 0 else (memory, bare)
                    for fn in order:
                        (bare_times if fn is bare else memory_times).append(_time(fn))
                tb, tm = statistics.median(bare_times), statistics.median(memory_times)
                case = {"gate": gate, "memory_speaks": sum(speaks), "batch": b, "new_tokens": length,
                        "bare_seconds": tb, "memory_seconds": tm, "bare_tokens_per_s": b * length / tb,
                        "memory_tokens_per_s": b * length / tm, "ratio": tb / tm,
                        "bare_all": bare_times, "memory_all": memory_times}
                cases.append(case)
                log(f"{gate:6s} batch {b}  {length:4d} tokens  bare {case['bare_tokens_per_s']:7.1f} tok/s  "
                    f"memory {case['memory_tokens_per_s']:7.1f} tok/s  ratio {case['ratio']:.3f}  "
                    f"(memory speaks for {sum(speaks)}/{b})")
    prepare = []
    for prompts in (SPEAKS_PROMPTS, SILENT_PROMPTS):
        engine.prepare_inputs(prompts)
        prepare.append(statistics.median(_time(lambda: engine.prepare_inputs(prompts)) for _ in range(5)))
    return {"teach_seconds": teach_seconds, "teach": report.to_dict(), "cases": cases, "repeats": repeats,
            "prepare_inputs_seconds_batch8": {"speaks": prepare[0], "silent": prepare[1]},
            "config": engine.config.to_dict()}


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| memory | batch | new tokens | bare tok/s | with memory tok/s | ratio (memory / bare) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in results["cases"]:
        lines.append(f"| {c['gate']} ({c['memory_speaks']}/{c['batch']}) | {c['batch']} | {c['new_tokens']} | "
                     f"{c['bare_tokens_per_s']:.1f} | {c['memory_tokens_per_s']:.1f} | {c['ratio']:.3f} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    labels = [f"{c['gate']}\nb={c['batch']} L={c['new_tokens']}" for c in cases]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
    ax.bar(range(len(cases)), [c["ratio"] for c in cases], color=["C0" if c["gate"] == "speaks" else "C2" for c in cases])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(cases)), labels, fontsize=8)
    ax.set_ylabel("tokens/s with memory / bare")
    ax.set_title("generation throughput relative to bare model.generate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
