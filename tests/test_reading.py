"""engine.read: surprise-gated memorisation of documents longer than the window, on a tiny Llama (seconds).

The tiny model is first trained for a few seconds on the filler text, so that (like a real LM reading
repetitive filler) the filler is predictable while a planted needle is not.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import make_model
from hf_titans import HybridTitansEngine, MemoryConfig
from hf_titans.reading import ReadStats, read_document

FILLER = "The quick brown fox jumps over the lazy dog. Once upon a time there was a king who lived in a castle. "
NEEDLE = "The secret project code is Omega-99."
QUESTION = "The secret project code is"
CHUNK, CONTEXT = 64, 16
# The tiny model's 400-token vocabulary cuts words into pieces that the document's n-gram cache predicts well,
# so surprise runs lower than on SmolLM2 (needle passage ~3.6 nats, filler <= 1.6): a lower threshold here.
CFG = MemoryConfig(max_steps=80, read_surprise_threshold=2.5)


@pytest.fixture(scope="module")
def reader_lm(tokenizer):
    """A tiny Llama that knows the filler (trained on it), so only the needle surprises it."""
    torch.manual_seed(0)
    model = make_model("llama", len(tokenizer))
    ids = tokenizer(FILLER * 3, return_tensors="pt").input_ids
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(25):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.requires_grad_(False)
    assert float(loss.detach()) < 0.05
    return model, tokenizer


def _engine(reader_lm, **changes) -> HybridTitansEngine:
    model, tok = reader_lm
    return HybridTitansEngine(model, tok, CFG.replace(**changes) if changes else CFG)


def _doc(before: int = 8, after: int = 8) -> str:
    return FILLER * before + NEEDLE + " " + FILLER * after


def _state(engine) -> dict[str, torch.Tensor]:
    state = {f"memory.{k}": v.clone() for k, v in engine.memory.state_dict().items()}
    for i, s in enumerate(engine.optimizer.state.values()):
        state.update({f"opt.{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    return state


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_needle_is_written_filler_is_not_and_recalled(reader_lm):
    model, tok = reader_lm
    engine = _engine(reader_lm)
    assert engine.familiarity(QUESTION) < engine.config.familiarity_threshold
    doc = _doc()
    stats = engine.read(doc, chunk_tokens=CHUNK, context_tokens=CONTEXT, progress=False)
    n_tokens = len(tok(doc, add_special_tokens=False).input_ids)
    # stats
    assert isinstance(stats, ReadStats)
    assert stats.tokens == n_tokens
    assert stats.chunks_read == math.ceil(n_tokens / CHUNK) == len(stats.chunk_surprise)
    assert [c.start_token for c in stats.chunks] == list(range(0, n_tokens, CHUNK))
    assert sum(c.n_tokens for c in stats.chunks) == n_tokens
    assert stats.chunks_written == 1 and stats.fraction_written == pytest.approx(1 / stats.chunks_read)
    assert stats.spans_written == [NEEDLE]  # its passage's other sentence is predictable filler: not written
    assert stats.steps > 0 and stats.seconds > 0 and stats.tokens_per_second > 0
    assert stats.forward_seconds + stats.write_seconds <= stats.seconds
    # the written chunk is the one holding the needle, and it is the most surprising one
    needle_token = len(tok(FILLER * 8, add_special_tokens=False).input_ids)
    (written,) = [c for c in stats.chunks if c.written]
    assert written.start_token <= needle_token < written.start_token + CHUNK
    assert written.surprise == max(stats.chunk_surprise)
    assert written.max_passage_surprise >= engine.config.read_surprise_threshold
    for c in stats.chunks:
        if c is not written:
            assert c.max_passage_surprise < engine.config.read_surprise_threshold and not c.spans
    # recalled, with nothing in the context
    assert engine.familiarity(QUESTION) >= engine.config.familiarity_threshold
    assert engine.generate(QUESTION, max_new_tokens=4).strip().startswith("Omega")
    assert engine.taught == [NEEDLE]
    d = stats.to_dict()
    assert d["chunks_written"] == 1 and len(d["chunks"]) == stats.chunks_read
    assert "1 written" in str(stats)


def test_threshold_comes_from_the_config(reader_lm):
    engine = _engine(reader_lm, read_surprise_threshold=1e6)
    before = _state(engine)
    stats = engine.read(_doc(), chunk_tokens=CHUNK, context_tokens=CONTEXT, progress=False)
    assert stats.chunks_written == 0 and stats.steps == 0 and engine.updates == 0
    _assert_same(before, _state(engine))


def test_momentum_decays_on_unwritten_chunks_without_moving_the_memory(reader_lm):
    """A chunk that is not written has theta = 0: S <- eta S (eq. 14), and the memory does not move."""
    engine = _engine(reader_lm, read_surprise_threshold=1e6)
    engine.teach(["Hello world, how are you?"], max_steps=2)  # some surprise momentum to carry
    memory = {k: v.clone() for k, v in engine.memory.state_dict().items()}
    momenta = [s["surprise_momentum"].clone() for s in engine.optimizer.state.values()]
    stats = engine.read(FILLER * 6, chunk_tokens=CHUNK, context_tokens=CONTEXT, progress=False)
    eta = engine.config.momentum
    for m0, s in zip(momenta, engine.optimizer.state.values()):
        assert torch.allclose(s["surprise_momentum"], m0 * eta ** stats.chunks_read, atol=1e-12)
    for k, v in engine.memory.state_dict().items():
        assert torch.equal(v, memory[k]), k
    # forgetting while reading is config.read_forget; the optimizer gets its own setting back afterwards
    assert all(g["forget"] == engine.config.forget for g in engine.optimizer.param_groups)


def test_read_forget_is_used_while_writing(reader_lm, monkeypatch):
    engine = _engine(reader_lm, read_forget=0.01, forget=0.0)
    seen = []
    original = engine.optimizer.step
    monkeypatch.setattr(engine.optimizer, "step",
                        lambda: seen.append({g["forget"] for g in engine.optimizer.param_groups}) or original())
    engine.read(_doc(), chunk_tokens=CHUNK, context_tokens=CONTEXT, progress=False, max_steps=3)
    assert seen and all(s == {0.01} for s in seen)
    assert {g["forget"] for g in engine.optimizer.param_groups} == {0.0}


def test_memory_stays_flat_as_the_document_grows(reader_lm, monkeypatch):
    """Structural: every forward pass sees at most one chunk and its context, whatever the document's length,
    and the memory's and optimizer's tensors keep their sizes; the stats hold plain numbers and strings."""
    lengths = {}
    for repeats in (4, 16):
        engine = _engine(reader_lm)
        sizes_before = {k: v.numel() for k, v in _state(engine).items()}
        seen = []
        original = engine._forward
        monkeypatch.setattr(engine, "_forward", lambda ids, *a, **k: seen.append(ids.shape) or original(ids, *a, **k))
        stats = engine.read(_doc(repeats, repeats), chunk_tokens=CHUNK, context_tokens=CONTEXT, progress=False,
                            max_steps=2)
        assert len([s for s in seen if s[0] == 1]) >= stats.chunks_read  # one pass per chunk, at least
        lengths[repeats] = max(s[1] for s in seen)
        assert lengths[repeats] <= CONTEXT + CHUNK + 1
        sizes_after = {k: v.numel() for k, v in _state(engine).items()}
        assert {k: v for k, v in sizes_after.items() if k in sizes_before} == sizes_before
        assert len(sizes_after) <= 2 * len(list(engine.memory.parameters())) * 2 + len(sizes_before)
        for chunk in stats.chunks:
            for value in vars(chunk).values():
                assert isinstance(value, (int, float, bool, list, dict)) and not torch.is_tensor(value)
    assert lengths[4] == lengths[16]


@pytest.mark.parametrize("document, kwargs, error", [
    ("", {}, ValueError), ("  \n\t", {}, ValueError), (42, {}, TypeError), (None, {}, TypeError),
    (b"bytes", {}, TypeError), (["a list"], {}, TypeError),
    (FILLER, {"chunk_tokens": 0}, ValueError), (FILLER, {"chunk_tokens": -5}, ValueError),
    (FILLER, {"chunk_tokens": 1.5}, TypeError), (FILLER, {"chunk_tokens": True}, TypeError),
    (FILLER, {"chunk_tokens": 10_000}, ValueError), (FILLER, {"context_tokens": -1}, ValueError),
    (FILLER, {"max_span_tokens": 1}, ValueError), (FILLER, {"max_steps": -1}, ValueError),
])
def test_bad_input_is_refused_and_memory_unchanged(reader_lm, document, kwargs, error):
    engine = _engine(reader_lm)
    engine.teach([NEEDLE], max_steps=2)
    before = _state(engine)
    with pytest.raises(error):
        engine.read(document, **{"progress": False, **kwargs})
    _assert_same(before, _state(engine))


def test_failure_while_reading_restores_the_memory(reader_lm, monkeypatch):
    engine = _engine(reader_lm)
    engine.teach(["Hello world, how are you?"], max_steps=2)
    before = _state(engine)
    original = engine._write

    def write_then_fail(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_write", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        engine.read(_doc(), chunk_tokens=CHUNK, context_tokens=CONTEXT, progress=False, max_steps=3)
    _assert_same(before, _state(engine))
    assert {g["forget"] for g in engine.optimizer.param_groups} == {engine.config.forget}


def test_progress_bar_can_be_turned_off(reader_lm, capsys):
    engine = _engine(reader_lm, read_surprise_threshold=1e6)
    read_document(engine, FILLER * 3, chunk_tokens=CHUNK, progress=False)
    assert capsys.readouterr().err == ""
    read_document(engine, FILLER * 3, chunk_tokens=CHUNK, progress=True, desc="reading-test")
    assert "reading-test" in capsys.readouterr().err


def test_long_surprising_sentence_is_cut_to_max_span_tokens(reader_lm):
    model, tok = reader_lm
    engine = _engine(reader_lm)
    long_needle = "alpha beta gamma delta epsilon zeta eta theta " * 3 + "Omega-99 is the code."
    doc = FILLER * 4 + long_needle + " " + FILLER * 4
    stats = engine.read(doc, chunk_tokens=CHUNK, context_tokens=CONTEXT, progress=False, max_steps=2,
                        max_span_tokens=12)
    spans = [s for c in stats.chunks for s in c.spans]
    assert any(s in long_needle for s in spans)
    for span in spans:
        # 12 tokens in the document; on its own a text may tokenize a little differently (no leading space)
        assert len(tok(span, add_special_tokens=False).input_ids) <= 14
        start = doc.index(span)  # whole words of the document
        assert (start == 0 or doc[start - 1].isspace()) and doc[start + len(span)] in " .,"


def test_document_cache_is_a_witten_bell_distribution_that_learns_the_document():
    from hf_titans.reading import DocumentCache

    vocab = 12
    cache = DocumentCache(vocab, order=3, buckets=2 ** 16)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, vocab, (300,), generator=g)
    empty = cache.probability(text, 0)
    assert torch.allclose(empty, torch.full_like(empty, 1 / vocab))  # nothing read yet: uniform
    model_p = torch.softmax(torch.randn(len(text), generator=g), 0).double()
    assert torch.equal(cache.probability(text, 0, base=model_p), model_p)  # ... or the model it backs off to
    with pytest.raises(ValueError, match="one probability per token"):
        cache.probability(text, 5, base=model_p)
    cache.add(text, 0)
    # after any history, p_cache over the whole vocabulary sums to 1 (Witten-Bell interpolation is a distribution),
    # whether it backs off to the uniform distribution or to a model's distribution over the next token
    next_token = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64), 0)
    for history in ([], [3], [3, 7], text[-2:].tolist(), [11, 11]):
        rows = torch.tensor([history + [t] for t in range(vocab)])
        total = sum(float(cache.probability(row, len(history))[-1]) for row in rows)
        assert total == pytest.approx(1.0, abs=1e-9), history
        total = sum(float(cache.probability(row, len(history), base=next_token[t:t + 1])[-1])
                    for t, row in enumerate(rows))
        assert total == pytest.approx(1.0, abs=1e-9), history
    # what it has read becomes predictable: a stretch it read is far more probable than uniform, a new one is not
    seen = cache.probability(text[100:140], 2)
    fresh = cache.probability(torch.randint(0, vocab, (40,), generator=g), 2)
    assert seen.log().mean() > fresh.log().mean() + 0.5
    size = [t.numel() for t in (cache.grams, cache.contexts, cache.types)]
    cache.add(torch.randint(0, vocab, (20_000,), generator=g), 0)
    assert [t.numel() for t in (cache.grams, cache.contexts, cache.types)] == size  # flat however much it reads


def test_document_cache_makes_repeated_text_unsurprising_so_the_needle_stands_out(tiny_llama):
    """An untrained model finds every token about equally surprising, so surprise in context alone cannot tell
    the needle from the filler; measured against what the document has already said, the filler becomes
    predictable and the needle's chunk is the most surprising after the first (which nothing precedes)."""
    model, tok = tiny_llama
    doc = _doc(10, 10)
    needle_token = len(tok(FILLER * 10, add_special_tokens=False).input_ids)
    maxima = {}
    for weight in (0.0, 0.8):
        engine = HybridTitansEngine(model, tok, CFG.replace(read_cache_weight=weight, read_surprise_threshold=1e6))
        stats = engine.read(doc, chunk_tokens=CHUNK, context_tokens=CONTEXT, progress=False)
        maxima[weight] = {c.start_token <= needle_token < c.start_token + CHUNK: [] for c in stats.chunks}
        for c in stats.chunks[1:]:
            maxima[weight][c.start_token <= needle_token < c.start_token + CHUNK].append(c.max_passage_surprise)
    needle, filler = max(maxima[0.8][True]), max(maxima[0.8][False])
    assert needle > filler + 1.0
    assert max(maxima[0.0][True]) < max(maxima[0.0][False]) + 0.5  # without the cache there is no such gap


def test_first_chunk_is_judged_by_the_model_alone(reader_lm):
    """With nothing read yet the cache backs off to the model, so the first chunk's surprise is the model's NLL in
    context, exactly as without the cache (an empty cache backing off to the uniform distribution would add
    about -log(1 - w) = 1.6 nats to every token); later chunks are measured against the document."""
    surprise = {}
    for weight in (0.0, 0.8):
        engine = _engine(reader_lm, read_cache_weight=weight, read_surprise_threshold=1e6)
        surprise[weight] = engine.read(_doc(), chunk_tokens=CHUNK, context_tokens=CONTEXT, progress=False).chunk_surprise
    assert surprise[0.8][0] == pytest.approx(surprise[0.0][0], abs=1e-9)
    assert surprise[0.8][1:] != pytest.approx(surprise[0.0][1:], abs=1e-3)


def test_token_surprise_mixes_model_and_cache():
    from hf_titans.reading import token_surprise

    nll = torch.tensor([0.1, 2.0, 9.0])
    p_cache = torch.tensor([0.0, 0.5, 0.9], dtype=torch.float64)
    assert torch.equal(token_surprise(nll, p_cache, 0.0), nll.double())  # weight 0: surprise in context
    mixed = token_surprise(nll, p_cache, 0.8)
    expected = -torch.log(0.2 * torch.exp(-nll.double()) + 0.8 * p_cache)
    assert torch.allclose(mixed, expected)
    assert mixed[2] < 1.0 < nll[2]  # what the document keeps saying is not surprising, however the window sees it


@pytest.mark.parametrize("field, value", [("read_surprise_threshold", -1.0), ("read_surprise_threshold", math.inf),
                                          ("read_max_spans", 0), ("read_forget", 1.0), ("read_forget", -0.1),
                                          ("read_passage_sentences", 0), ("read_cache_weight", 1.0),
                                          ("read_cache_weight", -0.2)])
def test_reading_config_is_validated(field, value):
    with pytest.raises(ValueError, match=field):
        MemoryConfig(**{field: value})


def test_needle_benchmark_smoke(reader_lm, tmp_path):
    """The harness runs end to end on the tiny model (not the numbers): documents of the requested length with
    the needle out of the last window, the memory read, the bare baseline, the table."""
    from hf_titans.bench.needle import make_haystack, markdown_table, run_needle

    model, tok = reader_lm
    import random

    for filler in ("repeat", "natural"):
        hay = make_haystack(tok, 900, filler, random.Random(1), window=256)
        assert 850 <= hay["tokens"] <= 1000 and hay["key"] in hay["text"]
        assert hay["needle_token"] <= hay["tokens"] - 256 and not hay["needle_in_last_window"]
        near = make_haystack(tok, 256, filler, random.Random(1), window=256, in_window=True)
        assert near["needle_in_last_window"]
    results = run_needle(model, tok, [600], trials=1, window=200, chunk_tokens=64, context_tokens=16,
                         config=CFG, max_steps=1, max_new_tokens=3, control=True, log=lambda s: None)
    assert [(r["filler"], r["trials"]) for r in results["summary"]] == [("repeat", 1), ("natural", 1)]
    for trial in results["trials"]:
        assert {"question", "cloze", "baseline", "control", "read"} <= set(trial)
        assert 0 <= trial["read"]["fraction_written"] <= 1
    assert "| repeat | " in markdown_table(results)


def test_cli_read(reader_lm, tmp_path):
    """``hf-titans read FILE --memory DIR`` (in-process): reads, saves the memory, reports JSON; bad files exit 2
    before any memory folder is made."""
    import json

    from typer.testing import CliRunner

    from hf_titans.cli import app

    model, tok = reader_lm
    base = tmp_path / "tiny"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    doc = tmp_path / "doc.txt"
    doc.write_text(_doc(), encoding="utf-8")
    memory = tmp_path / "mem"
    run = lambda *args: CliRunner().invoke(app, [str(a) for a in args])  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        result = run("--json", "read", doc, "--memory", memory, "--model", base, "--chunk-tokens", 64,
                     "--max-steps", 2)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["ok"] and data["command"] == "read" and data["created"]
    assert data["chunks_read"] == math.ceil(len(tok(_doc(), add_special_tokens=False).input_ids) / 64)
    assert data["written"] == [NEEDLE] and (memory / "config.json").is_file() or any(memory.iterdir())
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    for bad in (empty, tmp_path / "missing.txt"):
        result = run("read", bad, "--memory", tmp_path / "never", "--model", base)
        assert result.exit_code == 2, result.output
        assert not (tmp_path / "never").exists()


def _needle_part(trials, **settings):
    base = {"window": 2048, "chunk_tokens": 512, "context_tokens": 64, "lengths": [], "trials": len(trials),
            "fillers": ["repeat"], "first_trial": trials[0][1] if trials else 0, "config": {"read_surprise_threshold": 4.0}}
    rows = [{"filler": "repeat", "length": n, "trial": t, "tokens": n, "question": {"correct": False},
             "cloze": {"correct": correct}, "needle_written": True,
             "read": {"fraction_written": 0.05, "tokens_per_second": 100.0, "seconds": 1.0}}
            for n, t, correct in trials]
    return {"benchmark": "needle", "model": "m", "settings": {**base, **settings}, "trials": rows, "summary": []}


def test_needle_exact_answer_is_the_key_itself_not_a_number_containing_it():
    from hf_titans.bench.needle import answers_exactly, summarize

    assert answers_exactly(" 60337.", "60337") and answers_exactly(" 60337.\nThe", "60337")
    assert answers_exactly("It is 60337, I think", "60337")
    for wrong in (" 60337.5", " 603370", " 6,60337", " 1999. 60337", " none", ""):
        assert not answers_exactly(wrong, "60337"), wrong
    part = _needle_part([(8192, 0, True), (8192, 1, True)])
    for trial, answer in zip(part["trials"], (" 60337.", " 60337.5")):
        trial.update(key="60337", question={"correct": True, "answer": answer},
                     cloze={"correct": True, "answer": answer})
    (row,) = summarize(part["trials"])
    assert row["accuracy_question"] == 1.0 and row["exact_question"] == 0.5 and row["exact_cloze"] == 0.5
    assert summarize(_needle_part([(8192, 0, True)])["trials"])[0]["exact_cloze"] is None  # no answers kept


def test_needle_merge_joins_split_trials_and_refuses_mixed_settings():
    from hf_titans.bench import needle

    a = _needle_part([(8192, 0, True), (8192, 1, False)])
    b = _needle_part([(8192, 2, True), (65536, 0, True)])
    merged = needle.merge([a, b], ["a.json", "b.json"])
    by_length = {r["length"]: r for r in merged["summary"]}
    assert by_length[8192]["trials"] == 3 and abs(by_length[8192]["accuracy_cloze"] - 2 / 3) < 1e-9
    assert by_length[65536]["trials"] == 1 and merged["settings"]["lengths"] == [8192, 65536]
    with pytest.raises(ValueError, match="more than one file"):
        needle.merge([a, a], ["a.json", "again.json"])
    with pytest.raises(ValueError, match="window"):
        needle.merge([a, _needle_part([(8192, 5, True)], window=4096)], ["a.json", "c.json"])
