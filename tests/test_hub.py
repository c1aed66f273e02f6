"""Memory checkpoints (hf_titans.hub): round trip, strictness, safety, base-model check, atomic save, swap, Hub.

Push and download run the real huggingface_hub client against tests/hub_server.py on 127.0.0.1 (no internet).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_titans import HybridTitansEngine, MemoryConfig
from hf_titans import hub as hub_module

from hub_server import HubServer

FACTS = ["The secret project code is Omega-99.", "The meeting is at 4:32 PM exactly."]
PROMPTS = ["The secret project code is", "The meeting is at", "Hello world, how are you?"]
TOKEN = "hf_test_token_for_the_local_hub"
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU they make teaching 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def taught(model, tokenizer, facts=FACTS, max_steps=None, **config) -> HybridTitansEngine:
    engine = HybridTitansEngine(model, tokenizer, MemoryConfig(**config))
    engine.teach(facts, max_steps=max_steps)
    return engine


def observe(engine: HybridTitansEngine) -> dict:
    """Greedy answers, surprise and familiarity on taught texts, their prefixes and an unrelated prompt."""
    texts = FACTS + PROMPTS
    return {"answers": engine.generate(texts, max_new_tokens=8, do_sample=False),
            "surprise": engine.surprise(texts), "familiarity": engine.familiarity(texts)}


def memory_state(engine: HybridTitansEngine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.memory.state_dict().items()}


def optimizer_state(engine: HybridTitansEngine) -> dict[str, dict]:
    names = {id(p): n for n, p in engine.memory.named_parameters()}
    return {names[id(p)]: dict(s) for p, s in engine.optimizer.state.items() if s}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        assert a[name]["step"] == b[name]["step"]
        for field in ("surprise_momentum", "second_moment"):
            if field in a[name]:
                assert torch.equal(a[name][field], b[name][field]), (name, field)


# ------------------------------------------------------------------ round trip
def test_round_trip_same_answers_surprise_familiarity_and_further_learning(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    engine = taught(model, tokenizer)
    before = observe(engine)
    assert min(before["familiarity"][:2]) >= engine.config.familiarity_threshold  # the memory speaks
    engine.save_pretrained(tmp_path / "mem")

    loaded = HybridTitansEngine.from_pretrained(model, tmp_path / "mem", tokenizer=tokenizer)
    assert loaded.config == engine.config
    assert engine.updates > 0
    assert (loaded.updates, loaded.skipped_nonfinite) == (engine.updates, engine.skipped_nonfinite)
    assert loaded.taught == []  # the taught log is opt-in
    assert_same_tensors(memory_state(loaded), memory_state(engine))
    assert_same_optimizer(optimizer_state(loaded), optimizer_state(engine))
    assert observe(loaded) == before

    # Learning continues where it stopped: momentum, second moments, step counts and the update counter are restored.
    more = ["The CEO's favorite fruit is a apple."]
    engine.teach(more, max_steps=3)
    loaded.teach(more, max_steps=3)
    assert_same_tensors(memory_state(loaded), memory_state(engine))
    assert_same_optimizer(optimizer_state(loaded), optimizer_state(engine))

    # Control: without the optimizer state the same step gives other weights, so the check above has teeth.
    cold = HybridTitansEngine.from_pretrained(model, tmp_path / "mem", tokenizer=tokenizer)
    cold._build_optimizer()
    cold.teach(more, max_steps=3)
    assert not torch.equal(cold.memory.prompt_bias, engine.memory.prompt_bias)


def test_layout_config_tensor_names_and_model_card(tiny_llama, tmp_path):
    from huggingface_hub import ModelCard

    model, tokenizer = tiny_llama
    model.config.name_or_path = "someone/tiny-llama"
    engine = taught(model, tokenizer)
    folder = engine.save_pretrained(tmp_path / "mem")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    (tmp_path / "plain").write_text("x")  # every file gets the mode a new file gets (umask), weights included
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {(tmp_path / "plain").stat().st_mode & 0o777}
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "hf_titans-memory" and config["hf_titans_version"]
    assert config["memory_config"] == engine.config.to_dict()
    weight = model.get_input_embeddings().weight
    assert config["base_model"]["name_or_path"] == "someone/tiny-llama"
    assert config["base_model"]["hidden_size"] == 64 and config["base_model"]["vocab_size"] == weight.shape[0]
    import hashlib
    assert config["base_model"]["embedding_fingerprint"] == \
        "sha256:" + hashlib.sha256(weight.detach().float().contiguous().numpy().tobytes()).hexdigest()
    assert config["engine"] == {"updates": engine.updates, "skipped_nonfinite": 0, "taught_count": 2}
    assert config["files"] == {"weights": "model.safetensors", "taught_log": None}

    tensors = load_file(folder / "model.safetensors")
    memory_keys = set(engine.memory.state_dict())
    assert memory_keys <= set(tensors)
    assert {"key_center", "key_scale", "value_proj", "embed_scale", "prompt_bias"} <= memory_keys  # buffers too
    for name, p in engine.memory.named_parameters():
        assert tensors[f"optimizer.{name}.step"].dtype == torch.int64
        assert tensors[f"optimizer.{name}.surprise_momentum"].shape == p.shape
        assert tensors[f"optimizer.{name}.second_moment"].shape == p.shape
    assert set(tensors) - memory_keys == {f"optimizer.{n}.{f}" for n, _ in engine.memory.named_parameters()
                                          for f in ("step", "surprise_momentum", "second_moment")}

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "hf_titans"
    assert card.data.base_model == "someone/tiny-llama"
    assert "hf_titans" in card.data.tags
    assert "HybridTitansEngine.from_pretrained(model" in card.text


def test_taught_log_is_opt_in_and_restored(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    engine = taught(model, tokenizer)
    engine.save_pretrained(tmp_path / "private")
    assert not (tmp_path / "private" / "taught.jsonl").exists()
    assert "Omega-99" not in "".join(p.read_text(errors="ignore") for p in (tmp_path / "private").glob("*"))

    engine.save_pretrained(tmp_path / "shared", save_taught_log=True)
    lines = (tmp_path / "shared" / "taught.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"text": t} for t in FACTS]
    loaded = HybridTitansEngine.from_pretrained(model, tmp_path / "shared", tokenizer=tokenizer)
    assert loaded.taught == FACTS


def test_fresh_memory_round_trip_without_optimizer_state(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    engine = HybridTitansEngine(model, tokenizer, MemoryConfig(n_memory_tokens=4, precondition=False))
    engine.save_pretrained(tmp_path / "mem")
    assert not any(k.startswith("optimizer.") for k in load_file(tmp_path / "mem" / "model.safetensors"))
    loaded = HybridTitansEngine.from_pretrained(model, tmp_path / "mem", tokenizer=tokenizer)
    assert loaded.config.n_memory_tokens == 4 and optimizer_state(loaded) == {}
    assert_same_tensors(memory_state(loaded), memory_state(engine))
    engine.teach(FACTS[:1], max_steps=2)
    loaded.teach(FACTS[:1], max_steps=2)
    assert_same_tensors(memory_state(loaded), memory_state(engine))
    assert all("second_moment" not in s for s in optimizer_state(loaded).values())


def test_default_tokenizer(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    HybridTitansEngine(model, tokenizer).save_pretrained(tmp_path / "mem")
    with pytest.raises(ValueError, match="pass tokenizer="):  # a model built from a config has no name_or_path
        HybridTitansEngine.from_pretrained(model, tmp_path / "mem")
    tokenizer.save_pretrained(tmp_path / "base")
    model.config.name_or_path = str(tmp_path / "base")
    loaded = HybridTitansEngine.from_pretrained(model, tmp_path / "mem")
    assert loaded.tokenizer("Hello world").input_ids == tokenizer("Hello world").input_ids


# ------------------------------------------------------------------ strictness and safety
@pytest.fixture
def saved(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    engine = taught(model, tokenizer, max_steps=3)  # optimizer state in every tensor is all these tests need
    folder = engine.save_pretrained(tmp_path / "mem")
    return engine, folder


def _rewrite_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def _rewrite_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _load(engine, folder):
    return HybridTitansEngine.from_pretrained(engine.model, folder, tokenizer=engine.tokenizer)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("prompt_bias"), r"missing tensor\(s\) prompt_bias"),
    (lambda t: t.pop("key_scale"), r"missing tensor\(s\) key_scale"),
    (lambda t: t.update({"extra.weight": torch.zeros(2)}), r"unexpected tensor\(s\) extra.weight"),
    (lambda t: t.update({"prompt_net.0.weight": torch.zeros(3, 64)}), r"'prompt_net.0.weight' is \(3, 64\)"),
    (lambda t: t.update({"value_proj": t["value_proj"].half()}), r"'value_proj' is .*float16"),
    (lambda t: t.pop("optimizer.assoc_net.0.bias.second_moment"), "incomplete optimizer state for 'assoc_net.0.bias'"),
    (lambda t: t.update({"optimizer.prompt_bias.foo": torch.zeros(1)}), r"unexpected tensor\(s\) optimizer.prompt_bias.foo"),
    (lambda t: t["prompt_bias"].__setitem__((0, 0), float("nan")), "'prompt_bias' holds NaN"),
])
def test_strict_tensors(saved, edit, message):
    engine, folder = saved
    _rewrite_tensors(folder, edit)
    with pytest.raises(ValueError, match=message):
        _load(engine, folder)


@pytest.mark.parametrize("edit, error, message", [
    (lambda c: c["memory_config"].update(n_memory_token=4), ValueError, "unknown config key.*'n_memory_token'"),
    (lambda c: c.update(comment="hi"), ValueError, "unknown key.*'comment'"),
    (lambda c: c["base_model"].pop("embedding_fingerprint"), ValueError, "missing key.*'embedding_fingerprint'"),
    (lambda c: c["memory_config"].update(n_memory_tokens=4), ValueError, r"'prompt_bias' is \(8, 64\).*expected \(4, 64\)"),
    (lambda c: c["memory_config"].update(lr="fast"), TypeError, "'lr' must be float"),
    (lambda c: c["engine"].update(updates=-1), ValueError, "engine.updates must be an integer >= 0"),
    (lambda c: c.update(format="something-else"), ValueError, "not an hf_titans memory config"),
    (lambda c: c.update(format_version=99), ValueError, "newer hf_titans"),
])
def test_tampered_config(saved, edit, error, message):
    engine, folder = saved
    _rewrite_config(folder, edit)
    with pytest.raises(error, match=message):
        _load(engine, folder)


def test_config_with_duplicate_keys_or_bad_json(saved):
    engine, folder = saved
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"format": "hf_titans-memory",',
                                                     '"format": "hf_titans-memory", "format": "hf_titans-memory",'))
    with pytest.raises(ValueError, match="duplicate key 'format'"):
        _load(engine, folder)
    (folder / "config.json").write_text(text[:-20])
    with pytest.raises(ValueError, match="not valid JSON"):
        _load(engine, folder)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/model.safetensors", "sub/model.safetensors",
                                  "..\\model.safetensors", "C:model.safetensors", ".hidden.safetensors"])
def test_file_names_in_config_cannot_escape_the_folder(saved, tmp_path, name):
    engine, folder = saved
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((folder / "model.safetensors").read_bytes())  # a valid file there must still be refused
    _rewrite_config(folder, lambda c: c["files"].update(weights=name))
    with pytest.raises(ValueError, match="must be a plain file name inside the memory folder"):
        _load(engine, folder)
    _rewrite_config(folder, lambda c: c["files"].update(weights="model.safetensors", taught_log="../" + "log.jsonl"))
    with pytest.raises(ValueError, match="files.taught_log .* plain file name"):
        _load(engine, folder)


class _Trap:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)


def test_pickle_planted_as_safetensors_is_refused_and_never_unpickled(saved, tmp_path, no_unpickling):
    engine, folder = saved
    marker = tmp_path / "pwned"
    (folder / "model.safetensors").write_bytes(pickle.dumps({"prompt_bias": _Trap(str(marker))}))
    with pytest.raises(ValueError, match="not a valid safetensors file.*never unpickles"):
        _load(engine, folder)
    assert not marker.exists()


def test_pickle_weights_named_in_config_or_beside_it_are_refused(saved, tmp_path, no_unpickling):
    engine, folder = saved
    marker = tmp_path / "pwned"
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin: pickle files are refused"):
        _load(engine, folder)
    _rewrite_config(folder, lambda c: c["files"].update(weights="pytorch_model.bin"))
    with pytest.raises(ValueError, match="must be a .safetensors file.*never unpickles"):
        _load(engine, folder)
    assert not marker.exists()


def test_missing_folder_config_and_revision_errors(saved, tmp_path):
    engine, folder = saved
    with pytest.raises(FileNotFoundError, match="not a Hub repo id"):
        _load(engine, tmp_path / "does" / "not" / "exist")
    with pytest.raises(ValueError, match="revision='v1' applies to Hub repos"):
        HybridTitansEngine.from_pretrained(engine.model, folder, tokenizer=engine.tokenizer, revision="v1")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        _load(engine, folder)
    with pytest.raises(NotADirectoryError):
        _load(engine, folder / "model.safetensors")


# ------------------------------------------------------------------ base-model check
def test_base_mismatch_names_both_models_and_the_override(saved, tokenizer, caplog):
    from conftest import make_model

    engine, folder = saved
    engine.model.config.name_or_path = "org/tiny-llama"
    engine.save_pretrained(folder)
    other = make_model("gpt2", len(tokenizer))  # same hidden size (64), other embeddings
    other.config.name_or_path = "org/tiny-gpt2"
    with pytest.raises(ValueError) as info:
        HybridTitansEngine.from_pretrained(other, folder, tokenizer=tokenizer)
    message = str(info.value)
    assert "'org/tiny-llama'" in message and "'org/tiny-gpt2'" in message
    assert "ignore_base_mismatch=True" in message and "embeddings" in message

    with caplog.at_level(logging.WARNING, logger="hf_titans.hub"):
        forced = HybridTitansEngine.from_pretrained(other, folder, tokenizer=tokenizer, ignore_base_mismatch=True)
    assert "ignore_base_mismatch=True" in caplog.text
    assert_same_tensors(memory_state(forced), memory_state(engine))

    target = HybridTitansEngine(other, tokenizer)
    before = memory_state(target)
    with pytest.raises(ValueError, match="ignore_base_mismatch=True"):
        target.load_memory(folder)
    assert_same_tensors(memory_state(target), before)
    target.load_memory(folder, ignore_base_mismatch=True)
    assert_same_tensors(memory_state(target), memory_state(engine))


def test_base_with_other_hidden_size_fails_even_with_override(saved, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    engine, folder = saved
    torch.manual_seed(0)
    narrow = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=0, bos_token_id=0, pad_token_id=0))
    narrow.config.name_or_path = "org/narrow"
    for flag in (False, True):
        with pytest.raises(ValueError, match=r"hidden size 64.*'org/narrow' \(hidden size 32\).*ignore_base_mismatch"):
            HybridTitansEngine.from_pretrained(narrow, folder, tokenizer=tokenizer, ignore_base_mismatch=flag)


def test_fingerprint_tracks_in_place_changes_of_the_embeddings(saved):
    engine, folder = saved
    first = hub_module.embedding_fingerprint(engine.model)
    assert hub_module.embedding_fingerprint(engine.model) == first  # cached
    with torch.no_grad():
        engine.model.get_input_embeddings().weight[0, 0] += 1.0
    assert hub_module.embedding_fingerprint(engine.model) != first
    with pytest.raises(ValueError, match="embeddings differ"):
        engine.load_memory(folder)


# ------------------------------------------------------------------ atomic save
def test_failed_save_leaves_the_previous_checkpoint_intact(saved, monkeypatch):
    import safetensors.torch

    engine, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    values = observe(_load(engine, folder))
    engine.teach(["The CEO's favorite fruit is a apple."], max_steps=2)
    real_save = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a half-written file, then the crash
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        engine.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no temp folders left
    assert observe(_load(engine, folder)) == values

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    engine.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["engine"]["updates"] == engine.updates


def test_failed_rename_puts_the_previous_checkpoint_back(saved, monkeypatch):
    engine, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    engine.teach(["The CEO's favorite fruit is a apple."], max_steps=2)
    real_replace = os.replace

    def flaky_replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(hub_module.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename failed"):
        engine.save_pretrained(folder)
    monkeypatch.setattr(hub_module.os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_save_refuses_to_replace_foreign_folders(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    engine = HybridTitansEngine(model, tokenizer)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds notes.txt"):
        engine.save_pretrained(tmp_path / "project")
    assert (tmp_path / "project" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        engine.save_pretrained(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    engine.save_pretrained(tmp_path / "empty")  # an empty folder is fine
    engine.save_pretrained(tmp_path / "empty")  # and so is an earlier memory
    assert (tmp_path / "empty" / "model.safetensors").is_file()


# ------------------------------------------------------------------ load_memory (swap)
def test_load_memory_swaps_without_touching_the_base_model(tiny_llama, tmp_path):
    from conftest import weights_hash

    model, tokenizer = tiny_llama
    base_hash = weights_hash(model)
    a = taught(model, tokenizer, facts=FACTS[:1])
    a.save_pretrained(tmp_path / "a", save_taught_log=True)
    seen_a = observe(a)
    b = taught(model, tokenizer, facts=FACTS[1:], n_memory_tokens=4)
    b.save_pretrained(tmp_path / "b")
    seen_b = observe(b)

    engine = HybridTitansEngine(model, tokenizer)
    engine.load_memory(tmp_path / "a")
    assert observe(engine) == seen_a and engine.taught == FACTS[:1]
    engine.load_memory(tmp_path / "b")
    assert engine.config.n_memory_tokens == 4 and engine.memory.prompt_bias.shape[0] == 4
    assert observe(engine) == seen_b and engine.taught == []
    assert engine.model is model and weights_hash(model) == base_hash

    # A failing load leaves everything as it was.
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in (tmp_path / "a").iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    _rewrite_tensors(bad, lambda t: t.pop("assoc_net.2.bias"))
    kept = (engine.memory, engine.optimizer, engine.config, engine.updates, list(engine.taught))
    with pytest.raises(ValueError, match="missing tensor"):
        engine.load_memory(bad)
    assert (engine.memory, engine.optimizer, engine.config, engine.updates, engine.taught) == kept
    assert observe(engine) == seen_b


def test_load_memory_takes_the_engine_lock(saved):
    engine, folder = saved
    other = HybridTitansEngine(engine.model, engine.tokenizer)
    held, release = threading.Event(), threading.Event()

    def hold():
        with other._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    original = other.memory
    loader = threading.Thread(target=other.load_memory, args=(folder,))
    loader.start()
    loader.join(1.0)
    assert loader.is_alive() and other.memory is original  # waits for the lock
    release.set()
    loader.join(10)
    holder.join(10)
    assert other.memory is not original
    assert_same_tensors(memory_state(other), memory_state(engine))


# ------------------------------------------------------------------ the Hub (a local fake on 127.0.0.1)
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub on 127.0.0.1; huggingface_hub (already imported) is pointed at it, with a private HF_HOME."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    with HubServer(token=TOKEN) as server:
        # huggingface_hub reads these environment variables at import time, so its constants are patched as well.
        for key, value in {"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
                           "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
            monkeypatch.setenv(key, value)
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(key, raising=False)
        for name, value in {"ENDPOINT": server.url,
                            "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
                            "HF_HUB_DISABLE_XET": True, "HF_HUB_OFFLINE": False, "HF_HOME": str(home),
                            "HF_HUB_CACHE": str(home / "hub"), "HF_TOKEN_PATH": str(home / "token"),
                            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens")}.items():
            monkeypatch.setattr(constants, name, value)
        yield server


def test_push_and_download_through_the_hub_api(tiny_llama, hub):
    model, tokenizer = tiny_llama
    engine = taught(model, tokenizer)
    seen = observe(engine)
    commit = engine.push_to_hub("tester/omega-memory", private=True, token=TOKEN)
    assert commit.oid == hub.repos["tester/omega-memory"].branches["main"]
    assert hub.repos["tester/omega-memory"].private
    files = hub.files("tester/omega-memory")
    assert sorted(files) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert files["model.safetensors"].lfs and not files["config.json"].lfs  # uploaded through Git LFS
    assert ("PUT", f"/__lfs/{files['model.safetensors'].sha256}") in hub.requests
    assert ("POST", "/api/models/tester/omega-memory/commit/main") in hub.requests
    assert b"HybridTitansEngine.from_pretrained(model, \"tester/omega-memory\"" in files["README.md"].data

    loaded = HybridTitansEngine.from_pretrained(model, "tester/omega-memory", tokenizer=tokenizer, token=TOKEN)
    assert observe(loaded) == seen
    assert_same_optimizer(optimizer_state(loaded), optimizer_state(engine))
    assert any(m == "GET" and p.endswith("/resolve/" + commit.oid + "/model.safetensors") for m, p in hub.requests)

    with pytest.raises(FileNotFoundError, match="private repos need token"):
        HybridTitansEngine.from_pretrained(model, "tester/omega-memory", tokenizer=tokenizer, token=False)
    with pytest.raises(FileNotFoundError, match="no Hub repo 'tester/nothing-here'"):
        HybridTitansEngine.from_pretrained(model, "tester/nothing-here", tokenizer=tokenizer, token=TOKEN)


def test_hub_revisions_taught_log_and_swap(tiny_llama, hub):
    model, tokenizer = tiny_llama
    engine = taught(model, tokenizer, facts=FACTS[:1])
    first = engine.push_to_hub("tester/mem", token=TOKEN, save_taught_log=True, commit_message="first fact")
    seen_first = observe(engine)
    assert "taught.jsonl" in hub.files("tester/mem")
    engine.teach(FACTS[1:])
    second = engine.push_to_hub("tester/mem", token=TOKEN)
    assert hub.commit_messages == ["first fact", "Upload hf_titans memory"]
    assert "taught.jsonl" not in hub.files("tester/mem")  # not opted in: the earlier log is removed

    latest = HybridTitansEngine.from_pretrained(model, "tester/mem", tokenizer=tokenizer)
    assert latest.taught == [] and latest.updates == engine.updates
    old = HybridTitansEngine.from_pretrained(model, "tester/mem", tokenizer=tokenizer, revision=first.oid)
    assert old.taught == FACTS[:1] and observe(old) == seen_first

    latest.load_memory("tester/mem", revision=first.oid)
    assert observe(latest) == seen_first
    latest.load_memory("tester/mem", revision=second.oid)
    assert_same_tensors(memory_state(latest), memory_state(engine))
    with pytest.raises(FileNotFoundError, match="has no revision 'nope'"):
        latest.load_memory("tester/mem", revision="nope")
    assert_same_tensors(memory_state(latest), memory_state(engine))

    # Offline, the cached snapshot is enough.
    offline = HybridTitansEngine.from_pretrained(model, "tester/mem", tokenizer=tokenizer, local_files_only=True)
    assert_same_tensors(memory_state(offline), memory_state(engine))


def test_hub_repo_that_is_not_a_memory(tiny_llama, hub, tmp_path):
    from huggingface_hub import HfApi

    model, tokenizer = tiny_llama
    api = HfApi()
    api.create_repo("tester/plain-model", token=TOKEN)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "pytorch_model.bin").write_bytes(b"not for us")
    api.upload_folder(repo_id="tester/plain-model", folder_path=tmp_path / "plain", token=TOKEN)
    with pytest.raises(FileNotFoundError, match="not a complete hf_titans memory"):
        HybridTitansEngine.from_pretrained(model, "tester/plain-model", tokenizer=tokenizer)
    assert not any(p.endswith("pytorch_model.bin") and m == "GET" for m, p in hub.requests)


SUBPROCESS_LOAD = r"""
import json, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from conftest import make_model, make_tokenizer
from hf_titans import HybridTitansEngine
from test_hub import observe
tokenizer = make_tokenizer()
model = make_model("llama", len(tokenizer))
engine = HybridTitansEngine.from_pretrained(model, {source!r}, tokenizer=tokenizer, **{kwargs!r})
print(json.dumps(observe(engine)))
"""


def _run_fresh_process(script: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_download_in_a_fresh_process_configured_by_environment_only(tiny_llama, hub, tmp_path):
    """No patching in the child: HF_ENDPOINT, HF_HUB_DISABLE_XET and HF_HOME are all it gets."""
    model, tokenizer = tiny_llama
    engine = taught(model, tokenizer)
    engine.push_to_hub("tester/fresh", private=True, token=TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "child_home"),
               HF_TOKEN=TOKEN, HF_HUB_DISABLE_PROGRESS_BARS="1")
    seen = _run_fresh_process(SUBPROCESS_LOAD.format(tests=str(TESTS), source="tester/fresh", kwargs={}), env)
    assert seen == json.loads(json.dumps(observe(engine)))
    assert (tmp_path / "child_home" / "hub" / "models--tester--fresh").is_dir()


@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="set HF_TOKEN to test against the real Hugging Face Hub")
def test_real_hub_round_trip(tiny_llama):
    from huggingface_hub import HfApi

    model, tokenizer = tiny_llama
    engine = taught(model, tokenizer)
    api = HfApi()
    repo_id = f"{api.whoami()['name']}/hf-titans-test-{uuid.uuid4().hex[:8]}"
    try:
        engine.push_to_hub(repo_id, private=True)
        loaded = HybridTitansEngine.from_pretrained(model, repo_id, tokenizer=tokenizer)
        assert observe(loaded) == observe(engine)
    finally:
        api.delete_repo(repo_id, missing_ok=True)


# ------------------------------------------------------------------ the real default model
SMOLLM2_FRESH = r"""
import json, sys
import torch
torch.set_num_threads(1)  # as in the parent test process: same reduction order
from hf_titans import HybridTitansEngine, load_base_model
model, tokenizer = load_base_model()
engine = HybridTitansEngine.from_pretrained(model, {folder!r})
prompts, facts = {prompts!r}, {facts!r}
print(json.dumps({{"answers": engine.generate(prompts, max_new_tokens=12, do_sample=False),
                  "surprise": engine.surprise(facts), "familiarity": engine.familiarity(prompts),
                  "updates": engine.updates}}))
"""


@pytest.mark.slow
def test_smollm2_round_trip_in_a_fresh_process(smollm2, tmp_path):
    model, tokenizer = smollm2
    facts = ["The secret project code is Omega-99.", "Zorblat's favourite colour is turquoise."]
    prompts = ["The secret project code is", "Zorblat's favourite colour is", "The capital of France is"]
    engine = HybridTitansEngine(model, tokenizer)
    engine.teach(facts)
    before = {"answers": engine.generate(prompts, max_new_tokens=12, do_sample=False),
              "surprise": engine.surprise(facts), "familiarity": engine.familiarity(prompts)}
    assert min(before["familiarity"][:2]) >= engine.config.familiarity_threshold  # the memory speaks for them
    folder = engine.save_pretrained(tmp_path / "smollm2-memory")
    after = _run_fresh_process(SMOLLM2_FRESH.format(folder=str(folder), prompts=prompts, facts=facts),
                               dict(os.environ))
    assert after["answers"] == before["answers"]
    assert after["updates"] == engine.updates
    assert after["surprise"] == pytest.approx(before["surprise"], abs=1e-6)
    assert after["familiarity"] == pytest.approx(before["familiarity"], abs=1e-6)


@pytest.mark.slow
def test_smollm2_default_artifact_stays_a_few_mb(smollm2, tmp_path):
    """Size guard, with the optimizer state filled (one update step fills every tensor of it).

    Issue 3's target is 10 MB; the default measures 10.55 MB since the 0.59 MB rehearsal buffer was added
    (scripts/measure_artifact.py prints the figure). This guards against growth beyond 11 MB."""
    model, tokenizer = smollm2
    engine = HybridTitansEngine(model, tokenizer)
    engine.teach(["The secret project code is Omega-99."], max_steps=1)
    folder = engine.save_pretrained(tmp_path / "memory")
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    largest = sorted(((t.numel() * t.element_size(), n) for n, t in load_file(folder / "model.safetensors").items()),
                     reverse=True)[:4]
    assert sum(sizes.values()) <= 11_000_000, f"artifact {sum(sizes.values()) / 1e6:.2f} MB; largest {largest}"
