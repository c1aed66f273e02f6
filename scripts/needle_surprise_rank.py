"""Where the needle ranks by surprise in a needle-benchmark haystack, read without writing anything.

    python scripts/needle_surprise_rank.py --fillers natural,repeat --trials 2 --threads 1

Each haystack is the one ``python -m hf_titans.bench needle`` builds for the same seed, filler, length and trial.
``engine.read(..., max_steps=0)`` runs the reader's forward pass over every chunk and keeps the score that decides
what is written for every text it would write (threshold 0, no cap on spans), so this shows whether the reader
*could* pick the needle out: its rank in the document, after the first chunk (which nothing in the document precedes)
and in its own chunk. Two readers: ``context`` (surprise in the chunk's context, one sentence at a
time: ``read_cache_weight=0``, ``read_passage_sentences=1``) and ``document`` (the default: the model mixed with
the n-gram cache of the document read so far, passages of two sentences). Per haystack and reader it also prints
each chunk's most surprising passage and which chunks have one at or above the default ``read_surprise_threshold``
(the chunks the reader would write). See docs/reading.md.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from hf_titans import HybridTitansEngine, MemoryConfig, load_base_model
from hf_titans.bench.needle import FILLERS, make_haystack, trial_rng


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fillers", default=",".join(FILLERS))
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--readers", default="context,document", help="comma list of context, document")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_base_model()
    readers = {"context": dict(read_cache_weight=0.0, read_passage_sentences=1), "document": {}}
    readers = {name: readers[name] for name in args.readers.split(",")}
    threshold = MemoryConfig().read_surprise_threshold
    for filler in args.fillers.split(","):
        for t in range(args.trials):
            hay = make_haystack(tokenizer, args.length, filler, trial_rng(args.seed, filler, args.length, t), args.window)
            for reader, changes in readers.items():
                config = MemoryConfig(read_surprise_threshold=0.0, read_max_spans=100, **changes)
                stats = HybridTitansEngine(model, tokenizer, config).read(
                    hay["text"], chunk_tokens=512, context_tokens=64, max_steps=0, progress=False)
                pieces = [(s, c.index, text) for c in stats.chunks for text, s in c.surprises.items()]
                ranked = sorted(pieces, key=lambda x: -x[0])
                later = [p for p in ranked if p[1] > 0]
                median = statistics.median(p[0] for p in pieces)
                for piece in (p for p in pieces if hay["key"] in p[2]):
                    own = sorted((p for p in pieces if p[1] == piece[1]), key=lambda x: -x[0])
                    print(f"{filler} #{t} key {hay['key']} {reader:8s}: {piece[2][:30]!r} {piece[0]:.2f} nats, rank "
                          f"{ranked.index(piece) + 1}/{len(ranked)} in the document, "
                          f"{later.index(piece) + 1 if piece in later else '-'} after the first chunk, "
                          f"{own.index(piece) + 1}/{len(own)} in its chunk (median {median:.2f}; most surprising "
                          f"{ranked[0][0]:.2f}: {ranked[0][2][:30]!r})")
                needle_chunks = sorted({c for s, c, text in pieces if hay["key"] in text})
                print(f"  most surprising passage per chunk: {[round(c.max_passage_surprise, 2) for c in stats.chunks]}; "
                      f"chunks with one >= {threshold}: "
                      f"{[c.index for c in stats.chunks if c.max_passage_surprise >= threshold]} (needle in chunk "
                      f"{needle_chunks})")


if __name__ == "__main__":
    main()
