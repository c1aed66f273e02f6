"""Memory variants (titans, moneta, yaad, memora, ttt_linear), inner optimizers, integration modes (mac, mag, mal)
and persistent memory, end to end on tiny random models (seconds each)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from hf_titans import HybridTitansEngine, MemoryConfig
from hf_titans import config as config_module
from hf_titans.memory import VARIANTS

REPO = Path(__file__).resolve().parent.parent
FACT = "alpha beta gamma delta epsilon zeta eta theta"
PROMPT = "alpha beta gamma"
UNRELATED = ["The capital of France is", "Once upon a time there was", "Water boils at"]
STEPS = dict(max_steps=80, learn_steps=80)


def preset(name: str, **changes) -> MemoryConfig:
    """A preset from configs/, with the step budget tiny random models need (and memory_layer=1: 2 layers)."""
    return MemoryConfig.from_file(REPO / "configs" / f"{name}.yaml").replace(**{**STEPS, "memory_layer": 1,
                                                                                 **changes})


# Every variant (its preset), a Nested-Learning inner optimizer on each l2-retention variant, and each mode.
CASES = {
    "titans": preset("titans"),
    "moneta": preset("moneta"),
    "yaad": preset("yaad"),
    "memora": preset("memora"),
    "ttt_linear": preset("ttt_linear"),
    "titans-m3": preset("titans", inner_optimizer="m3", assoc_lr=0.001),
    "yaad-momentum": preset("yaad", inner_optimizer="momentum", assoc_lr=1.0),
    "ttt_linear-gd": preset("ttt_linear", inner_optimizer="gd"),
    "mag": preset("mag"),
    "mal": preset("mal"),
    "moneta-mal": preset("moneta", mode="mal"),
    "memora-mag-persistent": preset("memora", mode="mag", n_persistent_tokens=2),
}


def state(engine: HybridTitansEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.memory.state_dict().items()}


def optimizer_state(engine: HybridTitansEngine) -> dict[str, dict]:
    names = {id(p): n for n, p in engine.memory.named_parameters()}
    return {names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for p, s in engine.optimizer.state.items() if s}


def assert_same(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same(a[k], b[k], exact)
        elif torch.is_tensor(a[k]) and exact:
            assert torch.equal(a[k], b[k]), k
        elif torch.is_tensor(a[k]):  # float32 kernels may round differently for tensors at other addresses
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------------------------------------- config
def test_config_names_match_the_registry():
    assert config_module.VARIANTS == tuple(VARIANTS)
    assert config_module.MODES == ("mac", "mag", "mal")


@pytest.mark.parametrize("changes, error, message", [
    ({"variant": "mamba"}, ValueError, "unknown variant 'mamba'; choose one of titans, moneta, yaad, memora, ttt_linear"),
    ({"mode": "mam"}, ValueError, "unknown mode 'mam'; choose one of mac, mag, mal"),
    ({"inner_optimizer": "adam"}, ValueError, "unknown inner_optimizer 'adam'; choose one of gd, momentum, m3"),
    ({"variant": "moneta", "inner_optimizer": "m3"}, ValueError, "variant 'moneta' does not take inner_optimizer"),
    ({"variant": "memora", "inner_optimizer": "gd"}, ValueError, "set inner_optimizer to null"),
    ({"inner_optimizer": 3}, TypeError, "'inner_optimizer' must be str or None"),
    ({"memory_layer": -1}, ValueError, "'memory_layer' must be >= 0"),
    ({"n_persistent_tokens": -2}, ValueError, "'n_persistent_tokens' must be >= 0"),
    ({"rehearsal_neighbours": -1}, ValueError, "'rehearsal_neighbours' must be >= 0"),
    ({"recite_tokens": -1}, ValueError, "'recite_tokens' must be >= 0"),
])
def test_bad_variant_mode_and_inner_optimizer_are_refused(changes, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        MemoryConfig(**changes)
    with pytest.raises(error, match="my.yaml"):
        MemoryConfig.from_dict(changes, source="my.yaml")


def test_presets_of_every_variant_and_mode():
    for name in (*VARIANTS, "mag", "mal"):
        cfg = MemoryConfig.from_file(REPO / "configs" / f"{name}.yaml")
        assert cfg.variant == (name if name in VARIANTS else "titans")
        assert cfg.mode == (name if name in ("mag", "mal") else "mac")


def test_memory_layer_beyond_the_model_is_refused(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="memory_layer=2 but LlamaForCausalLM has 2 decoder layers; set memory_layer"):
        HybridTitansEngine(model, tok, MemoryConfig(mode="mag", memory_layer=2))
    HybridTitansEngine(model, tok, MemoryConfig(mode="mac", memory_layer=2))  # mac does not use it


def test_architecture_follows_the_variant(tiny_llama):
    model, tok = tiny_llama
    linear = HybridTitansEngine(model, tok, MemoryConfig(variant="ttt_linear")).memory.assoc_net
    assert len(linear) == 1 and linear[0].bias is None and not linear[0].weight.any()  # W_0 = 0: f(k) = W k
    memora = HybridTitansEngine(model, tok, MemoryConfig(variant="memora")).memory.assoc_net
    weights = [m.weight for m in memora if isinstance(m, torch.nn.Linear)]
    assert all(bool((w > 0).all()) for w in weights)
    for w in weights:  # each row on the simplex scaled to sqrt(fan-in)
        torch.testing.assert_close(w.sum(-1), torch.full((w.shape[0],), w.shape[1] ** 0.5))
    mag = HybridTitansEngine(model, tok, MemoryConfig(mode="mag", memory_layer=1)).memory
    assert not hasattr(mag, "prompt_net") and hasattr(mag, "gate_net") and hasattr(mag, "layer_net")
    assert {type(p).__name__ for p in build_parts(mag)} == {"TitansOptimizer"}


def build_parts(memory):
    from hf_titans.memory import build_optimizer

    return build_optimizer(memory, memory.config).parts.values()


# ---------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("case", list(CASES))
def test_every_variant_and_mode_learns_and_keeps_locality(case, tiny_llama):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, CASES[case])
    bare = {p: engine.generate(p, max_new_tokens=6, use_memory=False) for p in [PROMPT, *UNRELATED]}
    assoc_before = {k: v.clone() for k, v in engine.memory.assoc_net.state_dict().items()}
    report = engine.teach([FACT])
    fact = report.facts[0]
    assert fact.written and fact.steps > 0
    assert fact.history[-1] < 0.2 * fact.history[0]  # the LM loss with the memory fell
    assert fact.surprise_after < 0.5 * fact.surprise_before  # the taught text's surprise (gated) dropped
    # the variant's rule wrote the associative memory, and it now finds the prompt familiar
    assert any(not torch.equal(v, engine.memory.assoc_net.state_dict()[k]) for k, v in assoc_before.items())
    assert engine.familiarity(PROMPT) >= engine.config.familiarity_threshold
    out = engine.generate(PROMPT, max_new_tokens=6)
    assert out.strip().startswith("delta"), out
    if not engine.config.n_persistent_tokens:  # persistent tokens go in front of every prompt by design
        for prompt in UNRELATED:
            assert engine.familiarity(prompt) < engine.config.familiarity_threshold
            assert engine.generate(prompt, max_new_tokens=6) == bare[prompt]
    if engine.config.variant == "memora":  # the memory stays on the simplex
        assert all(bool((p > 0).all()) for p in engine.memory.assoc_net.parameters())


@pytest.mark.parametrize("mode", ["mag", "mal"])
def test_modes_work_on_every_family(mode, tiny_lm):
    model, tok = tiny_lm
    engine = HybridTitansEngine(model, tok, MemoryConfig(mode=mode, memory_layer=1, **STEPS))
    report = engine.teach([FACT])
    assert report.facts[0].surprise_after < 0.5 * report.facts[0].surprise_before
    assert engine.generate(PROMPT, max_new_tokens=6).strip().startswith("delta")


# ---------------------------------------------------------------------------------------------- MAG / MAL
@pytest.mark.parametrize("mode", ["mag", "mal"])
def test_mag_and_mal_are_exact_no_ops_before_teaching(mode, tiny_lm):
    model, tok = tiny_lm
    engine = HybridTitansEngine(model, tok, MemoryConfig(mode=mode, memory_layer=1))
    ids, mask = engine._encode([PROMPT, "Hello world, how are you?"])
    with torch.no_grad():
        bare = model(input_ids=ids, attention_mask=mask).logits
        with engine._layer_memory(torch.ones(2, dtype=torch.bool)):  # force the memory to speak for every row
            hooked = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(hooked, bare)
    # and through the engine: nothing is familiar yet, generation is the bare model's
    assert engine.generate(PROMPT, max_new_tokens=8) == engine.generate(PROMPT, max_new_tokens=8, use_memory=False)


@pytest.mark.parametrize("mode", ["mag", "mal"])
def test_mag_and_mal_act_inside_the_layer_only_for_familiar_rows(mode, tiny_llama):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, MemoryConfig(mode=mode, memory_layer=1, **STEPS))
    engine.teach([FACT])
    ids, mask = engine._encode([PROMPT, UNRELATED[0]])
    with torch.no_grad():
        bare = model(input_ids=ids, attention_mask=mask).logits
        with engine._layer_memory(torch.tensor([True, False])):
            hooked = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(hooked[0], bare[0])
    assert torch.equal(hooked[1], bare[1])  # a silent row is untouched, bit for bit
    with pytest.raises(ValueError, match="only in mode 'mac'"):
        engine.prompt_embeds(PROMPT)


@pytest.mark.parametrize("case", ["mag", "mal", "memora-mag-persistent"])
def test_kv_cache_gives_the_same_greedy_output(case, tiny_llama):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, CASES[case])
    engine.teach([FACT])
    assert engine.familiarity(PROMPT) >= engine.config.familiarity_threshold
    prompts = [PROMPT, UNRELATED[0]]
    cached = engine.generate(prompts, max_new_tokens=8, use_cache=True)
    uncached = engine.generate(prompts, max_new_tokens=8, use_cache=False)
    assert cached == uncached
    assert cached[0].strip().startswith("delta")
    beams = engine.generate(PROMPT, max_new_tokens=8, num_beams=2, num_return_sequences=2)
    assert len(beams) == 2 and beams[0].strip().startswith("delta")
    # learning while generating: the prefill's KV cache is handed to generate() with the memory in the layer
    assert engine.generate(PROMPT, max_new_tokens=8, learn=True) == cached[0]


# ---------------------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("case", ["titans-m3", "moneta", "memora", "ttt_linear", "mal"])
def test_non_finite_gradient_writes_nothing(case, tiny_llama):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, CASES[case])
    engine.teach([FACT], max_steps=3)  # optimizer state exists (momenta, accumulators)
    before, opt_before = state(engine), optimizer_state(engine)
    param = next(engine.memory.assoc_net.parameters())
    handle = param.register_hook(lambda g: g * float("inf"))
    try:
        with pytest.warns(UserWarning, match="non-finite gradient"):
            report = engine.teach(["The quick brown fox jumps over the lazy dog."], max_steps=3)
    finally:
        handle.remove()
    assert report.skipped_nonfinite == 3 and report.steps == 0
    assert_same(state(engine), before)
    assert_same(optimizer_state(engine), opt_before)


@pytest.mark.parametrize("case", ["moneta", "titans-m3", "memora-mag-persistent"])
def test_failed_teach_restores_memory_and_rule_state(case, tiny_llama, monkeypatch):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, CASES[case])
    engine.teach([FACT], max_steps=3)
    before, opt_before = state(engine), optimizer_state(engine)
    real_step, calls = engine._step, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "_step", failing)
    with pytest.raises(RuntimeError, match="boom"):
        engine.teach(["The quick brown fox jumps over the lazy dog."])
    assert_same(state(engine), before)
    assert_same(optimizer_state(engine), opt_before)


# ---------------------------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("case", ["titans-m3", "moneta", "yaad", "memora", "ttt_linear", "mag", "mal",
                                  "memora-mag-persistent"])
def test_save_load_round_trip(case, tiny_llama, tmp_path):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, CASES[case])
    engine.teach([FACT], max_steps=20)
    prompts = [PROMPT, *UNRELATED]
    observed = (engine.generate(prompts, max_new_tokens=6), engine.familiarity(prompts), engine.surprise(prompts))
    engine.save_pretrained(tmp_path / "mem")
    loaded = HybridTitansEngine.from_pretrained(model, tmp_path / "mem", tokenizer=tok)
    assert loaded.config == engine.config
    assert_same(state(loaded), state(engine))
    assert_same(optimizer_state(loaded), optimizer_state(engine))
    assert (loaded.generate(prompts, max_new_tokens=6), loaded.familiarity(prompts), loaded.surprise(prompts)) \
        == observed
    more = ["The CEO's favorite fruit is a apple."]  # learning continues where it stopped
    engine.teach(more, max_steps=3)
    loaded.teach(more, max_steps=3)
    assert_same(state(loaded), state(engine), exact=False)
    assert_same(optimizer_state(loaded), optimizer_state(engine), exact=False)


@pytest.mark.parametrize("field, value, message", [
    ("variant", "mamba", "unknown variant 'mamba'"),
    ("mode", "mam", "unknown mode 'mam'"),
    ("inner_optimizer", "m3", "variant 'moneta' does not take inner_optimizer 'm3'"),
])
def test_checkpoint_naming_an_unknown_variant_or_mode_is_refused(field, value, message, tiny_llama, tmp_path):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, MemoryConfig(variant="moneta", max_steps=2))
    engine.teach([FACT])
    path = engine.save_pretrained(tmp_path / "mem")
    config = json.loads((Path(path) / "config.json").read_text())
    config["memory_config"][field] = value
    (Path(path) / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json memory_config: {message}"):
        HybridTitansEngine.from_pretrained(model, path, tokenizer=tok)


def test_checkpoint_whose_rule_state_does_not_match_the_variant_is_refused(tiny_llama, tmp_path):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, MemoryConfig(variant="moneta", max_steps=2))
    engine.teach([FACT])
    path = engine.save_pretrained(tmp_path / "mem")
    config = json.loads((Path(path) / "config.json").read_text())
    config["memory_config"]["variant"] = "yaad"  # same tensors, but yaad's rule keeps no accumulator
    (Path(path) / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unexpected tensor.*optimizer.assoc_net.0.weight.accumulator"):
        HybridTitansEngine.from_pretrained(model, path, tokenizer=tok)


def test_layer_memory_saved_before_the_layer_rehearsal_bank_still_loads(tiny_llama, tmp_path):
    """A mag memory saved before ``layer_rehearsal_states`` existed (no such config key, no bank tensors) loads
    with the bank off and answers as saved."""
    from safetensors.torch import load_file, save_file

    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, CASES["mag"])
    engine.teach([FACT], max_steps=20)
    assert len(engine.memory.rehearsal_states()) > 0
    path = Path(engine.save_pretrained(tmp_path / "mem"))
    config = json.loads((path / "config.json").read_text())
    del config["memory_config"]["layer_rehearsal_states"]
    (path / "config.json").write_text(json.dumps(config))
    weights = path / config["files"]["weights"]
    tensors = {k: v for k, v in load_file(weights).items() if "layer_bank" not in k}
    save_file(tensors, weights, metadata={"format": "pt"})
    loaded = HybridTitansEngine.from_pretrained(model, path, tokenizer=tok)
    assert loaded.config.layer_rehearsal_states == 0 and len(loaded.memory.rehearsal_states()) == 0
    assert loaded.generate(PROMPT, max_new_tokens=6) == engine.generate(PROMPT, max_new_tokens=6)


# ---------------------------------------------------------------------------------------------- persistent memory
def test_persistent_tokens_are_fitted_not_taught_and_saved(tiny_llama, tmp_path):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, MemoryConfig(n_persistent_tokens=3, **STEPS))
    fresh = engine.memory.persistent_tokens.detach().clone()
    history = engine.fit_persistent(["The quick brown fox jumps over the lazy dog."], steps=40)
    assert len(history) == 40 and history[-1] < 0.5 * history[0]
    fitted = engine.memory.persistent_tokens.detach().clone()
    assert not torch.equal(fitted, fresh)
    assert engine.surprise("The quick brown fox jumps over the lazy dog.") == pytest.approx(history[-1], rel=0.5)
    # the bare model (use_memory=False) has no persistent tokens; with them the output differs
    assert engine.generate("The quick brown", max_new_tokens=5) != engine.generate("The quick brown", max_new_tokens=5,
                                                                                   use_memory=False)
    engine.teach([FACT])
    assert torch.equal(engine.memory.persistent_tokens, fitted)  # test-time learning never changes them
    assert engine.generate(PROMPT, max_new_tokens=6).strip().startswith("delta")
    loaded = HybridTitansEngine.from_pretrained(model, engine.save_pretrained(tmp_path / "mem"), tokenizer=tok)
    assert torch.equal(loaded.memory.persistent_tokens, fitted)
    assert loaded.generate(PROMPT, max_new_tokens=6) == engine.generate(PROMPT, max_new_tokens=6)


def test_fit_persistent_needs_persistent_tokens_and_good_input(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="n_persistent_tokens is 0"):
        HybridTitansEngine(model, tok, MemoryConfig()).fit_persistent(["text"])
    engine = HybridTitansEngine(model, tok, MemoryConfig(n_persistent_tokens=1))
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        engine.fit_persistent(["text"], steps=0)
    with pytest.raises(ValueError, match=r"texts\[0\] is empty"):
        engine.fit_persistent([" "])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.fit_persistent(["text"], steps=1)
