"""Soak: N teach-then-ask cycles in one process. Reports resident memory (RSS) over the run, recall of the facts
taught first and last, and locality (unrelated prompts answered exactly as by the bare model) at the end.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/soak.py                        # tiny random model, 1000 cycles
    python scripts/soak.py --model default --cycles 200 --max-steps 40           # the embedded SmolLM2 (slow)

A cycle teaches one new fact ("The code of room 17 is gamma-42.") and asks its prompt ("The code of room 17
is"): recall is the fraction of prompts whose greedy answer starts with the taught continuation. A tiny random
model recalls little (it has nothing to build on); the figures that matter there are RSS, finiteness and that
nothing fails in 1000 cycles. The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_titans import HybridTitansEngine, MemoryConfig  # noqa: E402
from hf_titans.reliability import weight_stats  # noqa: E402
from _models import load_model  # noqa: E402  (scripts/ is on sys.path when a script runs)

UNRELATED = ["The weather today is", "Once upon a time there was", "The capital of France is", "Hello world, how",
             "The quick brown fox", "Water boils at", "My favourite food is", "Please write a short poem about"]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")



WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "Omega"]  # in the tiny tokenizer's corpus


def facts(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"The code of room {i} is", f" {rng.choice(WORDS)}-{rng.randint(10, 99)}.") for i in range(n)]


def recalls(engine: HybridTitansEngine, prompt: str, answer: str) -> bool:
    expected = answer.strip().rstrip(".")
    got = engine.generate(prompt, max_new_tokens=8, do_sample=False)
    return got.strip().startswith(expected)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--max-steps", type=int, default=40, help="update steps at most per taught fact")
    parser.add_argument("--lr", type=float, default=None,
                        help="memory step size (default: 0.01 on the tiny model, as tests/test_cli.py's preset; "
                             "the config default otherwise)")
    parser.add_argument("--model", default="tiny", help="'tiny' (random, default), 'default' (SmolLM2) or a path/id")
    parser.add_argument("--check", type=int, default=20, help="how many of the first and last facts to re-ask")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    warnings.simplefilter("ignore")
    model, tokenizer = load_model(args.model)
    lr = args.lr if args.lr is not None else (0.01 if args.model == "tiny" else MemoryConfig().lr)
    engine = HybridTitansEngine(model, tokenizer, MemoryConfig(max_steps=args.max_steps, lr=lr, seed=args.seed))
    bare = {p: engine.generate(p, max_new_tokens=8, use_memory=False) for p in UNRELATED}
    pairs = facts(args.cycles, args.seed)
    gc.collect()
    rss = [(0, rss_mb())]
    immediate = 0
    start = time.perf_counter()
    every = max(1, args.cycles // 10)
    for i, (prompt, answer) in enumerate(pairs, 1):
        engine.teach(prompt + answer)
        immediate += recalls(engine, prompt, answer)
        if i % every == 0 or i == args.cycles:
            gc.collect()
            rss.append((i, rss_mb()))
            print(f"cycle {i:5d}  RSS {rss[-1][1]:7.1f} MB  recalled right after teaching {immediate / i:6.1%}  "
                  f"max|w| {weight_stats(engine.memory)['max_abs']:.3f}  {time.perf_counter() - start:6.0f} s",
                  flush=True)
    k = min(args.check, args.cycles)
    early = sum(recalls(engine, p, a) for p, a in pairs[:k]) / k
    late = sum(recalls(engine, p, a) for p, a in pairs[-k:]) / k
    same = sum(engine.generate(p, max_new_tokens=8) == bare[p] for p in UNRELATED) / len(UNRELATED)
    silent = sum(f < engine.config.familiarity_threshold for f in engine.familiarity(UNRELATED)) / len(UNRELATED)
    stats = weight_stats(engine.memory)
    first_after_warmup = rss[1][1] if len(rss) > 1 else rss[0][1]
    results = {
        "model": args.model, "cycles": args.cycles, "max_steps": args.max_steps, "lr": lr, "seconds": round(time.perf_counter() - start),
        "rss_mb_start": round(rss[0][1], 1), "rss_mb_after_first_tenth": round(first_after_warmup, 1),
        "rss_mb_end": round(rss[-1][1], 1), "rss_mb_growth_after_first_tenth": round(rss[-1][1] - first_after_warmup, 1),
        "rss_curve": [(i, round(m, 1)) for i, m in rss],
        "recall_right_after_teaching": immediate / args.cycles, f"recall_first_{k}_at_end": early,
        f"recall_last_{k}_at_end": late, "locality_unrelated_prompts_identical": same,
        "memory_silent_on_unrelated": silent, "updates": engine.updates, "skipped_nonfinite": engine.skipped_nonfinite,
        "weights_finite": stats["finite"], "max_abs_weight": stats["max_abs"],
    }
    print(json.dumps(results))
    return 0 if stats["finite"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
