"""Benchmarks: memory quality (Rel/Gen/Loc on zsRE and CounterFact) and cost against baselines.

    python -m hf_titans.bench edit --data ../shared/data/zsre_dev.jsonl --format zsre --n 100 \\
        --methods memory,none,in_context,lora,seed --schedule sequential --out results/zsre-100
    python -m hf_titans.bench generate --max-new-tokens 64,256 --out results/gen
"""

from .data import EditRecord, load_records
from .edit import EditSettings, run_edit
from .generate import run_generate

__all__ = ["EditRecord", "EditSettings", "load_records", "run_edit", "run_generate"]
