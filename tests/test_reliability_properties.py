"""Property-based tests (hypothesis): every input to the library and the CLI ends in a result or a clear error.

Inputs: empty, whitespace, huge, control characters, lone surrogates (invalid Unicode), wrong types, negative or
absurd counts and config values. A clear error is a ``TypeError``/``ValueError`` (``OSError`` for file-system
problems) whose message names the argument; any other exception (an ``IndexError`` or ``RuntimeError`` from deep
inside torch, say) fails the test. After an error the memory, its optimizer state and the engine's counters are
exactly what they were. Deterministic: ``derandomize=True``, a fixed number of examples, no example database.
The number of examples each property ran is printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import make_model, make_tokenizer  # noqa: E402
from hf_titans import HybridTitansEngine, MemoryConfig  # noqa: E402
from hf_titans.engine import TeachReport  # noqa: E402

FACT = "The secret project code is Omega-99."
COUNTS: dict[str, int] = {}


def _settings(n: int):
    return settings(derandomize=True, max_examples=n, deadline=None, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def _count(name: str, result: str = "run") -> None:
    COUNTS[f"{name} {result}"] = COUNTS.get(f"{name} {result}", 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    total = sum(v for k, v in COUNTS.items() if k.endswith(" run"))
    print("\nhypothesis examples run: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items()))
          + f"; {total} in all")


# ---------------------------------------------------------------------------------------------- strategies
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
controls = st.characters(min_codepoint=0, max_codepoint=31) | st.sampled_from("\x7f\x85\u2028\u2029\u200b\ufeff\u202e")
any_char = st.characters() | surrogates | controls
plain_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=30)
texts = st.one_of(
    plain_text,
    st.text(alphabet=any_char, max_size=30),                                      # anything, surrogates included
    st.text(alphabet=st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u3000\u2003"), max_size=8),  # whitespace only
    st.builds(lambda a, c, b: a + c + b, plain_text, surrogates | controls, plain_text),
    st.sampled_from(["word " * 400, "\n" * 600 + "x", "x" * 3000, "🙂" * 300, "\x00" * 50, "e\u0301" * 100]),
)
not_text = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.binary(max_size=8), st.booleans(),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just(object()))
text_inputs = st.one_of(texts, st.lists(texts, min_size=0, max_size=3), st.tuples(texts, texts),
                        st.lists(st.one_of(texts, not_text), min_size=1, max_size=3), not_text)
counts = st.one_of(st.integers(min_value=-3, max_value=3), st.sampled_from([2 ** 31, 2 ** 63, -2 ** 63]),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3), st.none(), st.booleans())


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    return HybridTitansEngine(make_model("llama", len(tokenizer)), tokenizer,
                              MemoryConfig(max_steps=1, learn_steps=1))


def flat_state(tree, prefix: str = "") -> dict:
    """An optimizer ``state_dict`` (nested dicts, as a JointOptimizer gives) as ``{path: value}``."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flat_state(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, (list, tuple)):
        return flat_state(dict(enumerate(tree)), prefix)
    return {prefix.rstrip("."): tree}


def snapshot(engine: HybridTitansEngine):
    return (copy.deepcopy(engine.memory.state_dict()), copy.deepcopy(engine.optimizer.state_dict()),
            engine.updates, engine.skipped_nonfinite, list(engine.taught))


def assert_unchanged(engine: HybridTitansEngine, before) -> None:
    memory, optimizer, updates, skipped, taught = before
    now = engine.memory.state_dict()
    assert set(now) == set(memory)
    for name, tensor in now.items():
        assert torch.equal(tensor, memory[name]), f"memory tensor {name} changed after an error"
    state, old_state = flat_state(engine.optimizer.state_dict()), flat_state(optimizer)
    assert set(state) == set(old_state), "optimizer state changed after an error"
    for key, v in state.items():
        old = old_state[key]
        assert (torch.equal(v, old) if torch.is_tensor(v) else v == old), f"optimizer {key} changed"
    assert (engine.updates, engine.skipped_nonfinite, engine.taught) == (updates, skipped, taught)


def assert_clear(err: BaseException, names: str) -> None:
    """A clear error: TypeError/ValueError whose message names the argument (one of ``names``, a regex)."""
    assert isinstance(err, (TypeError, ValueError)), f"unclear error {type(err).__name__}: {err}"
    message = str(err)
    assert re.search(names, message), f"the message does not name the argument ({names}): {message}"
    assert "Traceback" not in message and len(message) < 2000


def outcome(engine: HybridTitansEngine, call, names: str, check=None) -> str:
    before = snapshot(engine)
    try:
        result = call()
    except (TypeError, ValueError) as err:
        assert_clear(err, names)
        assert_unchanged(engine, before)
        return "error"
    if check is not None:
        check(result)
    return "ok"


# ---------------------------------------------------------------------------------------------- text inputs
OPS = {
    "teach": (lambda e, x: e.teach(x), "facts|text", lambda r: isinstance(r, TeachReport)),
    "surprise": (lambda e, x: e.surprise(x), "text",
                 lambda r: all(math.isfinite(v) for v in ([r] if isinstance(r, float) else r))),
    "familiarity": (lambda e, x: e.familiarity(x), "text",
                    lambda r: all(v <= 1 for v in ([r] if isinstance(r, float) else r))),
    "generate": (lambda e, x: e.generate(x, max_new_tokens=2), "prompt|text",
                 lambda r: isinstance(r, (str, list))),
    "generate-learn": (lambda e, x: e.generate(x, learn=True, max_new_tokens=2), "prompt|text",
                       lambda r: isinstance(r, (str, list))),
    "read": (lambda e, x: e.read(x, chunk_tokens=32, progress=False), "document", lambda r: r.tokens > 0),
    "prompt_embeds": (lambda e, x: e.prompt_embeds(x), "prompt|text", lambda r: bool(torch.isfinite(r).all())),
}


@_settings(400)
@given(op=st.sampled_from(sorted(OPS)), value=text_inputs)
def test_text_inputs_end_in_a_result_or_a_clear_error(engine, op, value):
    call, names, check = OPS[op]
    _count("text inputs")
    _count("text inputs", outcome(engine, lambda: call(engine, value), names, check))


def test_lone_surrogates_and_undecodable_text_are_refused_by_name(engine):
    """The case hypothesis found first: a lone surrogate reached the tokenizer, which failed with
    'TextEncodeInput must be Union[...]'."""
    before = snapshot(engine)
    for call in (lambda: engine.teach(["fine", "bad \udcff byte"]), lambda: engine.generate("\ud800"),
                 lambda: engine.surprise("x\udfffy"), lambda: engine.read("A. B \udc80.", progress=False)):
        with pytest.raises(ValueError, match=r"not valid Unicode: '\\ud[0-9a-f]{3}' at character \d+ is a lone "
                                             r"surrogate"):
            call()
    assert_unchanged(engine, before)


# ---------------------------------------------------------------------------------------------- numbers and flags
@_settings(80)
@given(max_steps=counts)
def test_teach_max_steps(engine, max_steps):
    _count("teach max_steps")
    _count("teach max_steps", outcome(engine, lambda: engine.teach(FACT, max_steps=max_steps), "max_steps"))


@_settings(80)
@given(n=st.integers(1, 3) | counts, learn=st.booleans() | st.sampled_from([None, 0, 1, "", "yes"]),
       use_memory=st.booleans() | st.sampled_from([None, 0, "no"]))
def test_generate_numbers_and_flags(engine, n, learn, use_memory):
    _count("generate arguments")
    _count("generate arguments", outcome(
        engine, lambda: engine.generate("The secret project code is", max_new_tokens=n, learn=learn,
                                        use_memory=use_memory), "max_new_tokens|learn|use_memory"))


@_settings(60)
@given(chunk=st.integers(1, 64) | counts, context=counts, span=counts, steps=counts)
def test_read_sizes(engine, chunk, context, span, steps):
    _count("read arguments")
    _count("read arguments", outcome(
        engine, lambda: engine.read("One. Two is here. Three.", chunk_tokens=chunk, context_tokens=context,
                                    max_span_tokens=span, max_steps=steps, progress=False),
        "chunk_tokens|context_tokens|max_span_tokens|max_steps|window"))


# ---------------------------------------------------------------------------------------------- MemoryConfig
CONFIG_FIELDS = [f.name for f in fields(MemoryConfig)]
config_values = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 3, 7, 255, 300, 2 ** 31, 2 ** 62, 2 ** 70, -2 ** 63]),
    st.sampled_from([0.0, -0.5, 0.5, 0.999, 1.0, 1.5, 1e-30, 1e30, 3e38, 1e39, 1e300, -1e300,
                     math.inf, -math.inf, math.nan]),
    st.sampled_from([True, False, None, "", "titans", "fast", [1], {"a": 1}]),
)


@_settings(100)
@given(changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS), config_values, min_size=1, max_size=2))
def test_memory_config_values(engine, changes):
    """A config is refused with the field's name, or an engine built on it teaches and answers (weights finite)."""
    _count("MemoryConfig values")
    base = {"max_steps": 1, "learn_steps": 1, "memory_hidden": 16, "assoc_dim": 16, "rehearsal_keys": 8}
    try:
        config = MemoryConfig(**{**base, **changes})
    except (TypeError, ValueError) as err:
        assert_clear(err, "|".join(map(re.escape, changes)))
        _count("MemoryConfig values", "refused by MemoryConfig")
        return
    try:
        new = HybridTitansEngine(engine.model, engine.tokenizer, config)
    except (TypeError, ValueError) as err:
        assert_clear(err, "|".join(map(re.escape, changes)) + "|MemoryConfig")
        _count("MemoryConfig values", "refused by the engine")
        return
    if config.max_steps > 3 or config.learn_steps > 3 or config.memory_depth > 64 or config.prefixes_per_step > 64:
        _count("MemoryConfig values", "built")
        return  # valid but slow to run; building it was the check
    try:
        report = new.teach(FACT)
        new.generate("The secret project code is", max_new_tokens=2, learn=True)
    except ValueError as err:  # e.g. a soft prompt that leaves the text too little room
        assert_clear(err, "window|tokens")
        _count("MemoryConfig values", "refused by teach")
        return
    _count("MemoryConfig values", "taught")
    assert report.facts and all(torch.isfinite(p).all() for p in new.memory.parameters())


# ---------------------------------------------------------------------------------------------- save / load
path_names = st.one_of(
    st.text(alphabet=st.characters(exclude_characters="/", exclude_categories=("Cs",)) | controls,
            min_size=1, max_size=20),
    st.sampled_from(["", " ", ".", "..", "a\x00b", "x" * 300, "~", "mem/../mem2", "🙂", "con", "a:b", "-rf"]),
)
path_values = st.one_of(path_names.map(lambda n: ("name", n)), not_text.map(lambda v: ("raw", v)))


@_settings(100)
@given(path=path_values)
def test_save_and_load_paths(engine, tmp_path_factory, path):
    _count("save/load paths")
    root = tmp_path_factory.mktemp("paths")
    (root / "other.txt").write_text("not a memory")  # '.' must never be replaced
    kind, value = path
    target = (root / value) if kind == "name" and value.strip() and "\x00" not in value else value
    before = snapshot(engine)
    try:
        saved = engine.save_pretrained(target)
    except (TypeError, ValueError, OSError) as err:
        if not isinstance(err, OSError):
            assert_clear(err, "save_directory")
        assert_unchanged(engine, before)
        assert (root / "other.txt").read_text() == "not a memory"
        assert not [p for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
        with pytest.raises((TypeError, ValueError, OSError)):
            HybridTitansEngine.from_pretrained(engine.model, target, tokenizer=engine.tokenizer)
        _count("save/load paths", "error")
        return
    _count("save/load paths", "ok")
    assert saved.is_dir() and (saved / "config.json").is_file()
    loaded = HybridTitansEngine.from_pretrained(engine.model, target, tokenizer=engine.tokenizer)
    for name, tensor in engine.memory.state_dict().items():
        assert torch.equal(tensor, loaded.memory.state_dict()[name]), name


# ---------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, engine):
    work = tmp_path_factory.mktemp("cli-props")
    model_dir = work / "tiny-llama"
    engine.model.save_pretrained(model_dir)
    engine.tokenizer.save_pretrained(model_dir)
    from hf_titans import load_base_model

    model, tokenizer = load_base_model(str(model_dir))
    memory = work / "memory"
    taught = HybridTitansEngine(model, tokenizer, MemoryConfig(max_steps=2, learn_steps=1))
    taught.teach(FACT)
    taught.save_pretrained(memory)
    return work, model_dir, memory


def folder_digest(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


cli_texts = st.one_of(texts.filter(lambda t: len(t) < 1000), st.sampled_from(["--help", "-", "--", "-x"]))
cli_numbers = st.one_of(st.integers(-2, 3), st.sampled_from(["", "x", "1.5", "nan", "inf", "-inf", "1e9",
                                                             str(2 ** 64)]))


@st.composite
def cli_calls(draw):
    command = draw(st.sampled_from(["teach", "ask", "inspect"]))
    args = [command]
    if command == "teach":
        args += draw(st.lists(cli_texts, min_size=0, max_size=2))
        args += ["--max-steps", str(draw(cli_numbers))] if draw(st.booleans()) else ["--max-steps", "1"]
        if draw(st.booleans()):
            args += ["--batch-size", str(draw(cli_numbers))]
    elif command == "ask":
        args += [draw(cli_texts), "-n", str(draw(cli_numbers))]
        if draw(st.booleans()):
            args += ["--temperature", str(draw(cli_numbers))]
    return args, draw(st.sampled_from(["existing", "new", "file", "odd-name"])), draw(st.booleans())


@_settings(40)
@given(call=cli_calls())
def test_cli_arguments(cli_setup, tmp_path_factory, call):
    """Exit 0 (done) or 2 (bad input, a message on stderr): never 1 (a crash), never a traceback. A failed
    command leaves the memory folder byte for byte as it was."""
    from typer.testing import CliRunner

    from hf_titans.cli import app

    _count("CLI calls")
    work, model_dir, memory = cli_setup
    args, where, as_json = call
    scratch = tmp_path_factory.mktemp("cli-call")
    target = {"existing": memory, "new": scratch / "new", "file": work / "tiny-llama" / "config.json",
              "odd-name": scratch / "m\u00e9m \x01\u202e"}[where]
    digest = folder_digest(target) if target.is_dir() else None
    extra = ["--model", str(model_dir)] if args[0] in ("teach",) and where != "existing" else []
    argv = (["--json"] if as_json else []) + args + ["--memory", str(target)] + extra
    result = CliRunner().invoke(app, argv)
    assert result.exit_code in (0, 2), (argv, result.exit_code, result.output, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    _count("CLI calls", f"exit {result.exit_code}")
    if result.exit_code == 2:
        assert "error" in result.stderr.lower() or "usage" in result.stderr.lower(), result.stderr
        if digest is not None:
            assert folder_digest(target) == digest
    if where == "existing" and args[0] == "teach" and result.exit_code == 0:
        from hf_titans import hub

        hub.load_checkpoint(target)  # still a valid memory


def test_cli_undecodable_bytes_and_overlong_lines(cli_setup, tmp_path):
    """Real processes, real bytes: an argument that is not UTF-8 exits 2 naming it, before any model is loaded;
    in chat, an undecodable or overlong line is skipped with a warning and the session (and what it learned)
    is saved. Before the fix, either line ended chat with exit 1 and lost everything learned in the session."""
    import json
    import os
    import subprocess
    import sys

    work, model_dir, memory = cli_setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "hf_titans.cli"]
    proc = subprocess.run(cli + ["teach", b"bad \xff byte", "--memory", str(tmp_path / "m")], capture_output=True,
                          env=env, timeout=300)
    assert proc.returncode == 2 and b"not valid Unicode" in proc.stderr and b"Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()
    chat_memory = tmp_path / "chat"
    lines = [FACT.encode(), b"caf\xe9 latin-1 bytes", ("word " * 400).encode(), b"The meeting is at 4:32 PM exactly."]
    proc = subprocess.run(cli + ["--json", "chat", "--memory", str(chat_memory), "--model", str(model_dir)],
                          input=b"\n".join(lines) + b"\n", capture_output=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    turns = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [("error" in t) for t in turns] == [False, True, True, False]
    assert "not valid Unicode" in turns[1]["error"] and "context window" in turns[2]["error"]
    saved = json.loads((chat_memory / "config.json").read_text())["engine"]
    assert saved["taught_count"] == sum(t.get("learned", False) for t in turns) >= 1


def test_huge_persistent_prompt_is_refused_by_name(engine):
    """Found by the property test above: a huge n_persistent_tokens overflowed inside torch instead."""
    with pytest.raises(ValueError, match="n_persistent_tokens=4611686018427387904"):
        HybridTitansEngine(engine.model, engine.tokenizer, MemoryConfig(n_persistent_tokens=2 ** 62))
