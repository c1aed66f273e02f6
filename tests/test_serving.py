"""Serving without vLLM: the MemoryBank (prompt embeddings equal to the engine's, several memories on one base,
reloading), request routing, and the OpenAI-compatible front against a transformers stand-in for vLLM's server
(tests/fake_vllm.py), driven by the OpenAI Python client. The real vLLM is in tests/test_serving_vllm.py."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_model
from hf_titans import HybridTitansEngine, MemoryConfig
from hf_titans.serving import MemoryBank, UnknownMemoryError

FACTS = {"greek": "alpha beta gamma delta epsilon zeta eta theta",
         "fox": "The quick brown fox jumps over the lazy dog."}
PROMPTS = {"greek": "alpha beta gamma", "fox": "The quick brown fox"}
UNRELATED = "The capital of France is"
TINY = MemoryConfig(max_steps=80, learn_steps=80)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tokenizer):
    return make_model("llama", len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def engines(base):
    """Two memories on one tiny base model, each taught one fact."""
    model, tok = base
    out = {}
    for name, fact in FACTS.items():
        engine = HybridTitansEngine(model, tok, TINY)
        engine.teach([fact])
        assert engine.familiarity(PROMPTS[name]) >= engine.config.familiarity_threshold
        assert engine.familiarity(UNRELATED) < engine.config.familiarity_threshold
        out[name] = engine
    return out


@pytest.fixture
def saved(engines, tmp_path):
    root = tmp_path / "memories"
    for name, engine in engines.items():
        engine.save_pretrained(root / name)
    return root


def greedy(engine: HybridTitansEngine, prompt: str, n: int = 8) -> str:
    return engine.generate(prompt, max_new_tokens=n, do_sample=False)


# ------------------------------------------------------------------ the core never imports serving
def test_core_imports_without_serving_or_vllm():
    code = ("import sys, hf_titans, hf_titans.engine, hf_titans.hub, hf_titans.cli\n"
            "bad = [m for m in ('vllm', 'hf_titans.serving', 'fastapi', 'httpx', 'uvicorn') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "import hf_titans.serving\n"
            "assert 'vllm' not in sys.modules and 'fastapi' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# ------------------------------------------------------------------ the bank
def test_bank_prompt_embeds_equal_engine_prompt_embeds(tiny_lm):
    model, tok = tiny_lm
    # The bank puts the soft prompt before a recognised last sentence; it does not recite (docs/serving.md).
    engine = HybridTitansEngine(model, tok, TINY.replace(recite_tokens=0))
    engine.teach([FACTS["greek"]])
    bank = MemoryBank(model, tok)
    bank.add("m", engine)
    two_sentences = "Once upon a time there was a king.\n" + PROMPTS["greek"]  # read by its last sentence
    item = bank.embed([two_sentences], "m")[0]
    assert item.speaks and item.insert_at > 0  # the soft prompt stands before the last sentence
    assert tok.decode(item.token_ids[item.insert_at:]).strip() == PROMPTS["greek"]
    for prompt in (PROMPTS["greek"], FACTS["greek"], UNRELATED, "Hello", two_sentences):
        item = bank.embed([prompt], "m")[0]
        assert torch.equal(item.embeds, engine.prompt_embeds(prompt).cpu()), prompt
        assert item.speaks == (engine.familiarity(prompt) >= engine.config.familiarity_threshold)
        assert item.familiarity == pytest.approx(engine.familiarity(prompt), abs=1e-6)
    assert bank.embed([PROMPTS["greek"]], "m")[0].speaks
    silent = bank.embed([UNRELATED], "m")[0]
    assert not silent.speaks and silent.n_soft == 0
    assert torch.equal(bank.prompt_embeds(UNRELATED), engine.prompt_embeds(UNRELATED, use_memory=False))


def test_bank_embeds_generate_what_the_engine_generates(base, engines):
    """Greedy generation from the bank's embeddings (what vLLM gets) equals engine.generate, memory or not."""
    model, tok = base
    bank = MemoryBank(model, tok)
    for name, engine in engines.items():
        bank.add(name, engine)
    for name, engine in engines.items():
        for prompt in (PROMPTS[name], UNRELATED):
            item = bank.embed([prompt], name)[0]
            out = model.generate(inputs_embeds=item.embeds[None], attention_mask=torch.ones(1, len(item.embeds),
                                 dtype=torch.long), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            assert tok.decode(out[0], skip_special_tokens=True) == greedy(engine, prompt)
    assert greedy(engines["greek"], PROMPTS["greek"]).strip().startswith("delta")


def test_several_memories_in_one_batch(base, engines, saved):
    model, tok = base
    bank = MemoryBank(model, tok)
    bank.add_directory(saved)
    assert bank.names() == sorted(FACTS)
    prompts = [PROMPTS["greek"], PROMPTS["fox"], PROMPTS["greek"], UNRELATED, PROMPTS["fox"], "alpha beta"]
    memories = ["greek", "fox", "fox", "greek", None, "greek"]
    items = bank.embed(prompts, memories)
    assert [i.memory for i in items] == memories
    assert [i.speaks for i in items] == [True, True, False, False, False, True]
    for prompt, memory, item in zip(prompts, memories, items):
        expected = (engines[memory].prompt_embeds(prompt) if memory else
                    engines["greek"].prompt_embeds(prompt, use_memory=False))
        # prompts of one length share a batched early-layer pass: equal up to float rounding
        torch.testing.assert_close(item.embeds, expected, rtol=1e-5, atol=1e-5)


def test_memory_sources_and_errors(base, engines, saved, tokenizer):
    model, tok = base
    bank = MemoryBank(model, tok)
    bank.add("folder", saved / "greek")
    bank.add("engine", engines["greek"])
    bank.add("bare", copy.deepcopy(engines["greek"].memory))
    a, b, c = (bank.prompt_embeds(PROMPTS["greek"], m) for m in ("folder", "engine", "bare"))
    assert torch.equal(b, c)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # the same weights, loaded: equal up to rounding
    with pytest.raises(ValueError, match="already loaded"):
        bank.add("folder", saved / "fox")
    bank.add("folder", saved / "fox", replace=True)
    assert bank.embed([PROMPTS["fox"]], "folder")[0].speaks
    with pytest.raises(UnknownMemoryError, match="no memory named 'nope'"):
        bank.embed(["x"], "nope")
    with pytest.raises(ValueError, match="memory name"):
        bank.add("bad name", saved / "fox")
    with pytest.raises(FileNotFoundError):
        bank.add("missing", saved / "does-not-exist")
    with pytest.raises(ValueError, match="empty"):
        bank.embed(["  "], "engine")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bank.embed([[10 ** 6]], "engine")
    with pytest.raises(ValueError, match="longer than the context window"):
        bank.embed([[1] * 300], "engine")
    assert torch.equal(bank.prompt_embeds([5, 6, 7], "engine"),
                       engines["greek"].model.get_input_embeddings()(torch.tensor([5, 6, 7])))
    # a memory written through another base model is refused
    other = HybridTitansEngine(make_model("qwen2", len(tokenizer), tie=False), tokenizer, TINY)
    other.save_pretrained(saved / "other")
    with pytest.raises(ValueError, match="input embeddings differ|hidden size"):
        bank.add("other", saved / "other")
    bank.remove("bare")
    assert "bare" not in bank.names()
    # a memory inside the layers cannot travel as prompt embeddings: refused, from a folder and from an engine
    layered = HybridTitansEngine(model, tok, TINY.replace(mode="mag", memory_layer=1))
    layered.save_pretrained(saved / "layered")
    for source in (saved / "layered", layered):
        with pytest.raises(ValueError, match="mode='mag' memory"):
            bank.add("layered", source)
    assert "layered" not in bank.names()


def test_folder_reloads_when_its_checkpoint_changes(base, engines, tmp_path):
    model, tok = base
    folder = tmp_path / "live"
    engine = HybridTitansEngine(model, tok, TINY)
    engine.save_pretrained(folder)  # an empty memory: silent everywhere
    bank = MemoryBank(model, tok, check_interval=0)
    bank.add("live", folder)
    assert not bank.embed([PROMPTS["greek"]], "live")[0].speaks
    assert bank.info("live")["version"] == 1
    engines["greek"].save_pretrained(folder)  # teach elsewhere, save over it: picked up on the next request
    item = bank.embed([PROMPTS["greek"]], "live")[0]
    assert item.speaks and item.version == 2
    loaded = HybridTitansEngine.from_pretrained(model, folder, tokenizer=tok)
    assert torch.equal(item.embeds, loaded.prompt_embeds(PROMPTS["greek"]))
    assert bank.refresh("live") == {"live": "unchanged"}
    assert bank.refresh("live", force=True) == {"live": "reloaded"}
    # a damaged checkpoint is reported and the last good version keeps serving
    (folder / "config.json").write_text("{not json")
    result = bank.refresh("live")["live"]
    assert result.startswith("error: ValueError")
    assert bank.info("live")["last_error"] and bank.embed([PROMPTS["greek"]], "live")[0].speaks
    engines["fox"].save_pretrained(tmp_path / "fox")
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "fox", folder)
    item = bank.embed([PROMPTS["fox"]], "live")[0]
    assert item.speaks and bank.info("live")["last_error"] is None


def test_directory_picks_up_new_and_removed_memories(base, engines, tmp_path):
    model, tok = base
    root = tmp_path / "dir"
    root.mkdir()
    (root / "notes").mkdir()  # not a memory: ignored
    bank = MemoryBank(model, tok, check_interval=0)
    assert bank.add_directory(root) == []
    engines["greek"].save_pretrained(root / "greek")
    assert "greek" in bank.names() and bank.embed([PROMPTS["greek"]], "greek")[0].speaks
    engines["fox"].save_pretrained(root / "fox")
    assert bank.embed([PROMPTS["fox"]], "fox")[0].speaks  # unknown name: the directory is rescanned first
    shutil.rmtree(root / "greek")
    assert bank.names() == ["fox"]


def test_live_engine_is_served_as_it_learns(base):
    model, tok = base
    engine = HybridTitansEngine(model, tok, TINY)
    bank = MemoryBank(model, tok)
    bank.add("live", engine)
    assert not bank.embed([PROMPTS["greek"]], "live")[0].speaks
    engine.teach([FACTS["greek"]])
    item = bank.embed([PROMPTS["greek"]], "live")[0]
    assert item.speaks and item.version == engine.updates


def test_hub_memory_is_reresolved(base, engines, tmp_path, monkeypatch):
    """A Hub memory is loaded at the commit its revision points to, and reloaded when the revision moves."""
    from hf_titans import hub
    from hf_titans.serving import memories

    model, tok = base
    engines["greek"].save_pretrained(tmp_path / "c1")
    engines["fox"].save_pretrained(tmp_path / "c2")
    commits = {"main": "c1"}
    monkeypatch.setattr(memories.MemoryBank, "_resolve", lambda self, repo, revision: commits[revision or "main"])
    real = hub.load_checkpoint
    monkeypatch.setattr(hub, "load_checkpoint", lambda source, revision=None, **kw:
                        real(tmp_path / revision) if source == "user/mem" else real(source))
    bank = MemoryBank(model, tok, hub_check_interval=0)
    bank.add("hubmem", "user/mem")
    assert bank.info("hubmem")["commit"] == "c1" and bank.embed([PROMPTS["greek"]], "hubmem")[0].speaks
    commits["main"] = "c2"
    item = bank.embed([PROMPTS["fox"]], "hubmem")[0]
    assert item.speaks and bank.info("hubmem")["commit"] == "c2" and item.version == 2


# ------------------------------------------------------------------ routing
def test_route():
    from hf_titans.serving.app import FrontError, route

    memories, base_names = {"omega", "team"}, {"base", "served-name"}
    assert route("omega", None, memories, base_names) == "omega"
    assert route("base", None, memories, base_names) is None
    assert route("served-name", None, memories, base_names) is None
    assert route("base", "team", memories, base_names) == "team"
    assert route("team", "team", memories, base_names) == "team"
    assert route("base", "none", memories, base_names) is None
    assert route("base", " None ", memories, base_names) is None
    cases = [("nope", None, 404), ("base", "nope", 404), ("omega", "team", 400), ("omega", "none", 400),
             ("", None, 400), (None, None, 400), ("nope", "none", 404)]
    for model, header, status in cases:
        with pytest.raises(FrontError) as err:
            route(model, header, memories, base_names)
        assert err.value.status == status, (model, header)


def test_request_parsing():
    from hf_titans.serving.app import FrontError, chat_to_completion_body, completion_prompts

    assert completion_prompts({"prompt": "a"}) == ["a"]
    assert completion_prompts({"prompt": ["a", "b"]}) == ["a", "b"]
    assert completion_prompts({"prompt": [1, 2]}) == [[1, 2]]
    assert completion_prompts({"prompt": [[1], [2, 3]]}) == [[1], [2, 3]]
    for bad in (None, [], [True], ["a", 1], 3, [[]]):
        with pytest.raises(FrontError):
            completion_prompts({"prompt": bad})
    body = chat_to_completion_body({"model": "m", "messages": [], "max_completion_tokens": 5, "temperature": 0,
                                    "stop": ["\n"], "seed": 1})
    assert body == {"max_tokens": 5, "temperature": 0, "stop": ["\n"], "seed": 1}
    for field, value in (("tools", [{"type": "function"}]), ("logprobs", True), ("tool_choice", "auto"),
                         ("response_format", {"type": "json_object"})):
        with pytest.raises(FrontError, match=field):
            chat_to_completion_body({"messages": [], field: value})


def test_prompt_embeds_encoding_roundtrip():
    from hf_titans.serving.app import decode_prompt_embeds, encode_prompt_embeds

    x = torch.randn(7, 64)
    assert torch.equal(decode_prompt_embeds(encode_prompt_embeds(x)), x)
    with pytest.raises(ValueError):
        encode_prompt_embeds(x[None])


# ------------------------------------------------------------------ the front, with the OpenAI client
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture
def front(base, engines, saved):
    """(OpenAI client, bank, fake vLLM app) with the front on an in-process ASGI transport."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    from fastapi.testclient import TestClient

    from fake_vllm import create_fake_vllm
    from hf_titans.serving import create_app

    model, tok = base
    tok = copy.deepcopy(tok)
    tok.chat_template = CHAT_TEMPLATE
    bank = MemoryBank(model, tok, check_interval=0)
    bank.add_directory(saved)
    bank.add("live", engines["greek"])
    fake = create_fake_vllm(model, tok)
    upstream = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake), base_url="http://vllm")
    app = create_app(bank, upstream, base_name="base")
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        yield client, bank, fake, http


def test_front_completions_memory_and_bare(front, engines):
    client, _, fake, _ = front
    for name in FACTS:
        r = client.completions.create(model=name, prompt=PROMPTS[name], max_tokens=8)
        assert r.model == name
        assert r.choices[0].text == greedy(engines[name], PROMPTS[name])
        assert r.model_extra["hf_titans"]["speaks"] == [True]
        assert "prompt_embeds" in fake.state.requests[-1] and fake.state.requests[-1]["model"] == "fake-base"
        # an unrelated prompt through the same memory: the bare model's request, token ids and all
        r = client.completions.create(model=name, prompt=UNRELATED, max_tokens=8)
        assert r.choices[0].text == greedy(engines[name], UNRELATED)
        assert r.model_extra["hf_titans"]["speaks"] == [False]
        assert "prompt_embeds" not in fake.state.requests[-1]
        assert isinstance(fake.state.requests[-1]["prompt"], list)
    bare = client.completions.create(model="base", prompt=PROMPTS["greek"], max_tokens=8)
    assert bare.choices[0].text == engines["greek"].generate(PROMPTS["greek"], max_new_tokens=8, use_memory=False)
    assert bare.choices[0].text != greedy(engines["greek"], PROMPTS["greek"])
    assert bare.model_extra["hf_titans"]["memory"] is None
    # the X-Memory header picks the memory when 'model' is the base model
    r = client.completions.create(model="base", prompt=PROMPTS["fox"], max_tokens=8,
                                  extra_headers={"X-Memory": "fox"})
    assert r.choices[0].text == greedy(engines["fox"], PROMPTS["fox"])
    # several prompts and n: choices in OpenAI's order, usage summed
    r = client.completions.create(model="greek", prompt=[PROMPTS["greek"], UNRELATED], max_tokens=4, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == greedy(engines["greek"], PROMPTS["greek"], 4)
    assert r.choices[2].text == greedy(engines["greek"], UNRELATED, 4)
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens > 0  # 2 prompts x n=2 x 4 tokens
    assert r.model_extra["hf_titans"]["speaks"] == [True, False]
    # token ids as the prompt
    ids = engines["greek"].tokenizer(PROMPTS["greek"])["input_ids"]
    r = client.completions.create(model="greek", prompt=ids, max_tokens=8)
    assert r.choices[0].text == greedy(engines["greek"], PROMPTS["greek"])


def test_front_errors(front):
    import openai

    client, _, _, http = front
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="no memory named"):
        client.completions.create(model="base", prompt="x", max_tokens=2, extra_headers={"X-Memory": "nope"})
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="greek", prompt="   ", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="greek", messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    r = http.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/v1/completions", json={"model": "greek", "prompt": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # vLLM's own errors come back with their status
    r = http.post("/v1/completions", json={"model": "base", "prompt_embeds": "AAAA", "max_tokens": 2})
    assert r.status_code >= 400


def test_front_streaming(front, engines):
    client, _, _, _ = front
    stream = client.completions.create(model="greek", prompt=PROMPTS["greek"], max_tokens=8, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy(engines["greek"], PROMPTS["greek"])
    assert all(c.model == "greek" for c in chunks) and chunks[-1].usage.completion_tokens > 0
    stream = client.completions.create(model="greek", prompt=[PROMPTS["greek"], UNRELATED], max_tokens=4,
                                       stream=True)
    by_index: dict[int, str] = {}
    for c in stream:
        for choice in c.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + choice.text
    assert by_index == {0: greedy(engines["greek"], PROMPTS["greek"], 4), 1: greedy(engines["greek"], UNRELATED, 4)}


def test_front_chat(front, engines):
    client, bank, fake, _ = front
    messages = [{"role": "user", "content": PROMPTS["greek"]}]
    templated = bank.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    r = client.chat.completions.create(model="live", messages=messages, max_tokens=6)
    assert r.object == "chat.completion" and r.model == "live"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy(engines["greek"], templated, 6)
    assert fake.state.requests[-1]["max_tokens"] == 6 and "messages" not in fake.state.requests[-1]
    stream = client.chat.completions.create(model="live", messages=messages, max_completion_tokens=6, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    parts = [{"role": "user", "content": [{"type": "text", "text": PROMPTS["greek"]}]}]
    assert client.chat.completions.create(model="live", messages=parts, max_tokens=6).choices[0].message.content == \
        r.choices[0].message.content


def test_front_models_memories_and_reload(front, engines, saved):
    client, bank, _, http = front
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "base" and set(ids[1:]) == {"greek", "fox", "live"}
    info = http.get("/v1/memories").json()["data"]
    assert {m["name"]: m["kind"] for m in info} == {"fox": "folder", "greek": "folder", "live": "engine"}
    assert http.get("/health").status_code == 200
    # overwrite memory 'greek' with the fox memory on disk: the next request is answered by the new checkpoint
    engines["fox"].save_pretrained(saved / "greek")
    r = client.completions.create(model="greek", prompt=PROMPTS["fox"], max_tokens=8)
    assert r.choices[0].text == greedy(engines["fox"], PROMPTS["fox"])
    assert r.model_extra["hf_titans"]["version"] == 2
    r = http.post("/v1/memories/greek/reload").json()
    assert r["result"] == {"greek": "reloaded"} and r["memory"]["version"] == 3
    assert http.post("/v1/memories/nope/reload").status_code == 404


def test_front_api_key(base, engines):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from fake_vllm import create_fake_vllm
    from hf_titans.serving import create_app

    model, tok = base
    bank = MemoryBank(model, tok)
    upstream = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_fake_vllm(model, tok)), base_url="http://v")
    with TestClient(create_app(bank, upstream, api_key="sekrit")) as http:
        body = {"model": "base", "prompt": "Hello", "max_tokens": 2}
        assert http.post("/v1/completions", json=body).status_code == 401
        ok = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200, ok.text


def test_serve_command_line():
    from hf_titans.serving.server import _memory_specs, build_parser
    from hf_titans.serving.vllm import vllm_serve_command

    args = build_parser().parse_args(["--memory", "a=memories/a", "--memory", "b=user/repo@v1", "--memories-dir",
                                      "m", "--vllm-arg=--enforce-eager"])
    assert _memory_specs(args.memory) == [("a", "memories/a", None), ("b", "user/repo", "v1")]
    assert args.vllm_arg == ["--enforce-eager"]
    command = vllm_serve_command("/models/x", 8001, served_model_name="base", extra_args=["--enforce-eager"],
                                 executable="vllm")
    assert command[:3] == ["vllm", "serve", "/models/x"] and "--enable-prompt-embeds" in command
    assert command[-1] == "--enforce-eager" and command[command.index("--served-model-name") + 1] == "base"
    command = vllm_serve_command("/models/x", 8001)
    assert command[:5] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/x"]


def test_front_batches_concurrent_requests(base, engines, saved):
    """Requests that arrive together share one MemoryBank.embed call; a bad one fails alone."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import asyncio

    from fake_vllm import create_fake_vllm
    from hf_titans.serving import create_app

    model, tok = base
    bank = MemoryBank(model, tok)
    bank.add_directory(saved)
    upstream = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_fake_vllm(model, tok)), base_url="http://v")
    app = create_app(bank, upstream, batch_window=0.05)
    good = [("greek", PROMPTS["greek"]), ("fox", PROMPTS["fox"]), ("greek", UNRELATED), ("base", UNRELATED),
            ("fox", PROMPTS["fox"])]
    bad = [("greek", PROMPTS["greek"]), ("greek", "   ")]

    async def send(requests):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front") as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={
                "model": m, "prompt": p, "max_tokens": 8}) for m, p in requests))

    async def main():
        first = await send(good)
        batches = app.state.batcher.batches
        return first, batches, await send(bad)

    responses, batches, bad_responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 5
    for (memory, prompt), r in zip(good, responses):
        expected = greedy(engines[memory], prompt) if memory != "base" else \
            engines["greek"].generate(prompt, max_new_tokens=8, use_memory=False)
        assert r.json()["choices"][0]["text"] == expected
    assert responses[0].json()["hf_titans"]["speaks"] == [True]
    assert batches <= 2  # five requests, one or two embedding passes
    assert [r.status_code for r in bad_responses] == [200, 400]  # the empty prompt fails alone
    assert bad_responses[0].json()["choices"][0]["text"] == greedy(engines["greek"], PROMPTS["greek"])
