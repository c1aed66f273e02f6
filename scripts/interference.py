"""Watch sequential writes interfere: teach zsRE facts one by one into one memory and print, every ``--every``
facts, the Rel of the fact just taught (immediate) and of every fact taught so far, by blocks of ten.

    python scripts/interference.py --n 40 --threads 1                       # the default config
    python scripts/interference.py --n 40 --set rehearsal_weight=1.0        # the anchors as weak as before

The end of a run is what ``python -m hf_titans.bench edit --schedule sequential`` scores (``rel_by_age`` there);
this shows when facts start to be lost, which the final table cannot.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hf_titans import load_base_model
from hf_titans.bench.__main__ import config_from_args
from hf_titans.bench.data import load_records
from hf_titans.bench.edit import MemoryMethod
from hf_titans.bench.metrics import mean, target_ids, token_accuracy

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre_dev.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA), help="zsRE or CounterFact JSONL file")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--config", default=None, help="MemoryConfig YAML/JSON file (default: MemoryConfig())")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a MemoryConfig field")
    args = parser.parse_args()
    config = config_from_args(args)  # a bad --set fails before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_base_model()
    method = MemoryMethod(model, tokenizer, config)
    records = load_records(args.data, n=args.n)

    def rel(rows, field="prompt"):
        preds = method.predict([getattr(r, field) for r in rows], [r.target for r in rows])
        return token_accuracy(preds, target_ids(tokenizer, [r.target for r in rows]))

    start, immediate = time.perf_counter(), []
    for i, record in enumerate(records, 1):
        method.teach([record])
        immediate.append(rel([record])[0])
        if i % args.every == 0 or i == len(records):
            so_far = rel(records[:i])
            blocks = [round(mean(so_far[j:j + 10]), 2) for j in range(0, i, 10)]
            print(f"{i} facts, {time.perf_counter() - start:.0f} s: immediate {mean(immediate[-args.every:]):.3f}, "
                  f"all {mean(so_far):.3f}, by blocks of 10 (oldest first) {blocks}", flush=True)
    print(f"final: Rel {mean(rel(records)):.3f}, Gen {mean(rel(records, 'rephrase')):.3f}, "
          f"{(time.perf_counter() - start) / len(records):.1f} s/fact, steps {method.fact_steps}")


if __name__ == "__main__":
    main()
