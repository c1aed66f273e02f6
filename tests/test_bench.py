"""The benchmark harness (hf_titans.bench): scoring that matches generation, and a smoke run of every method.

The smoke test reads 5 records of the real dev data (skipped when ../shared/data is absent) and uses a tiny
random model; it checks the harness works, not the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_titans import HybridTitansEngine, MemoryConfig
from hf_titans.bench.data import EditRecord, load_records
from hf_titans.bench.edit import EditSettings, PassCounter, markdown_table, plot, run_edit
from hf_titans.bench.metrics import encode_prompt, encode_target, memory_soft_prompts, target_predictions

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "zsre_dev.jsonl").is_file(), reason="../shared/data is absent")

FACT = "The secret project code is Omega-99."
PROMPTS = ["The secret project code is", "The capital of France is", "Hello world, how",
           "Listen to me. The secret project code is"]  # read by its last sentence: the soft prompt goes before it


def _first_token(tok, pred_ids):
    return tok.decode([pred_ids[0]], skip_special_tokens=True)


@pytest.mark.parametrize("gate", ["speaks", "silent", "mixed"])
def test_teacher_forced_first_token_matches_generate(tiny_lm, gate):
    """The first target prediction of the scorer is what greedy generation emits, with the memory speaking
    (soft prompt from the prompt alone), silent, or speaking for some rows of a batch only."""
    model, tok = tiny_lm
    engine = HybridTitansEngine(model, tok, MemoryConfig(max_steps=3))
    engine.teach([FACT])  # a few steps: the soft prompt is no longer the initial one
    familiarity = engine.familiarity(PROMPTS)
    if gate == "speaks":
        engine.config.familiarity_threshold = min(familiarity) - 1.0
    elif gate == "silent":
        engine.config.familiarity_threshold = max(familiarity) + 1e-3
    else:
        engine.config.familiarity_threshold = sorted(familiarity)[1]
    softs, _ = memory_soft_prompts(engine, PROMPTS, batch_size=len(PROMPTS))
    speaking = [s is not None for s in softs]
    assert {"speaks": all(speaking), "silent": not any(speaking), "mixed": any(speaking) and not all(speaking)}[gate]
    if gate == "speaks":
        assert softs[-1].at == len(encode_prompt(tok, "Listen to me.")), softs[-1].at
    # one prompt at a time, as the benchmark scores
    for prompt in PROMPTS:
        soft, _ = memory_soft_prompts(engine, [prompt])
        (p,) = target_predictions(model, tok, [prompt], ["x y"], soft)
        assert _first_token(tok, p) == engine.generate(prompt, max_new_tokens=1, do_sample=False), prompt
    # a left-padded batch, gate and key read in the same batch as a batched generate reads them
    preds = target_predictions(model, tok, PROMPTS, ["x y"] * len(PROMPTS), softs)
    assert [_first_token(tok, p) for p in preds] == engine.generate(PROMPTS, max_new_tokens=1, do_sample=False)


def test_teacher_forcing_scores_each_target_token(tiny_llama):
    model, tok = tiny_llama
    prompt, target = "The capital of France is", "Paris."
    p, t = encode_prompt(tok, prompt), encode_target(tok, target)
    ids = torch.tensor([p + t])
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0, len(p) - 1:-1].argmax(-1).tolist()
    # batched with a longer row (left padding) gives the same predictions
    got = target_predictions(model, tok, [prompt, "Once upon a time there was a king who"], [target, "lived"])
    assert got[0] == expected and len(got[1]) == len(encode_target(tok, "lived"))


def test_pass_counter_counts_grad_and_forward_passes(tiny_llama):
    model, tok = tiny_llama
    ids = torch.tensor([encode_prompt(tok, FACT)] * 3)
    with PassCounter(model) as c:
        with torch.no_grad():
            model(input_ids=ids)
        with torch.enable_grad():
            model(input_ids=ids).logits.sum()
    assert (c.fwd, c.fwd_bwd, c.rows, c.partial) == (1, 1, 3, 0)


@needs_data
@pytest.mark.parametrize("fmt,name", [("zsre", "zsre_dev.jsonl"), ("counterfact", "counterfact_dev.jsonl")])
def test_readers(fmt, name):
    records = load_records(DATA / name, fmt, n=5)
    assert len(records) == 5 and all(isinstance(r, EditRecord) for r in records)
    for r in records:
        assert r.prompt and r.target and r.rephrase and r.loc_prompt and r.loc_answer
        assert r.text == f"{r.prompt} {r.target}"


@needs_data
@pytest.mark.parametrize("schedule", ["sequential", "batch"])
def test_smoke_all_methods_on_real_records(tiny_llama, tmp_path, schedule):
    model, tok = tiny_llama
    records = load_records(DATA / "zsre_dev.jsonl", "zsre", n=5)
    settings = EditSettings(schedule=schedule, config=MemoryConfig(max_steps=2), lora_cap=2)
    res = run_edit(model, tok, records, ["memory", "none", "in_context", "lora", "seed"], settings, log=lambda _: None)
    assert set(res["methods"]) == {"memory", "none", "in_context", "lora", "lora_to_rel", "seed"}
    assert res["base_unchanged"] is True
    for name, e in res["methods"].items():
        for key in ("rel", "gen", "loc"):
            assert 0.0 <= e[key] <= 1.0, (name, key)
        for key in ("teach_seconds", "llm_passes_per_fact", "peak_rss_mb"):
            assert e[key] >= 0
    none = res["methods"]["none"]
    assert none["loc"] == 1.0 and none["llm_passes_per_fact"] == 0
    mem = res["methods"]["memory"]
    assert mem["llm_passes_per_fact"] > 0
    # lora gets the memory's passes per fact
    assert res["methods"]["lora"]["llm_passes_per_fact"] == pytest.approx(mem["llm_passes_per_fact"])
    assert "| memory |" in markdown_table(res)
    plot(res, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
    json.dumps(res)


@needs_data
def test_cli_edit_writes_results(tmp_path, monkeypatch, tiny_llama):
    from hf_titans.bench import __main__ as cli

    model, tok = tiny_llama
    monkeypatch.setattr(cli, "load_model", lambda name, device=None: (model, tok))
    out = tmp_path / "run"
    cli.main(["edit", "--data", str(DATA / "counterfact_dev.jsonl"), "--format", "counterfact", "--n", "3",
              "--methods", "memory,none", "--schedule", "sequential", "--out", str(out), "--set", "max_steps=2",
              "--save-memory", str(tmp_path / "memory")])
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 3 and res["format"] == "counterfact" and set(res["methods"]) == {"memory", "none"}
    assert (out / "results.png").is_file() and (out / "results.md").is_file()
    # the saved memory is the one scored: loaded again, it gives the same familiarity to the taught prompts
    engine = HybridTitansEngine.from_pretrained(model, tmp_path / "memory", tokenizer=tok)
    records = load_records(DATA / "counterfact_dev.jsonl", "counterfact", n=3)
    saved = engine.familiarity([r.prompt for r in records])
    assert saved == pytest.approx(res["methods"]["memory"]["extra"]["per_record_familiarity"]["rel"], abs=1e-3)


def test_generate_benchmark_runs(tiny_llama, tmp_path):
    from hf_titans.bench.generate import markdown_table as gen_table, plot as gen_plot, run_generate

    model, tok = tiny_llama
    res = run_generate(model, tok, new_tokens=(3,), batch_sizes=(1, 2), repeats=1, config=MemoryConfig(max_steps=2),
                       log=lambda _: None)
    assert len(res["cases"]) == 4 and {c["gate"] for c in res["cases"]} == {"speaks", "silent"}
    for c in res["cases"]:
        assert c["ratio"] > 0 and c["bare_tokens_per_s"] > 0
    assert "| speaks" in gen_table(res)
    gen_plot(res, tmp_path / "gen.png")


@needs_data
def test_cli_split_run_and_merge(tmp_path, monkeypatch, tiny_llama):
    """lora in a second process matches the memory's passes through --reference; merge joins the two."""
    from hf_titans.bench import __main__ as cli

    model, tok = tiny_llama
    monkeypatch.setattr(cli, "load_model", lambda name, device=None: (model, tok))
    common = ["--data", str(DATA / "zsre_dev.jsonl"), "--n", "2", "--schedule", "sequential", "--set", "max_steps=2",
              "--lora-cap", "2"]
    cli.main(["edit", *common, "--methods", "memory", "--out", str(tmp_path / "a")])
    cli.main(["edit", *common, "--methods", "lora", "--reference", str(tmp_path / "a" / "results.json"),
              "--out", str(tmp_path / "b")])
    cli.main(["merge", str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json"),
              "--out", str(tmp_path / "m")])
    res = json.loads((tmp_path / "m" / "results.json").read_text())
    assert list(res["methods"]) == ["memory", "lora", "lora_to_rel"]
    assert res["methods"]["lora"]["llm_passes_per_fact"] == res["methods"]["memory"]["llm_passes_per_fact"]
    assert len(res["merged_from"]) == 2


@needs_data
def test_variants_edit_collects_one_row_per_preset(tmp_path, monkeypatch, tiny_llama, capsys):
    import importlib.util

    from hf_titans.bench import __main__ as cli

    spec = importlib.util.spec_from_file_location("variants_edit", ROOT / "scripts" / "variants_edit.py")
    variants_edit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants_edit)
    model, tok = tiny_llama
    monkeypatch.setattr(cli, "load_model", lambda name, device=None: (model, tok))
    out = tmp_path / "sweep"
    cli.main(["edit", "--data", str(DATA / "zsre_dev.jsonl"), "--n", "3", "--methods", "memory",
              "--config", str(ROOT / "configs" / "moneta.yaml"), "--set", "max_steps=2", "--out", str(out / "moneta")])
    res = json.loads((out / "moneta" / "results.json").read_text())["methods"]["memory"]
    capsys.readouterr()
    assert variants_edit.main(["--out", str(out), "--collect"]) == 1  # the other presets are not there
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert f"| moneta | moneta / mac | 3 | {res['rel']:.3f} | {res['gen']:.3f} | {res['loc']:.3f} |" in rows["moneta"]
    assert "not run" in rows["mag"]
    assert variants_edit.main(["--out", str(out), "--collect", "--configs", "moneta"]) == 0


@pytest.mark.parametrize("mode", ["mag", "mal"])
def test_layer_memory_modes_are_scored_with_the_layer_memory(tiny_llama, mode):
    """In mag / mal the memory speaks inside a decoder layer: the scorer must hook it in where the gate opens (as
    generate() does), not score the bare model."""
    from hf_titans.bench.edit import MemoryMethod, NoneMethod

    model, tok = tiny_llama
    method = MemoryMethod(model, tok, MemoryConfig(mode=mode, memory_layer=1, max_steps=30))
    method.engine.teach([FACT])
    prompts, targets = ["The secret project code is", "Hello world, how"], ["Omega-99.", "are you"]
    assert method.engine.prepare_inputs(prompts)["speaks"].tolist() == [True, False]
    scored = method.predict(prompts, targets)
    bare = NoneMethod(model, tok).predict(prompts, targets)
    assert scored[0] != bare[0]  # the layer memory changed what the model predicts for the taught prompt
    assert scored[1] == bare[1]  # and nothing where the gate is shut
    first = method.engine.generate(prompts[0], max_new_tokens=1, do_sample=False)
    assert _first_token(tok, scored[0]) == first
