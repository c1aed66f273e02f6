"""The edit benchmark (Rel, Gen, Loc, cost) for every memory variant and integration mode, one preset at a time.

Each preset (``configs/<name>.yaml``) is run through ``python -m hf_titans.bench edit --methods memory`` in its own
process, into ``<out>/<name>/``; a preset whose ``results.json`` is already there is not run again (so an
interrupted sweep resumes, and ``--collect`` only prints the table). The markdown table goes to stdout.

    python scripts/variants_edit.py --data ../shared/data/zsre_dev.jsonl --n 100 --out results/variants-zsre-100
    python scripts/variants_edit.py --data ../shared/data/zsre_dev.jsonl --n 30 --configs yaad,mal --out results/v30
    python scripts/variants_edit.py --out results/variants-zsre-30 --collect
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESETS = ("titans", "moneta", "yaad", "memora", "ttt_linear", "mag", "mal")


def table(out: Path, names: list[str]) -> str:
    """One markdown row per preset that has a ``results.json`` under ``out``."""
    lines = ["| preset | variant / mode | n | Rel | Gen | Loc | paraphrases the gate opens for | teach s | s/fact | "
             "fwd+bwd passes/fact |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in names:
        path = out / name / "results.json"
        if not path.is_file():
            lines.append(f"| {name} | not run | | | | | | | | |")
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        m, cfg = data["methods"]["memory"], data["config"]
        n = data["n"]
        lines.append(f"| {name} | {cfg['variant']} / {cfg['mode']} | {n} | {m['rel']:.3f} | {m['gen']:.3f} | "
                     f"{m['loc']:.3f} | {m['extra']['speaks_gen']:.0%} | {m['teach_seconds']:.0f} | "
                     f"{m['teach_seconds'] / n:.1f} | {m['llm_passes_per_fact']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(PRESETS), help="comma-separated preset names (configs/*.yaml)")
    parser.add_argument("--out", required=True, help="folder with one subfolder per preset")
    parser.add_argument("--data", help="zsRE or CounterFact JSONL file (read by path)")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--device", default=None, help="run each preset with the base on this device (e.g. cuda)")
    parser.add_argument("--collect", action="store_true", help="run nothing; print the table of what is there")
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    for name in names:
        if not (REPO / "configs" / f"{name}.yaml").is_file():
            parser.error(f"no preset configs/{name}.yaml; choose from {', '.join(PRESETS)}")
    out = Path(args.out)
    if not args.collect:
        if not args.data:
            parser.error("--data is required unless --collect")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for name in names:
            if (out / name / "results.json").is_file():
                print(f"{name}: results.json already there, not run again", file=sys.stderr)
                continue
            cmd = [sys.executable, "-m", "hf_titans.bench", "edit", "--data", args.data, "--n", str(args.n),
                   "--methods", "memory", "--schedule", "sequential", "--threads", str(args.threads),
                   "--config", str(REPO / "configs" / f"{name}.yaml"), "--out", str(out / name)]
            cmd += ["--device", args.device] if args.device else []
            print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
            if subprocess.run(cmd, env=env, cwd=REPO).returncode != 0:
                print(f"{name}: the run failed (see above)", file=sys.stderr)
    print(table(out, names))
    return 0 if all((out / name / "results.json").is_file() for name in names) else 1


if __name__ == "__main__":
    sys.exit(main())
