"""The needle benchmark: pass-key retrieval from documents far longer than the model's window (issue 8).

    python -m hf_titans.bench needle --lengths 8192,16384,32768,65536 --trials 20 --fillers repeat,natural \\
        --window 2048 --out results/needle

Per trial a 5-digit pass key ("The pass key is 71432. Remember it. 71432 is the pass key.") is hidden at a
random depth of a document of about N tokens, always before the last ``window`` tokens, so a model that sees
only its window cannot see it. Then:

* **memory**: ``engine.reset_memory(); engine.read(document, chunk_tokens)`` (each forward pass sees at most one
  chunk plus ``context_tokens`` of the one before, at most ``window`` tokens), then, with nothing in the context,
  ``engine.generate(question)``. Scored for the issue's question ``"What is the pass key? The pass key is"`` and
  for the cloze ``"The pass key is"`` (the start of the needle itself; the engine's key is the wording of the
  prompt, see the README's limits). The memory answers the question by reciting the sentence it recognises in
  it ("The pass key is", ``MemoryConfig.recite_tokens``); each trial records the recitation.
* **baseline**: the bare model on the last ``window`` tokens of the document followed by the question.
* **control** (``--control``): the bare model with the needle inside its window (same filler), which says
  whether the model can do the task at all when it sees the needle.

A trial is correct when the greedy completion (``max_new_tokens`` tokens) contains the key (the usual pass-key
scoring); the summary also gives the stricter *exact* accuracy, where the first number of the completion is the key
itself (" 60337.5" contains the key 60337 but is not it).

Fillers (``--fillers``): ``repeat`` is the classic pass-key filler ("The grass is green. The sky is blue. ...")
repeated; ``natural`` is text from a seeded template generator with varied sentences, many of them holding
other numbers (locker codes, phone numbers, rooms, buses, years, prices), so that a memory which keeps "the last
surprising thing" or "the last number" is not rewarded.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import MemoryConfig
from ..engine import HybridTitansEngine

QUESTION = "What is the pass key? The pass key is"
CLOZE = "The pass key is"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
REPEAT = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
FILLERS = ("repeat", "natural")

_NAMES = ("Maria", "Tomas", "Aiko", "Lena", "Omar", "Priya", "Jonas", "Chen", "Sofia", "Kwame", "Elena", "Rafael",
          "Ingrid", "Yusuf", "Nadia", "Pablo", "Hana", "Viktor", "Amara", "Luca")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Kyoto", "Lima", "Prague", "Austin", "Hanoi", "Dublin", "Tunis", "Perth",
           "Quebec", "Seville", "Tallinn", "Cusco", "Bergen")
_PLACES = ("market", "library", "harbour", "bakery", "museum", "station", "park", "garden", "workshop", "school")
_OBJECTS = ("bicycle", "lantern", "notebook", "umbrella", "violin", "kettle", "map", "clock", "basket", "camera")
_ADJS = ("old", "red", "quiet", "tiny", "heavy", "bright", "wooden", "broken", "new", "dusty")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_ANIMALS = ("cat", "heron", "goat", "fox", "dog", "crow", "horse", "owl")
_COLORS = ("blue", "green", "yellow", "white", "grey", "orange")
_TEMPLATES = (
    "{name} walked to the {place} in {city} on {day}.",
    "The {adj} {obj} on the table belonged to {name}.",
    "In {year}, {name} opened a small {place} with {n} tables.",
    "Room {n3} on the {ord} floor was painted {color} last spring.",
    "The train to {city} leaves at {hh}:{mm} from platform {p}.",
    "A {adj} {animal} slept near the {place} all afternoon.",
    "{name} bought a {adj} {obj} for {n} dollars.",
    "The {place} in {city} closes at {hh} in the evening.",
    "Nobody knew why the {obj} was left outside the {place}.",
    "{name} and {name2} talked about {city} until midnight.",
    "The locker code at the {place} is {n4}.",
    "It rained in {city} for {n} days in a row.",
    "The {animal} followed {name} all the way home.",
    "Her phone number ends in {n4}, said {name}.",
    "The bus number {n3} goes past the {place} every hour.",
    "{name} wrote {n} pages in the {adj} {obj} that winter.",
)


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def answers_exactly(answer: str, key: str) -> bool:
    """Whether the first number in ``answer`` is ``key`` itself (" 60337." is; " 60337.5" and " 603370" are not)."""
    number = _NUMBER.search(answer)
    return number is not None and number.group(0) == key


def natural_sentence(rng: random.Random) -> str:
    """One sentence of the ``natural`` filler: a random template with random names, places and numbers."""
    return rng.choice(_TEMPLATES).format(
        name=rng.choice(_NAMES), name2=rng.choice(_NAMES), city=rng.choice(_CITIES), place=rng.choice(_PLACES),
        obj=rng.choice(_OBJECTS), adj=rng.choice(_ADJS), day=rng.choice(_DAYS), animal=rng.choice(_ANIMALS),
        color=rng.choice(_COLORS), year=rng.randint(1950, 2023), n=rng.randint(2, 40), n3=rng.randint(100, 999),
        n4=rng.randint(1000, 9999), ord=rng.choice(("first", "second", "third", "fourth", "fifth")),
        hh=rng.randint(1, 12), mm=f"{rng.randint(0, 59):02d}", p=rng.randint(1, 12))


def filler_sentences(kind: str, rng: random.Random):
    if kind not in FILLERS:
        raise ValueError(f"unknown filler {kind!r}; choose from {', '.join(FILLERS)}")
    i = 0
    while True:
        yield REPEAT[i % len(REPEAT)] if kind == "repeat" else natural_sentence(rng)
        i += 1


def trial_rng(seed: int, filler: str, n_tokens: int, trial: int) -> random.Random:
    """The generator of one trial's haystack: the same trial gets the same key, depth and filler in any process."""
    return random.Random(f"{seed}-{filler}-{n_tokens}-{trial}")


def make_haystack(tokenizer, n_tokens: int, filler: str, rng: random.Random, window: int,
                  in_window: bool = False) -> dict[str, Any]:
    """A document of about ``n_tokens`` tokens with the needle at a random depth before the last ``window``
    tokens (or inside them, ``in_window=True``). Returns the text, the key, the needle's token position."""
    key = str(rng.randint(10000, 99999))
    needle = NEEDLE.format(key=key)
    count = lambda text: len(tokenizer(" " + text, add_special_tokens=False)["input_ids"])  # noqa: E731
    budget = n_tokens - count(needle)
    sentences, lengths, total = [], [], 0
    for sentence in filler_sentences(filler, rng):
        if total >= budget:
            break
        sentences.append(sentence)
        lengths.append(count(sentence))
        total += lengths[-1]
    if in_window:
        lo, hi = max(0, total - window + 2 * count(needle) + 32), max(0, total - 64)
    else:
        lo, hi = 0, total - window - 64
    if hi <= lo:
        raise ValueError(f"a document of {n_tokens} tokens is too short to hide a needle "
                         f"{'inside' if in_window else 'before'} the last {window} tokens")
    target = rng.randint(lo, hi)
    at, seen = 0, 0
    while at < len(sentences) and seen + lengths[at] <= target:
        seen += lengths[at]
        at += 1
    text = " ".join(sentences[:at] + [needle] + sentences[at:])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    position = len(tokenizer(" ".join(sentences[:at] + [needle]), add_special_tokens=False)["input_ids"])
    return {"text": text, "key": key, "tokens": len(ids), "needle_token": position, "depth": position / len(ids),
            "needle_in_last_window": position > len(ids) - window}


@torch.no_grad()
def bare_on_last_window(model, tokenizer, text: str, window: int, question: str, max_new_tokens: int) -> str:
    """The bare model's greedy answer to ``question`` after the last tokens of ``text``, ``window`` tokens in all."""
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    q = tokenizer("\n" + question, add_special_tokens=False)["input_ids"]
    doc = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = window - len(prefix) - len(q)
    ids = torch.tensor([prefix + doc[-keep:] + q], device=next(model.parameters()).device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_needle(model, tokenizer, lengths: Sequence[int], trials: int, fillers: Sequence[str] = FILLERS,
               window: int = 2048, chunk_tokens: int = 512, context_tokens: int = 64, config: MemoryConfig | None = None,
               max_steps: int | None = None, max_new_tokens: int = 8, seed: int = 0, baseline: bool = True,
               control: bool = False, first_trial: int = 0, log: Callable[[str], None] = print,
               checkpoint: Callable[[dict], None] | None = None) -> dict[str, Any]:
    if chunk_tokens + context_tokens + 1 > window:
        raise ValueError(f"chunk_tokens + context_tokens ({chunk_tokens + context_tokens}) must fit in the window "
                         f"({window}): reading must never see more than the window")
    engine = HybridTitansEngine(model, tokenizer, config)
    results: dict[str, Any] = {"settings": {"lengths": list(lengths), "trials": trials, "fillers": list(fillers),
                                            "window": window, "chunk_tokens": chunk_tokens,
                                            "context_tokens": context_tokens, "max_steps": max_steps,
                                            "max_new_tokens": max_new_tokens, "seed": seed, "first_trial": first_trial,
                                            "question": QUESTION,
                                            "cloze": CLOZE, "needle": NEEDLE, "config": engine.config.to_dict()},
                               "trials": [], "summary": []}
    for filler in fillers:
        for n in lengths:
            for t in range(first_trial, first_trial + trials):
                hay = make_haystack(tokenizer, n, filler, trial_rng(seed, filler, n, t), window)
                assert not hay["needle_in_last_window"]
                engine.reset_memory()
                stats = engine.read(hay["text"], chunk_tokens=chunk_tokens, context_tokens=context_tokens,
                                    max_steps=max_steps, progress=False)
                answers = {}
                for name, prompt in (("question", QUESTION), ("cloze", CLOZE)):
                    t0 = time.perf_counter()
                    answer = engine.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
                    answers[name] = {"answer": answer, "correct": hay["key"] in answer,
                                     "familiarity": engine.last_familiarity[0],
                                     "recitation": engine.last_recitations[0],
                                     "seconds": time.perf_counter() - t0}
                trial = {"filler": filler, "length": n, "trial": t, "key": hay["key"], "tokens": hay["tokens"],
                         "needle_token": hay["needle_token"], "depth": hay["depth"], **answers,
                         "needle_written": any(hay["key"] in s for s in stats.spans_written),
                         "read": {k: v for k, v in stats.to_dict().items() if k != "chunks"},
                         "written_spans": [(c.index, s) for c in stats.chunks for s in c.spans],
                         "chunk_surprise": [round(c.surprise, 4) for c in stats.chunks],
                         "chunk_familiarity": [round(c.familiarity, 4) for c in stats.chunks]}
                if baseline:
                    t0 = time.perf_counter()
                    answer = bare_on_last_window(model, tokenizer, hay["text"], window, QUESTION, max_new_tokens)
                    trial["baseline"] = {"answer": answer, "correct": hay["key"] in answer,
                                         "seconds": time.perf_counter() - t0}
                if control:
                    near = make_haystack(tokenizer, window, filler, random.Random(f"control-{seed}-{filler}-{n}-{t}"),
                                         window, in_window=True)
                    answer = bare_on_last_window(model, tokenizer, near["text"], window, QUESTION, max_new_tokens)
                    trial["control"] = {"answer": answer, "correct": near["key"] in answer}
                results["trials"].append(trial)
                log(f"{filler:8s} {n:6d} #{t}: key {hay['key']} at depth {hay['depth']:.2f}; "
                    f"{stats.chunks_written}/{stats.chunks_read} chunks written, needle written "
                    f"{trial['needle_written']}; question {answers['question']['answer']!r} "
                    f"(fam {answers['question']['familiarity']:.2f}), cloze {answers['cloze']['answer']!r} "
                    f"(fam {answers['cloze']['familiarity']:.2f}), baseline "
                    f"{trial.get('baseline', {}).get('answer')!r}; {stats.seconds:.0f} s "
                    f"({stats.tokens_per_second:.0f} tokens/s)")
                results["summary"] = summarize(results["trials"])
                if checkpoint:
                    checkpoint(results)
    return results


def summarize(trials: list[dict]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(t["filler"], t["length"]) for t in trials}, key=lambda k: (FILLERS.index(k[0]), k[1]))
    for filler, n in keys:
        ts = [t for t in trials if t["filler"] == filler and t["length"] == n]
        acc = lambda name: (sum(t[name]["correct"] for t in ts if name in t) / sum(name in t for t in ts)  # noqa: E731
                            if any(name in t for t in ts) else None)
        exact = lambda name: (statistics.mean(answers_exactly(t[name]["answer"], t["key"]) for t in ts)  # noqa: E731
                              if all("answer" in t.get(name, {}) and "key" in t for t in ts) else None)
        rows.append({"filler": filler, "length": n, "trials": len(ts), "accuracy_question": acc("question"),
                     "accuracy_cloze": acc("cloze"), "exact_question": exact("question"),
                     "exact_cloze": exact("cloze"), "baseline_accuracy": acc("baseline"),
                     "control_accuracy": acc("control"),
                     "needle_written": sum(t["needle_written"] for t in ts) / len(ts),
                     "fraction_written": statistics.mean(t["read"]["fraction_written"] for t in ts),
                     "tokens_per_second": statistics.mean(t["read"]["tokens_per_second"] for t in ts),
                     "read_seconds": statistics.mean(t["read"]["seconds"] for t in ts),
                     "mean_tokens": statistics.mean(t["tokens"] for t in ts)})
    return rows


def merge(parts: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """One needle result from runs that split the lengths, fillers or trials over processes (``--first-trial``).

    The runs must share every reading setting except the lengths, fillers, trials and first trial; a trial (filler,
    length, index) may appear only once."""
    free = ("lengths", "trials", "fillers", "first_trial")
    settings = {k: v for k, v in parts[0]["settings"].items() if k not in free}
    seen: set[tuple] = set()
    trials: list[dict] = []
    for name, part in zip(names, parts):
        if part.get("benchmark") != "needle":
            raise ValueError(f"{name} is not a needle result")
        other = {k: v for k, v in part["settings"].items() if k not in free}
        if other != settings:
            diff = sorted(k for k in set(other) | set(settings) if other.get(k) != settings.get(k))
            raise ValueError(f"{name}: reading settings differ from {names[0]} ({', '.join(diff)})")
        for t in part["trials"]:
            key = (t["filler"], t["length"], t["trial"])
            if key in seen:
                raise ValueError(f"{name}: trial {key} appears in more than one file")
            seen.add(key)
            trials.append(t)
    settings.update(lengths=sorted({t["length"] for t in trials}), fillers=sorted({t["filler"] for t in trials}),
                    trials=None)
    return {"benchmark": "needle", **{k: parts[0][k] for k in parts[0] if k not in ("settings", "trials", "summary",
                                                                                     "command", "started",
                                                                                     "wall_seconds")},
            "settings": settings, "trials": trials, "summary": summarize(trials),
            "merged_from": [{"file": str(n), "command": p.get("command"), "wall_seconds": p.get("wall_seconds"),
                             "git_commit": p.get("git_commit")} for n, p in zip(names, parts)]}


def markdown_table(results: dict[str, Any]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.0f}%"

    s = results["settings"]
    lines = [f"Pass-key retrieval, window {s['window']} tokens, chunks of {s['chunk_tokens']} (+{s['context_tokens']} "
             f"context), memory read threshold {s['config']['read_surprise_threshold']} nats",
             "",
             "| filler | tokens | trials | memory: question | memory: cloze | bare, last window | bare, needle in "
             "window | needle written | chunks written | tokens/s (read) | s per read |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["summary"]:
        lines.append(f"| {r['filler']} | {r['mean_tokens']:.0f} | {r['trials']} | {pct(r['accuracy_question'])} "
                     f"({pct(r.get('exact_question'))} exact) | {pct(r['accuracy_cloze'])} "
                     f"({pct(r.get('exact_cloze'))} exact) | {pct(r['baseline_accuracy'])} | {pct(r['control_accuracy'])} | "
                     f"{pct(r['needle_written'])} | {100 * r['fraction_written']:.1f}% | {r['tokens_per_second']:.0f} | "
                     f"{r['read_seconds']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line
def add_parser(sub, common, config: Callable, environment: Callable, load_model: Callable) -> None:
    """Register ``python -m hf_titans.bench needle`` (helpers come from ``hf_titans.bench.__main__``)."""
    p = sub.add_parser("needle", parents=[common], help="pass-key retrieval beyond the window: engine.read + memory")
    p.add_argument("--lengths", default="8192,16384,32768,65536", help="comma list of document lengths (tokens)")
    p.add_argument("--trials", type=int, default=20, help="trials per filler and length")
    p.add_argument("--fillers", default=",".join(FILLERS), help=f"comma list of {', '.join(FILLERS)}")
    p.add_argument("--window", type=int, default=2048, help="the model's window (tokens): baseline and reading")
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--context-tokens", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=None, help="update steps per written chunk (default: config)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-trial", type=int, default=0,
                   help="index of the first trial: split one run's trials over processes (0-9 here, 10-19 there)")
    p.add_argument("--no-baseline", action="store_true", help="skip the bare model on the last window")
    p.add_argument("--control", action="store_true", help="also run the bare model with the needle in its window")

    def cmd(args) -> None:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        fillers = [x.strip() for x in args.fillers.split(",") if x.strip()]
        for f in fillers:
            if f not in FILLERS:
                raise SystemExit(f"unknown filler {f!r}; choose from {', '.join(FILLERS)}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        model, tokenizer = load_model(args.model, args.device)
        head = {"benchmark": "needle", **environment(model, tokenizer),
                "command": "python -m hf_titans.bench " + " ".join(sys.argv[1:])}
        start = time.perf_counter()

        def save(results: dict) -> None:
            data = {**head, "wall_seconds": time.perf_counter() - start, **results}
            (out / "results.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
            (out / "results.md").write_text(markdown_table(results) + "\n", encoding="utf-8")

        results = run_needle(model, tokenizer, lengths, args.trials, fillers, window=args.window,
                             chunk_tokens=args.chunk_tokens, context_tokens=args.context_tokens, config=config(args),
                             max_steps=args.max_steps, max_new_tokens=args.max_new_tokens, seed=args.seed,
                             baseline=not args.no_baseline, control=args.control, first_trial=args.first_trial,
                             checkpoint=save)
        save(results)
        print(markdown_table(results))
        print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}")

    p.set_defaults(func=cmd)
