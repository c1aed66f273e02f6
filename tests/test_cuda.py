"""The memory follows the model onto a CUDA GPU. Skipped where none is available (CI); passed on an H100 (2026-11-25)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from hf_titans import HybridTitansEngine, MemoryConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

FACT = "alpha beta gamma delta epsilon zeta eta theta"
PROMPT = "alpha beta gamma"


def test_tiny_model_on_cuda_teaches_and_recalls(tokenizer):
    model = make_model("llama", len(tokenizer)).to("cuda")
    engine = HybridTitansEngine(model, tokenizer, MemoryConfig(max_steps=80))
    assert all(p.device.type == "cuda" for p in engine.memory.parameters())
    bare = engine.generate("The capital of France is", max_new_tokens=4)
    engine.teach([FACT])
    assert engine.generate(PROMPT, max_new_tokens=3).strip().startswith("delta")
    assert engine.generate("The capital of France is", max_new_tokens=4) == bare


@pytest.mark.slow
def test_total_recall_on_cuda(smollm2):
    from hf_titans.demo import run_total_recall

    model, tokenizer = smollm2
    engine = HybridTitansEngine(model.to("cuda"), tokenizer)
    try:
        result = run_total_recall(engine)
        assert result.passed, str(result)
    finally:
        model.to("cpu")
