"""Serving memories: many memories on one served base model (vLLM), offline and behind an OpenAI-compatible front.

* :class:`MemoryBank` (``memories.py``): named memories on one frozen base model; prompt embeddings per prompt and
  memory, memories reloaded when their checkpoint changes. Needs only torch and transformers.
* :class:`MemoryLLM` (``vllm.py``): batches of prompts, each with its memory, through a ``vllm.LLM``.
* :func:`create_app` (``app.py``): the FastAPI front before ``vllm serve --enable-prompt-embeds``.
* ``python -m hf_titans.serving`` / ``hf-titans serve`` (``server.py``): both processes from one command.

Nothing here is imported by ``import hf_titans``, and vLLM, FastAPI and httpx are imported only where used.
"""

from __future__ import annotations

from typing import Any

from .memories import MemoryBank, PromptEmbeds, UnknownMemoryError, load_bank

__all__ = ["MemoryBank", "PromptEmbeds", "UnknownMemoryError", "load_bank", "MemoryLLM", "MemoryOutput", "VLLMServer",
           "make_llm", "vllm_inputs", "default_model_dir", "create_app", "encode_prompt_embeds",
           "decode_prompt_embeds", "main"]

_LAZY = {"MemoryLLM": "vllm", "MemoryOutput": "vllm", "VLLMServer": "vllm", "make_llm": "vllm",
         "vllm_inputs": "vllm", "default_model_dir": "vllm", "create_app": "app", "encode_prompt_embeds": "app",
         "decode_prompt_embeds": "app", "main": "server"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
