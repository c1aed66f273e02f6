"""Read one long needle document with engine.read and record the process's resident memory after every chunk.

    OMP_NUM_THREADS=1 python scripts/read_long_rss.py --tokens 100000 --out rss100k.json

Checks that memory stays flat as the document grows (issue 8: a 100k-token document must not run out of
24 GiB). Prints the resident set size every 20 chunks, the read statistics, the memory's answer to the cloze
"The pass key is", and writes everything to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time

import torch

from hf_titans import HybridTitansEngine, load_base_model, reading
from hf_titans.bench.needle import CLOZE, make_haystack


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--filler", default="repeat")
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="read_long_rss.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_base_model()
    engine = HybridTitansEngine(model, tokenizer)
    hay = make_haystack(tokenizer, args.tokens, args.filler, random.Random(args.seed), window=2048)
    print(f"{hay['tokens']} tokens, needle at token {hay['needle_token']}", flush=True)
    rss: list[float] = []
    original = reading._read_chunk

    def measured(*a, **k):
        chunk = original(*a, **k)
        rss.append(rss_mib())
        if chunk.index % 20 == 0:
            print(f"chunk {chunk.index}: {rss[-1]:.0f} MiB resident", flush=True)
        return chunk

    reading._read_chunk = measured
    start = time.perf_counter()
    stats = engine.read(hay["text"], chunk_tokens=args.chunk_tokens, progress=False)
    seconds = time.perf_counter() - start
    answer = engine.generate(CLOZE, max_new_tokens=8, do_sample=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(stats)
    print(f"cloze {CLOZE!r} -> {answer!r} (key {hay['key']}); peak RSS {peak:.0f} MiB; RSS after chunk 10 / last: "
          f"{rss[min(10, len(rss) - 1)]:.0f} / {rss[-1]:.0f} MiB; {seconds:.0f} s")
    data = {"tokens": hay["tokens"], "key": hay["key"], "needle_token": hay["needle_token"], "answer": answer,
            "correct": hay["key"] in answer, "peak_rss_mib": peak, "rss_mib_per_chunk": rss, "seconds": seconds,
            "read": {k: v for k, v in stats.to_dict().items() if k != "chunks"},
            "written": [(c.index, s) for c in stats.chunks for s in c.spans]}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
