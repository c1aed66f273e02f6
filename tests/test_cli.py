"""The `hf-titans` command line, driven as a real console script in subprocesses on a tiny model saved to disk.

Teaching happens in one process and asking in another, so the answer can only come from the saved memory.
A few cheaper checks (chat, interruptions, file and dataset readers) run in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_model, make_tokenizer
from hf_titans import MemoryConfig
from hf_titans.cli import CliError, app, read_dataset, read_facts_file

REPO = Path(__file__).resolve().parents[1]
FACT = "The secret project code is Omega-99."
PROMPT = "The secret project code is"


def _script() -> list[str]:
    script = Path(sys.executable).parent / "hf-titans"
    if script.is_file():
        return [str(script)]
    found = shutil.which("hf-titans")
    if found is None:
        pytest.skip("the hf-titans console script is not installed (pip install -e .)")
    return [found]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_", "HF_ENDPOINT", "HF_TOKEN"))}
    # One thread: tiny models gain nothing from more, and spinning threads crawl on a shared machine.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*_script(), *map(str, args)], capture_output=True, text=True, env=_env(env),
                          input=input, timeout=300)


def run_json(*args: str, **kwargs) -> dict:
    proc = run_cli("--json", *args, **kwargs)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _invoke(args: list[str], input: str | None = None):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def folder_digest(folder: Path) -> dict[str, str]:
    """Name -> sha256 of every file under ``folder`` (hidden ones too): byte-identical means equal digests."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process commands on one thread too, like the subprocesses (see _env)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


def _save_tiny(folder: Path, family: str) -> Path:
    tokenizer = make_tokenizer()
    make_model(family, len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(work) -> Path:
    return _save_tiny(work / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def preset(work) -> Path:
    """A preset for tiny random models: a larger step size than the default, for a fast test."""
    path = work / "tiny.yaml"
    path.write_text("lr: 0.01\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def taught(work, tiny_dir, preset):
    """One fact taught through the console script into a new memory folder: (folder, teach's JSON)."""
    memory = work / "memory"
    data = run_json("teach", FACT, "--memory", memory, "--model", tiny_dir, "--config", preset)
    return memory, data


# ---------------------------------------------------------------------------------------------- the main flow
def test_teach_then_ask_in_another_process(taught, tiny_dir):
    memory, data = taught
    assert data["ok"] and data["command"] == "teach" and data["created"]
    assert data["written"] == 1 and data["skipped"] == 0 and data["steps"] > 0
    fact = data["facts"][0]
    assert fact["text"] == FACT and fact["written"] and fact["surprise_after"] < fact["surprise_before"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(memory))

    answer = run_json("ask", "--memory", memory, PROMPT, "--max-new-tokens", "6")
    bare = run_json("ask", "--memory", memory, PROMPT, "--max-new-tokens", "6", "--no-memory")
    assert answer["memory_spoke"] and answer["use_memory"]
    assert answer["completion"].startswith(" Omega-99"), answer
    assert not bare["memory_spoke"] and "Omega" not in bare["completion"], bare
    # The memory's own base model was found from config.json: no --model was given.
    assert json.loads((memory / "config.json").read_text())["base_model"]["name_or_path"] == str(tiny_dir.resolve())


def test_teach_continues_an_existing_memory(work, taught, tiny_dir):
    memory = work / "continued"
    shutil.copytree(taught[0], memory)
    before = json.loads((memory / "config.json").read_text())["engine"]
    facts = work / "more.jsonl"
    facts.write_text(json.dumps({"text": "The meeting is at 4:32 PM exactly.", "id": 1}) + "\n\n", encoding="utf-8")
    data = run_json("teach", "--file", facts, "--memory", memory, "--save-log")
    assert not data["created"] and data["written"] == 1
    after = json.loads((memory / "config.json").read_text())["engine"]
    assert after["updates"] == before["updates"] + data["steps"]
    assert (memory / "taught.jsonl").read_text().count("\n") == 1  # the log holds what was taught with --save-log


# ---------------------------------------------------------------------------------------------- bad input
BAD_INPUT = {
    "missing file": (["--file", "{work}/nope.txt"], "does not exist"),
    "empty file": (["--file", "{work}/empty.txt"], "is empty"),
    "malformed jsonl": (["--file", "{work}/bad.jsonl"], "line 3: not valid JSON"),
    "jsonl without the field": (["--file", "{work}/nofield.jsonl"], "line 1: no field 'text'"),
    "csv without the column": (["--file", "{work}/facts.csv", "--field", "fact"], "no column 'fact'"),
    "unsupported file type": (["--file", "{work}/facts.pdf"], "unsupported type '.pdf'"),
    "no facts": ([], "nothing to teach"),
    "empty fact": ([""], "fact 1 on the command line is empty"),
    "unknown config key": ([FACT, "--config", "{work}/typo.yaml"], "'lr_rate'"),
    "wrong config type": ([FACT, "--config", "{work}/wrongtype.yaml"], "'max_steps' must be int"),
    "config for an existing memory": ([FACT, "--config", "{repo}/configs/fast-teach.yaml"], "its own config"),
}


@pytest.fixture(scope="module")
def bad_files(work):
    (work / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (work / "bad.jsonl").write_text('{"text": "a fact."}\n\n{"text": oops}\n', encoding="utf-8")
    (work / "nofield.jsonl").write_text('{"sentence": "a fact."}\n', encoding="utf-8")
    (work / "facts.csv").write_text("text,source\nA fact.,me\n", encoding="utf-8")
    (work / "facts.pdf").write_text("%PDF", encoding="utf-8")
    (work / "typo.yaml").write_text("lr_rate: 0.01\n", encoding="utf-8")
    (work / "wrongtype.yaml").write_text("max_steps: many\n", encoding="utf-8")
    return work


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_and_leaves_the_memory_as_it_was(case, taught, bad_files):
    """In-process (the same typer app the console script runs; a subprocess would add seconds of imports each)."""
    memory = taught[0]
    args, message = BAD_INPUT[case]
    args = [a.format(work=bad_files, repo=REPO) for a in args]
    digest, around = folder_digest(memory), siblings(memory)
    result = _invoke(["teach", *args, "--memory", memory])
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert folder_digest(memory) == digest and siblings(memory) == around


def test_bad_input_json_error_and_unwritable_folder(work, bad_files):
    blocker = work / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    proc = run_cli("--json", "teach", FACT, "--memory", blocker / "memory")
    assert proc.returncode == 2
    error = json.loads(proc.stdout)
    assert error["ok"] is False and error["exit_code"] == 2 and "is a file" in error["error"]
    assert blocker.read_text() == "not a folder"

    result = _invoke(["ask", "--memory", work / "no-such-memory", PROMPT])
    assert result.exit_code == 2 and "no memory at" in result.stderr and "hf-titans teach" in result.stderr
    assert not (work / "no-such-memory").exists()
    result = _invoke(["push", "--memory", work / "no-such-memory", "--repo", "not a repo"])
    assert result.exit_code == 2 and "USER/NAME" in result.stderr
    result = _invoke(["teach", FACT])  # usage error: --memory is required
    assert result.exit_code == 2 and "--memory" in result.stderr


def test_memory_of_another_base_model_is_refused(work, taught):
    memory = taught[0]
    other = _save_tiny(work / "tiny-gpt2", "gpt2")
    digest = folder_digest(memory)
    result = _invoke(["teach", "Another fact.", "--memory", memory, "--model", other])
    assert result.exit_code == 2, result.output
    assert "was written through base model" in result.stderr and str(other) in result.stderr
    assert "--ignore-base-mismatch" in result.stderr
    assert folder_digest(memory) == digest


# ---------------------------------------------------------------------------------------------- in-process
def test_plain_output_stream_and_inspect(taught):
    memory, _ = taught
    result = _invoke(["ask", "--memory", memory, PROMPT, "-n", "6", "--stream"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(" Omega-99") and "memory spoke" in result.stderr

    info = json.loads(_invoke(["--json", "inspect", "--memory", memory]).stdout)
    assert info["taught_count"] == 1 and info["updates"] > 0 and info["taught_log"] is None
    assert info["config"] == MemoryConfig(lr=0.01).to_dict()
    assert info["base_model"]["hidden_size"] == 64 and info["memory_values"] > 0
    assert info["bytes"] == sum(info["files"].values())
    text = _invoke(["inspect", "--memory", memory]).stdout
    assert "taught          1 texts" in text and "\n  lr " in text and " 0.01\n" in text


def test_chat_learns_and_saves_on_exit(work, tiny_dir, preset):
    memory = work / "chat"
    result = _invoke(["--json", "chat", "--memory", memory, "--model", tiny_dir, "--config", preset],
                     input=f"{FACT}\n\n/help\n")
    assert result.exit_code == 0, result.output
    turn = json.loads(result.stdout.strip().splitlines()[0])
    assert turn["prompt"] == FACT and turn["learned"] and turn["surprise"] > 1
    saved = json.loads((memory / "config.json").read_text())["engine"]
    assert saved["taught_count"] == 1 and saved["updates"] > 0


def test_ctrl_c_leaves_a_consistent_memory(work, tiny_dir, preset, monkeypatch):
    from hf_titans import HybridTitansEngine

    original_teach, original_generate = HybridTitansEngine.teach, HybridTitansEngine.generate
    calls = {"teach": 0, "generate": 0}

    def teach(self, facts, *args, **kwargs):
        calls["teach"] += 1
        if calls["teach"] == 2:
            raise KeyboardInterrupt
        return original_teach(self, facts, *args, **kwargs)

    def generate(self, prompt, *args, **kwargs):
        calls["generate"] += 1
        if calls["generate"] == 2:
            raise KeyboardInterrupt
        return original_generate(self, prompt, *args, **kwargs)

    monkeypatch.setattr(HybridTitansEngine, "teach", teach)
    monkeypatch.setattr(HybridTitansEngine, "generate", generate)
    # teach: the batch that finished is saved, the interrupted one is not; exit 130.
    memory = work / "interrupted"
    result = _invoke(["teach", FACT, "The meeting is at 4:32 PM exactly.", "--batch-size", "1", "--memory", memory,
                      "--model", tiny_dir, "--config", preset])
    assert result.exit_code == 130, result.output
    assert json.loads((memory / "config.json").read_text())["engine"]["taught_count"] == 1
    # chat: Ctrl-C on the second line saves what the first one taught, and leaves cleanly.
    memory = work / "chat-interrupted"
    result = _invoke(["chat", "--memory", memory, "--model", tiny_dir, "--config", preset],
                     input=f"{FACT}\nThe meeting is at 4:32 PM exactly.\n")
    assert result.exit_code == 0, result.output
    assert json.loads((memory / "config.json").read_text())["engine"]["taught_count"] == 1
    monkeypatch.undo()
    assert _invoke(["ask", "--memory", memory, PROMPT, "-n", "4"]).exit_code == 0


def test_fact_file_readers(tmp_path):
    txt = tmp_path / "facts.txt"
    txt.write_text("First fact.\n\n  Second fact.  \n", encoding="utf-8")
    assert read_facts_file(txt) == ["First fact.", "Second fact."]
    jsonl = tmp_path / "facts.jsonl"
    jsonl.write_text('{"fact": "A."}\n"B."\n', encoding="utf-8")
    assert read_facts_file(jsonl, field="fact") == ["A.", "B."]
    csv_file = tmp_path / "facts.csv"
    csv_file.write_text('fact,n\n"Eggs, milk, bread",1\n,\n', encoding="utf-8")
    assert read_facts_file(csv_file, field="fact") == ["Eggs, milk, bread"]
    jsonl.write_text('{"fact": "A."}\n{"fact": 3}\n', encoding="utf-8")
    with pytest.raises(CliError, match="line 2: expected a string"):
        read_facts_file(jsonl, field="fact")


def test_dataset_reader(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"fact": f"Fact number {i}."}) + "\n" for i in range(5)), encoding="utf-8")
    assert read_dataset(str(data), field="fact", limit=3) == ["Fact number 0.", "Fact number 1.", "Fact number 2."]
    with pytest.raises(CliError, match="no column 'text'; its columns are 'fact'"):
        read_dataset(str(data))
    with pytest.raises(CliError, match="split"):
        read_dataset(str(data), split="test", field="fact")


# ---------------------------------------------------------------------------------------------- presets
def test_presets_load_and_default_is_the_default():
    presets = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.name for p in presets} >= {"default.yaml", "fast-teach.yaml", "titans.yaml"}
    for path in presets:
        MemoryConfig.from_file(path)
    assert MemoryConfig.from_file(REPO / "configs" / "default.yaml") == MemoryConfig()
    # Every key is written out in default.yaml, so it documents the whole config.
    assert set(yaml.safe_load((REPO / "configs" / "default.yaml").read_text())) == set(MemoryConfig().to_dict())
    fast = MemoryConfig.from_file(REPO / "configs" / "fast-teach.yaml")
    assert fast.max_steps < MemoryConfig().max_steps


# ---------------------------------------------------------------------------------------------- the Hub
def test_push_then_ask_from_the_hub(work, taught):
    """push and ask --memory USER/NAME against the local fake Hub (tests/hub_server.py), configured by env only."""
    from hub_server import HubServer

    token = "hf_test_token_for_the_cli"
    with HubServer(token=token) as server:
        env = {"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(work / "hf_home"),
               "HF_HUB_OFFLINE": "0", "HF_TOKEN": token}
        pushed = run_json("push", "--memory", taught[0], "--repo", "tester/cli-memory", "--private", env=env)
        assert pushed["repo"] == "tester/cli-memory" and server.repos["tester/cli-memory"].private
        assert {"config.json", "model.safetensors", "README.md"} <= set(server.files("tester/cli-memory"))
        answer = run_json("ask", "--memory", "tester/cli-memory", PROMPT, "-n", "6", env=env)
        assert answer["completion"].startswith(" Omega-99") and answer["memory_spoke"]
