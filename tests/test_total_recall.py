"""Acceptance on the real embedded SmolLM2-135M-Instruct (slow: about a minute on 2 cores)."""

import pytest

from hf_titans import HybridTitansEngine
from hf_titans.demo import run_total_recall

pytestmark = pytest.mark.slow


def test_total_recall_on_default_model(smollm2):
    model, tokenizer = smollm2
    result = run_total_recall(HybridTitansEngine(model, tokenizer))
    print(result)
    assert all(result.recalled.values()), result
    assert all(result.unchanged.values()), result
    for fact in result.report.facts:
        assert fact.written and fact.surprise_after < 0.5
