"""Acceptance on the real embedded SmolLM2-135M-Instruct (slow: about a minute on 2 cores)."""

import pytest

from hf_titans import HybridTitansEngine, MemoryConfig
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


def test_a_question_before_a_taught_sentence_is_answered_from_its_recitation(smollm2):
    """Issue 8's question form. Words before a taught sentence derail a soft prompt put after them (this key comes
    back as " 6040." that way); the memory recites the sentence instead, and the model answers from the recitation
    in context. A prompt the memory does not know stays exactly the bare model's."""
    model, tokenizer = smollm2
    engine = HybridTitansEngine(model, tokenizer, MemoryConfig(verify_prefixes=True, max_steps=80))
    engine.teach(["The pass key is 60494.", "Remember it."])
    for question in ("What is the pass key? The pass key is", "I forgot something. The pass key is"):
        answer = engine.generate(question, max_new_tokens=8)
        assert engine.last_recitations == ["The pass key is 60494."], question
        assert "60494" in answer, (question, answer)
    unrelated = "What is the capital of France? The capital of France is"
    assert engine.generate(unrelated, max_new_tokens=8) == engine.generate(unrelated, max_new_tokens=8,
                                                                             use_memory=False)
    assert engine.last_recitations == [None]
