"""Numerical stress: teach the same fact N times, then N different facts, then with an absurd step size, and print
how large the memory's weights get (max |w|, L2 norm), whether any is non-finite, and how many updates were skipped.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/stress_numerics.py            # tiny random model, N=1000
    python scripts/stress_numerics.py --n 200 --model default                    # the embedded SmolLM2 (slow)

Every call is the hardest case for the update rule: ``surprise_threshold=0`` and ``target_loss=0``, so each call
writes and takes all of its ``--steps`` steps (no early stop). The last line is one JSON object of the figures.
Exit status 1 if any weight became non-finite.
"""

from __future__ import annotations

import argparse
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

WORDS = ["amber", "basalt", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "jasper", "kelp",
         "lumen", "marble", "nectar", "onyx", "pylon", "quartz", "raven", "sable", "tundra", "umber", "vesper"]



def fact(i: int, rng: random.Random) -> str:
    return f"Item {i} is stored in box {rng.randint(100, 999)} next to the {rng.choice(WORDS)} {rng.choice(WORDS)}."


def phase(engine: HybridTitansEngine, name: str, texts, steps: int, every: int) -> dict:
    start = time.perf_counter()
    skipped0 = engine.skipped_nonfinite
    peak = 0.0
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped updates warn; they are counted below
        for i, text in enumerate(texts, 1):
            engine.teach(text, max_steps=steps)
            stats = weight_stats(engine.memory)
            peak = max(peak, stats["max_abs"])
            if not stats["finite"]:
                rows.append((i, stats))
                break
            if i % every == 0 or i == len(texts):
                rows.append((i, stats))
                print(f"  {name:10s} {i:5d} calls  max|w| {stats['max_abs']:9.4f}  ||w|| {stats['norm']:10.4f}  "
                      f"non-finite {stats['non_finite']}  skipped {engine.skipped_nonfinite - skipped0}  "
                      f"{time.perf_counter() - start:6.1f} s", flush=True)
    last = rows[-1][1]
    return {"calls": rows[-1][0], "steps_per_call": steps, "max_abs_end": last["max_abs"], "max_abs_peak": peak,
            "norm_end": last["norm"], "non_finite": last["non_finite"], "finite": last["finite"],
            "skipped_nonfinite": engine.skipped_nonfinite - skipped0, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="teach calls per phase")
    parser.add_argument("--steps", type=int, default=2, help="update steps per call")
    parser.add_argument("--absurd-lr", type=float, default=1e30, help="step size of the overflow phase")
    parser.add_argument("--model", default="tiny", help="'tiny' (random, default), 'default' (SmolLM2) or a path/id")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tokenizer = load_model(args.model)
    config = MemoryConfig(surprise_threshold=0.0, target_loss=0.0, seed=args.seed)
    every = max(1, args.n // 10)
    results = {"model": args.model, "n": args.n}

    engine = HybridTitansEngine(model, tokenizer, config)
    initial = weight_stats(engine.memory)
    results["initial_max_abs"], results["initial_norm"] = initial["max_abs"], initial["norm"]
    print(f"initial: max|w| {initial['max_abs']:.4f}  ||w|| {initial['norm']:.4f}")
    same = fact(0, rng)
    print(f"same fact {args.n} times: {same!r}")
    results["same_fact"] = phase(engine, "same", [same] * args.n, args.steps, every)

    engine = HybridTitansEngine(model, tokenizer, config)
    print(f"{args.n} different facts")
    results["different_facts"] = phase(engine, "different", [fact(i, rng) for i in range(args.n)], args.steps, every)

    engine = HybridTitansEngine(model, tokenizer, config.replace(lr=args.absurd_lr, assoc_lr=args.absurd_lr))
    n_absurd = max(1, args.n // 10)
    print(f"lr={args.absurd_lr:g}: {n_absurd} facts (every overflowing update must be refused)")
    results["absurd_lr"] = phase(engine, "absurd-lr", [fact(i, rng) for i in range(n_absurd)], args.steps,
                                 max(1, n_absurd // 5))
    ok = all(results[k]["finite"] for k in ("same_fact", "different_facts", "absurd_lr"))
    results["all_finite"] = ok
    print(json.dumps(results))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
