"""Total recall on the embedded SmolLM2-135M-Instruct for every memory variant and integration mode.

Each preset (``configs/<name>.yaml``) runs :func:`hf_titans.demo.run_total_recall` in its own process, one after
another, and a markdown table is printed: config, recall x/4, locality x/3, teach seconds.

    python scripts/variants_recall.py                          # titans moneta yaad memora ttt_linear mag mal
    python scripts/variants_recall.py --configs yaad,mal --threads 2
    python scripts/variants_recall.py --configs moneta --set assoc_lr=3.0 --set max_steps=60   # try a change
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESETS = ("titans", "moneta", "yaad", "memora", "ttt_linear", "mag", "mal")


def _value(text: str):
    import yaml

    return yaml.safe_load(text)


def run_one(name: str, overrides: list[str], threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from hf_titans import HybridTitansEngine, MemoryConfig, load_base_model
    from hf_titans.demo import run_total_recall

    config = MemoryConfig.from_file(REPO / "configs" / f"{name}.yaml")
    changes = {}
    for item in overrides:
        key, _, value = item.partition("=")
        changes[key] = _value(value)
    if changes:
        config = config.replace(**changes)
    model, tokenizer = load_base_model()
    result = run_total_recall(HybridTitansEngine(model, tokenizer, config))
    return {"config": name + "".join(f" {k}={v}" for k, v in changes.items()),
            "variant": config.variant, "mode": config.mode,
            "recall": f"{sum(result.recalled.values())}/{len(result.recalled)}",
            "locality": f"{sum(result.unchanged.values())}/{len(result.unchanged)}",
            "teach_seconds": round(result.teach_seconds, 1), "steps": result.report.steps,
            "passed": result.passed, "answers": result.answers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(PRESETS), help="comma-separated preset names (configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every run (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--out", default=None, help="write the rows as JSON to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.set, args.threads)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    rows = []
    for name in args.configs.split(","):
        if not (REPO / "configs" / f"{name}.yaml").is_file():
            parser.error(f"no preset configs/{name}.yaml; choose from {', '.join(PRESETS)}")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--threads", str(args.threads)]
        cmd += [f"--set={item}" for item in args.set]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
            rows.append({"config": name, "error": last})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows[-1]["wall_seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(f"\n{args.threads} thread(s)\n")
    print("| config | variant / mode | recall | locality | teach s | steps |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | error: {r['error']} | | | | |")
        else:
            print(f"| {r['config']} | {r['variant']} / {r['mode']} | {r['recall']} | {r['locality']} | "
                  f"{r['teach_seconds']} | {r['steps']} |")
    return 0 if all(r.get("passed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
