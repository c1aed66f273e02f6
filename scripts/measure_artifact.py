"""Measure a memory checkpoint on the default model: artifact size and load_memory swap time.

    python scripts/measure_artifact.py                 # SmolLM2-135M, default MemoryConfig
    python scripts/measure_artifact.py --swaps 50 --threads 1

Teaches a fact (one update step fills the optimizer state, which is part of the artifact), saves the memory, prints
the size of every file and the largest tensors, then swaps two saved memories back and forth with
``engine.load_memory`` and prints the median time (and the first, uncached load, which also fingerprints the
base model's embeddings).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from hf_titans import HybridTitansEngine, MemoryConfig, load_base_model
from hf_titans import hub


def tensor_sizes(path: Path) -> list[tuple[str, int]]:
    """(name, bytes) of every tensor in a safetensors file, largest first."""
    tensors = load_file(str(path))
    return sorted(((n, t.numel() * t.element_size()) for n, t in tensors.items()), key=lambda x: -x[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--teach-steps", type=int, default=1, help="update steps before saving (default 1)")
    parser.add_argument("--swaps", type=int, default=20, help="timed load_memory swaps (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_base_model(args.model)
    engine = HybridTitansEngine(model, tokenizer, MemoryConfig())
    with tempfile.TemporaryDirectory() as tmp:
        engine.teach(["The secret project code is Omega-99."], max_steps=args.teach_steps)
        a = engine.save_pretrained(Path(tmp) / "a")
        engine.teach(["Zorblat's favourite colour is turquoise."], max_steps=args.teach_steps)
        b = engine.save_pretrained(Path(tmp) / "b")

        files = {p.name: p.stat().st_size for p in sorted(a.iterdir())}
        total = sum(files.values())
        print(f"base model: {model.config.name_or_path} (hidden {engine.hidden_size}), "
              f"torch threads {torch.get_num_threads()}")
        print(f"artifact: {total / 1e6:.3f} MB ({total / 2**20:.3f} MiB), target <= 10 MB")
        for name, size in files.items():
            print(f"  {name:18s} {size / 1e6:8.3f} MB")
        sizes = tensor_sizes(a / hub.WEIGHTS_NAME)
        groups: dict[str, int] = {}
        for name, size in sizes:
            kind = name.rsplit(".", 1)[1] if name.startswith(hub.OPTIMIZER_PREFIX) else "weights/buffers"
            groups[kind] = groups.get(kind, 0) + size
        print("  by kind: " + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in groups.items()))
        print("  largest tensors: " + ", ".join(f"{n} {s / 1e6:.2f} MB" for n, s in sizes[:4]))

        hub._FINGERPRINTS.clear()  # the first load of a process also fingerprints the embeddings
        start = time.perf_counter()
        engine.load_memory(a)
        first = time.perf_counter() - start
        times = []
        for i in range(args.swaps):
            start = time.perf_counter()
            engine.load_memory(b if i % 2 == 0 else a)
            times.append(time.perf_counter() - start)
        ms = sorted(t * 1000 for t in times)
        print(f"load_memory swap: median {statistics.median(ms):.1f} ms (min {ms[0]:.1f}, max {ms[-1]:.1f}, "
              f"{len(ms)} swaps), target <= 50 ms; first load with embedding fingerprint {first * 1000:.0f} ms")


if __name__ == "__main__":
    main()
