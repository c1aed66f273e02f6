"""``python -m hf_titans.bench.bases``: total recall on the default model loaded as fp32, bf16, 8-bit and 4-bit.

Each base runs in its own process, so its peak RSS is its own. Prints a markdown table and writes results.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

BASES = ("fp32", "bf16", "8bit", "4bit")


def load_kwargs(base: str) -> dict:
    import torch

    if base == "fp32":
        return {"dtype": torch.float32}
    if base == "bf16":
        return {"dtype": torch.bfloat16}
    from transformers import BitsAndBytesConfig

    if base == "8bit":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    if base == "4bit":
        return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")}
    raise ValueError(f"unknown base {base!r}; choose from {', '.join(BASES)}")


def run_one(base: str, threads: int | None = None, device: str | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from hf_titans import HybridTitansEngine, load_base_model
    from hf_titans.demo import run_total_recall

    start = time.perf_counter()
    placement = {"device_map": {"": device}} if device else {}
    model, tokenizer = load_base_model(**load_kwargs(base), **placement)
    load_seconds = time.perf_counter() - start
    result = run_total_recall(HybridTitansEngine(model, tokenizer))
    return {"base": base, "recall": f"{sum(result.recalled.values())}/{len(result.recalled)}",
            "locality": f"{sum(result.unchanged.values())}/{len(result.unchanged)}",
            "teach_seconds": round(result.teach_seconds, 1), "load_seconds": round(load_seconds, 1),
            "model_footprint_mb": round(model.get_memory_footprint() / 2 ** 20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            **({"device": torch.cuda.get_device_name(model.device),
                "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)}
               if model.device.type == "cuda" else {}),
            "answers": result.answers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bases", default=",".join(BASES), help="comma-separated subset of " + ",".join(BASES))
    parser.add_argument("--out", default="results/bases", help="folder for results.json")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    parser.add_argument("--device", default=None, help="load each base onto this device (e.g. cuda)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds at most per base (a row says so)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.threads, args.device)))
        return 0
    rows = []
    for base in args.bases.split(","):
        threads = ["--threads", str(args.threads)] if args.threads else []
        threads += ["--device", args.device] if args.device else []
        try:
            proc = subprocess.run([sys.executable, "-m", "hf_titans.bench.bases", "--one", base, *threads],
                                  capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rows.append({"base": base, "error": f"did not finish within {args.timeout:.0f} s"})
            print(rows[-1], file=sys.stderr)
            continue
        if proc.returncode != 0:
            rows.append({"base": base, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print("| base | recall | locality | teach s | model MB | peak RSS MB | peak GPU MB |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['base']} | error: {r['error']} | | | | | |")
        else:
            print(f"| {r['base']} | {r['recall']} | {r['locality']} | {r['teach_seconds']} | "
                  f"{r['model_footprint_mb']} | {r['peak_rss_mb']} | {r.get('peak_gpu_mb', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
