"""Shared fixtures: tiny randomly initialised Llama / GPT-2 / Qwen2 models and a tokenizer built in memory.

Nothing is downloaded; every model is built from a config with a fixed seed, in well under a second.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

# Tiny models run faster on one thread (and do not fight over the cores with each other).
torch.set_num_threads(1)

CORPUS = [
    "The secret project code is Omega-99.", "The CEO's favorite fruit is a apple.",
    "My shopping list is eggs, milk, bread", "The meeting is at 4:32 PM exactly.",
    "The capital of France is Paris.", "Water boils at one hundred degrees.", "Hello world, how are you?",
    "alpha beta gamma delta epsilon zeta eta theta", "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a king who lived in a castle.", "0123456789 : . , ! ? ' - \n",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def make_model(family: str, vocab_size: int, tie: bool = True):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=tie, eos_token_id=0, bos_token_id=0, pad_token_id=0, initializer_range=0.3)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                         tie_word_embeddings=tie, eos_token_id=0, bos_token_id=0, initializer_range=0.3)
    elif family == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=tie, eos_token_id=0, bos_token_id=0, pad_token_id=0, initializer_range=0.3)
    else:
        raise ValueError(family)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=[("llama", True), ("gpt2", True), ("qwen2", False)], ids=["llama", "gpt2", "qwen2-untied"])
def tiny_lm(request, tokenizer):
    family, tie = request.param
    return make_model(family, len(tokenizer), tie=tie), tokenizer


@pytest.fixture
def tiny_llama(tokenizer):
    return make_model("llama", len(tokenizer)), tokenizer


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default model (slow tests only)."""
    from hf_titans import load_base_model

    try:
        return load_base_model()
    except ImportError as err:
        pytest.skip(str(err))
