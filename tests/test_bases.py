"""The memory rides on the bases users already run: bf16/fp16, PEFT adapters, accelerate offload, bitsandbytes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import make_model, weights_hash
from hf_titans import HybridTitansEngine, MemoryConfig

FACT = "alpha beta gamma delta epsilon zeta eta theta"
PROMPT = "alpha beta gamma"
TINY = MemoryConfig(max_steps=80)


def _teach_and_recall(model, tok):
    engine = HybridTitansEngine(model, tok, TINY)
    bare = engine.generate("The capital of France is", max_new_tokens=4)
    report = engine.teach([FACT])
    assert report.facts[0].surprise_after < 0.5 * report.facts[0].surprise_before
    for tensor in engine.memory.state_dict().values():
        assert torch.isfinite(tensor.float()).all()
    assert all(p.dtype == torch.float32 for p in engine.memory.parameters())  # the memory learns in fp32
    assert engine.generate(PROMPT, max_new_tokens=3).strip().startswith("delta")
    assert engine.generate("The capital of France is", max_new_tokens=4) == bare
    return engine


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_base_with_fp32_memory(tokenizer, dtype):
    model = make_model("llama", len(tokenizer)).to(dtype)
    before = weights_hash(model)
    _teach_and_recall(model, tokenizer)
    assert weights_hash(model) == before


def test_peft_wrapped_base_keeps_adapter_frozen(tokenizer):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model("llama", len(tokenizer)),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = weights_hash(model)
    _teach_and_recall(model, tokenizer)
    assert weights_hash(model) == before
    assert not any(p.requires_grad for p in model.parameters())


def test_memory_written_through_an_adapter_is_refused_without_it(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    plain = make_model("llama", len(tokenizer))
    torch.manual_seed(0)
    adapted = peft.get_peft_model(make_model("llama", len(tokenizer)),
                                  peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    engine = HybridTitansEngine(adapted, tokenizer, TINY)
    engine.teach([FACT])
    engine.save_pretrained(tmp_path / "with-adapter")
    # Same embeddings (same seed), so only the adapter fingerprint can tell the two bases apart.
    with pytest.raises(ValueError, match="with a PEFT adapter .* has none"):
        HybridTitansEngine.from_pretrained(plain, tmp_path / "with-adapter", tokenizer=tokenizer)
    reloaded = HybridTitansEngine.from_pretrained(adapted, tmp_path / "with-adapter", tokenizer=tokenizer)
    assert reloaded.generate(PROMPT, max_new_tokens=3) == engine.generate(PROMPT, max_new_tokens=3)
    # The same adapter loaded through transformers' own integration is the same base.
    adapted.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    integrated = make_model("llama", len(tokenizer))
    integrated.load_adapter(tmp_path / "adapter")
    assert HybridTitansEngine.from_pretrained(integrated, tmp_path / "with-adapter", tokenizer=tokenizer) is not None
    HybridTitansEngine(plain, tokenizer, TINY).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="without a PEFT adapter"):
        HybridTitansEngine.from_pretrained(adapted, tmp_path / "plain", tokenizer=tokenizer)
    assert HybridTitansEngine.from_pretrained(adapted, tmp_path / "plain", tokenizer=tokenizer,
                                              ignore_base_mismatch=True) is not None


def test_accelerate_device_map_with_disk_offload(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    make_model("llama", len(tokenizer)).save_pretrained(tmp_path / "base")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=device_map,
                                                 offload_folder=tmp_path / "offload")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    engine = _teach_and_recall(model, tokenizer)
    # Same outputs as without the device map (the memory is read the same way on both).
    twin = HybridTitansEngine(plain, tokenizer, TINY)
    twin.memory.load_state_dict(engine.memory.state_dict())
    assert twin.generate(PROMPT, max_new_tokens=3) == engine.generate(PROMPT, max_new_tokens=3)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_bitsandbytes_quantized_base(tokenizer, tmp_path, mode):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_model("llama", len(tokenizer)).save_pretrained(tmp_path / "base")
    quant = (BitsAndBytesConfig(load_in_8bit=True) if mode == "8bit"
             else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant)
    _teach_and_recall(model, tokenizer)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_4bit_weights_repacked_for_cpu_inference_are_restored_so_writes_learn(tokenizer, tmp_path):
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for an inference-only kernel (no gradient
    reaches the soft prompt). Whatever this machine's CPU, pack them as it would, then wrap: the engine unpacks
    them to the exact original bytes, stops further repacking, and a write learns."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_model("llama", len(tokenizer)).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers
    original = [m.weight.data.clone() for m in layers]
    for m in layers:
        m.support_avx512bf16_for_cpu = True
        m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
        assert m.weight.quant_state.packing_format_for_cpu
    engine = _teach_and_recall(model, tokenizer)  # wraps the model first, then writes and recalls
    for m, data in zip(layers, original):
        assert not m.support_avx512bf16_for_cpu and not m.weight.quant_state.packing_format_for_cpu
        assert torch.equal(m.weight.data, data)
    assert engine.updates > 0
