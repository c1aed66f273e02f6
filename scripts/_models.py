"""The models the reliability scripts run on: ``tiny`` (the test suite's random Llama), ``default`` or a path/id."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_model(model_name: str):
    if model_name == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import make_model, make_tokenizer

        tokenizer = make_tokenizer()
        return make_model("llama", len(tokenizer)), tokenizer
    from hf_titans import load_base_model

    return load_base_model() if model_name == "default" else load_base_model(model_name)
