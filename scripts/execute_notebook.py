"""Execute a notebook headless and save it with its outputs, as a terminal would show them.

    python scripts/execute_notebook.py notebooks/total_recall.ipynb

Runs every cell with nbclient from the repository root (so figures land in ``docs/``), then folds
carriage-return progress bars (tqdm) to their final state, so GitHub and the Hub render a clean notebook.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]


def fold_carriage_returns(text: str) -> str:
    """What a terminal shows: on each line, only the text after the last carriage return survives."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def clean_outputs(nb) -> None:
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []  # consecutive writes to one stream are one stream, as in a terminal
        for out in cell.get("outputs", []):
            if (out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                    and merged[-1]["name"] == out["name"]):
                merged[-1]["text"] += out["text"]
            else:
                merged.append(out)
        kept = []
        for out in merged:
            if out.get("output_type") == "stream":
                text = fold_carriage_returns(out["text"])
                text = re.sub(r".*TqdmWarning: IProgress not found.*\n(.*autonotebook.*\n)?", "", text)
                if not text.strip():
                    continue
                out["text"] = text
            kept.append(out)
        cell["outputs"] = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args()
    nb = nbformat.read(args.notebook, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    print(f"executed {args.notebook} in {time.perf_counter() - start:.1f} s")
    clean_outputs(nb)
    nbformat.write(nb, args.notebook)


if __name__ == "__main__":
    main()
