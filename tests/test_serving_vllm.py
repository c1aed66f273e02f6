"""End to end on the real vLLM (CPU build): the embedded SmolLM2-135M-Instruct served by `vllm serve
--enable-prompt-embeds`, the memory front before it, and the OpenAI Python client. Skipped where vLLM is not installed
(it is not in the project's dev extras; see docs/serving.md). Takes minutes: teaching a fact through the 135M model,
then starting vLLM (about 40 s on an idle 2-core machine).

    pip install -e ".[serve]"      # beside the CPU torch; see docs/serving.md
    python -m pytest -q -m vllm tests/test_serving_vllm.py

HF_TITANS_TEST_OMEGA=FOLDER uses a memory folder already taught the fact instead of teaching it here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]

FACT = "The secret project code is Omega-99."
PROMPT = "The secret project code is"
UNRELATED = "The capital of France is"
N = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2):
    """(OpenAI client for the front, OpenAI client for vLLM itself, engine, memories folder)."""
    import openai

    from hf_titans import HybridTitansEngine
    from hf_titans.serving import MemoryBank, VLLMServer, create_app, default_model_dir
    from hf_titans.serving.server import front_in_thread

    model, tokenizer = smollm2
    root = tmp_path_factory.mktemp("memories")
    taught = os.environ.get("HF_TITANS_TEST_OMEGA")  # a folder already taught FACT: skips minutes of teaching
    if taught:
        engine = HybridTitansEngine.from_pretrained(model, taught, tokenizer=tokenizer)
    else:
        engine = HybridTitansEngine(model, tokenizer)
        report = engine.teach([FACT])
        assert report.written == 1, report
    engine.save_pretrained(root / "omega")
    bank = MemoryBank(model, tokenizer, check_interval=0)
    bank.add_directory(root)
    log = Path(tempfile.gettempdir()) / f"hf_titans_vllm_{os.getpid()}.log"
    server = VLLMServer(default_model_dir(), port=free_port(), extra_args=["--enforce-eager"],
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"}, log_path=log)
    started = time.perf_counter()
    server.start()
    print(f"vllm serve ready in {time.perf_counter() - started:.0f} s (log: {log})")
    port = free_port()
    try:
        with front_in_thread(create_app(bank, server.url), port):
            yield (openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0),
                   openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0), engine, root)
    finally:
        server.stop()


def test_taught_fact_from_memory_and_bare_answer_otherwise(served):
    client, direct, engine, _ = served
    vllm_model = direct.models.list().data[0].id
    r = client.completions.create(model="omega", prompt=PROMPT, max_tokens=N, temperature=0)
    print("memory:", repr(r.choices[0].text), r.model_extra["hf_titans"])
    assert "Omega-99" in r.choices[0].text
    assert r.model_extra["hf_titans"]["speaks"] == [True]
    assert r.choices[0].text == engine.generate(PROMPT, max_new_tokens=N, do_sample=False)
    bare_direct = direct.completions.create(model=vllm_model, prompt=PROMPT, max_tokens=N, temperature=0)
    assert "Omega-99" not in bare_direct.choices[0].text
    for prompt in (UNRELATED, "Water boils at a temperature of"):
        r = client.completions.create(model="omega", prompt=prompt, max_tokens=N, temperature=0)
        plain = direct.completions.create(model=vllm_model, prompt=prompt, max_tokens=N, temperature=0)
        print("unrelated:", repr(prompt), repr(r.choices[0].text), r.model_extra["hf_titans"])
        assert r.model_extra["hf_titans"]["speaks"] == [False]
        assert r.choices[0].text == plain.choices[0].text
        assert r.choices[0].text == engine.generate(prompt, max_new_tokens=N, do_sample=False, use_memory=False)
    # the base model through the front, the X-Memory header, streaming
    r = client.completions.create(model="base", prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.choices[0].text == bare_direct.choices[0].text
    r = client.completions.create(model="base", prompt=PROMPT, max_tokens=N, temperature=0,
                                  extra_headers={"X-Memory": "omega"})
    assert "Omega-99" in r.choices[0].text
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="omega", prompt=PROMPT, max_tokens=N, temperature=0, stream=True) if c.choices)
    assert "Omega-99" in text


def test_chat_through_the_front(served):
    client, direct, _, _ = served
    vllm_model = direct.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="omega", messages=messages, max_tokens=N, temperature=0)
    plain = direct.chat.completions.create(model=vllm_model, messages=messages, max_tokens=N, temperature=0)
    print("chat:", repr(r.choices[0].message.content), "| vLLM's own chat:", repr(plain.choices[0].message.content))
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].message.content == plain.choices[0].message.content


def test_memories_are_swapped_without_restarting_vllm(served):
    client, _, engine, root = served
    from hf_titans import HybridTitansEngine

    # a new memory folder appears: served at once
    shutil.copytree(root / "omega", root / "omega-copy")
    r = client.completions.create(model="omega-copy", prompt=PROMPT, max_tokens=N, temperature=0)
    assert "Omega-99" in r.choices[0].text
    assert "omega-copy" in [m.id for m in client.models.list().data]
    # a memory is overwritten with a fresh (empty) one: the next request is answered without it
    HybridTitansEngine(engine.model, engine.tokenizer).save_pretrained(root / "omega-copy")
    r = client.completions.create(model="omega-copy", prompt=PROMPT, max_tokens=N, temperature=0)
    assert "Omega-99" not in r.choices[0].text
    assert r.model_extra["hf_titans"]["speaks"] == [False] and r.model_extra["hf_titans"]["version"] == 2
