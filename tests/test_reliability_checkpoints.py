"""Damaged and hostile checkpoints, killed processes, full disks and read-only folders (issue 9, part 3 and 4).

tests/test_hub.py already covers missing/unexpected tensors, one wrong shape, NaN values, tampered config keys,
file names escaping the folder, and a pickle planted as model.safetensors with pickle monkeypatched away. Here:
truncation at many lengths, flipped bytes all over the files (a checksum in the safetensors header catches those
in the tensor data), every tensor with a wrong shape, unknown variants, pickles that would create a file if
anything unpickled them (nothing is monkeypatched), remote code planted beside a base model, SIGKILL at random
points (scripts/fault_injection.py) and at the one moment a save leaves no folder, real ENOSPC/EFBIG and
read-only file systems.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_model, make_tokenizer
from hf_titans import HybridTitansEngine, MemoryConfig, hub
from hf_titans.reliability import DIGEST_KEY

REPO = Path(__file__).resolve().parents[1]
FACTS = ["The secret project code is Omega-99.", "The meeting is at 4:32 PM exactly."]
PROMPT = "The secret project code is"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    return make_model("llama", len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def engine(base):
    model, tokenizer = base
    engine = HybridTitansEngine(model, tokenizer, MemoryConfig(max_steps=3, learn_steps=2))
    engine.teach(FACTS)
    return engine


@pytest.fixture
def saved(engine, tmp_path):
    folder = engine.save_pretrained(tmp_path / "mem", save_taught_log=True)
    return folder


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def memory_tensors(engine: HybridTitansEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.memory.state_dict().items()}


def same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def load(folder: Path):
    return hub.load_checkpoint(folder)


# ---------------------------------------------------------------------------------------------- damaged files
def test_the_checksum_is_saved_and_checked(engine, saved):
    from safetensors import safe_open

    with safe_open(str(saved / "model.safetensors"), framework="pt") as f:
        assert f.metadata()[DIGEST_KEY].startswith("sha256:")
    checkpoint = load(saved)
    assert same_tensors(checkpoint.memory_state, memory_tensors(engine))


def test_truncated_weights_are_refused_at_every_length(saved):
    data = (saved / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    cuts = sorted({0, 1, 7, 8, 9, header - 1, header, header + 1, len(data) // 2, len(data) - 4, len(data) - 1}
                  | {rng.randrange(len(data)) for _ in range(40)})
    for cut in cuts:
        (saved / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a valid safetensors file|checksum|weights do not match"):
            load(saved)
    (saved / "model.safetensors").write_bytes(data)
    load(saved)


def test_truncated_config_and_taught_log_are_refused(saved):
    config = (saved / "config.json").read_bytes()
    for cut in (0, 1, len(config) // 3, len(config) // 2, len(config) - 3):
        (saved / "config.json").write_bytes(config[:cut])
        with pytest.raises(ValueError, match="config.json: not valid JSON|not an hf_titans memory config"):
            load(saved)
    (saved / "config.json").write_bytes(config)
    log = (saved / "taught.jsonl").read_bytes()
    assert log.count(b"\n") == 2
    (saved / "taught.jsonl").write_bytes(log[: log.index(b"\n") + 1])  # cut at a line end: still valid JSON lines
    with pytest.raises(ValueError, match="holds 1 texts but the config records 2: the log is truncated"):
        load(saved)
    (saved / "taught.jsonl").write_bytes(log[:-5])  # cut inside a line
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load(saved)


def flip(path: Path, position: int, bit: int) -> bytes:
    data = path.read_bytes()
    damaged = bytearray(data)
    damaged[position] ^= 1 << bit
    path.write_bytes(bytes(damaged))
    return data


def test_flipped_bytes_in_the_weights_are_refused_or_harmless(engine, saved):
    """Every flip is refused with a clear error, or (a flip in a header field nothing reads back) loads the very
    same tensors. Without the checksum, flips in the tensor data loaded silently (changed weights)."""
    path = saved / "model.safetensors"
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    positions = sorted(set(range(8)) | {rng.randrange(8, header) for _ in range(120)}
                       | {rng.randrange(header, len(data)) for _ in range(120)})
    original = memory_tensors(engine)
    refused = harmless = 0
    for position in positions:
        flip(path, position, rng.randrange(8))
        try:
            checkpoint = load(saved)
        except (ValueError, TypeError) as err:
            assert "model.safetensors" in str(err) or "weights" in str(err) or "tensor" in str(err), err
            refused += 1
        else:
            assert same_tensors(checkpoint.memory_state, original), f"flip at byte {position} changed the weights"
            harmless += 1
        path.write_bytes(data)
    assert refused >= len(positions) - 20
    print(f"\nflipped bits in model.safetensors: {len(positions)} tried, {refused} refused, {harmless} harmless")


def test_flipped_bytes_in_config_never_crash(saved):
    """config.json has no checksum (it is meant to be readable): a flip is refused (JSON, keys, types, ranges,
    tensor shapes, UTF-8) or changes a value that passes validation; never another exception."""
    path = saved / "config.json"
    data = path.read_bytes()
    rng = random.Random(1)
    outcomes = {"refused": 0, "loaded": 0}
    for _ in range(150):
        flip(path, rng.randrange(len(data)), rng.randrange(8))
        try:
            load(saved)
            outcomes["loaded"] += 1
        except (ValueError, TypeError) as err:
            assert "config" in str(err) or "tensor" in str(err) or "weights" in str(err), err
            outcomes["refused"] += 1
        except FileNotFoundError as err:  # a flip in a file name ("model.safetensors" -> "modem.safetensors")
            assert "missing" in str(err)
            outcomes["refused"] += 1
        path.write_bytes(data)
    print(f"\nflipped bits in config.json: 150 tried, {outcomes}")
    assert outcomes["refused"] > outcomes["loaded"]


def test_every_tensor_with_a_wrong_shape_is_refused_by_name(saved):
    path = saved / "model.safetensors"
    tensors = load_file(path)
    for name in sorted(tensors):
        bad = dict(tensors)
        bad[name] = torch.zeros(*(d + 1 for d in tensors[name].shape), 1, dtype=tensors[name].dtype)
        save_file(bad, path)
        with pytest.raises(ValueError, match=f"tensor '{name}' is"):
            load(saved)
    save_file(tensors, path)
    load(saved)


@pytest.mark.parametrize("field, value, message", [
    ("variant", "nonsense", "unknown variant 'nonsense'"), ("variant", "../../etc/passwd", "unknown variant"),
    ("mode", "exec", "unknown mode 'exec'"), ("seed", -1, "'seed' must be in"), ("lr", 1e300, "'lr' must be"),
])
def test_config_naming_an_unknown_variant_or_absurd_values_is_refused(saved, field, value, message):
    config = json.loads((saved / "config.json").read_text())
    config["memory_config"][field] = value
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load(saved)


# ---------------------------------------------------------------------------------------------- hostile files
class Plant:
    """Unpickling this runs Python code that creates ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickles_planted_everywhere_are_refused_and_never_run(engine, saved, tmp_path):
    """Nothing is monkeypatched: had anything unpickled one of these, the marker file would exist."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"prompt_bias": Plant(marker)})
    for name in ("pytorch_model.bin", "model.bin", "optimizer.pt", "memory.pkl", "training_args.bin"):
        (saved / name).write_bytes(payload)  # beside a good checkpoint: ignored
    load(saved)
    original = (saved / "model.safetensors").read_bytes()
    torch.save({"prompt_bias": Plant(marker)}, tmp_path / "zip.pt")  # torch's zip format, with a pickle inside
    for planted in (payload, (tmp_path / "zip.pt").read_bytes()):
        (saved / "model.safetensors").write_bytes(planted)
        with pytest.raises(ValueError, match="not a valid safetensors file.*never unpickles"):
            HybridTitansEngine.from_pretrained(engine.model, saved, tokenizer=engine.tokenizer)
        with pytest.raises(ValueError, match="not a valid safetensors file"):
            engine.load_memory(saved)
    (saved / "model.safetensors").write_bytes(original)
    for name in ("config.json", "taught.jsonl"):
        good = (saved / name).read_bytes()
        (saved / name).write_bytes(payload)
        with pytest.raises(ValueError, match="not UTF-8 text|not valid JSON"):
            load(saved)
        (saved / name).write_bytes(good)
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pickle files are refused"):
        load(saved)
    assert not marker.exists()


def test_remote_code_beside_a_base_model_is_never_run(base, tmp_path):
    """A base-model folder whose config asks for custom code (auto_map) is loaded with the built-in class;
    trust_remote_code is never passed, so the planted module is never imported (through the CLI, too)."""
    model, tokenizer = base
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker = tmp_path / "remote-code-ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n"
                                             "from transformers import LlamaForCausalLM as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    memory = tmp_path / "memory"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-m", "hf_titans.cli", "--json", "teach", FACTS[0], "--memory",
                           str(memory), "--model", str(folder), "--max-steps", "1"],
                          capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert not marker.exists(), "planted remote code was executed"
    assert proc.returncode in (0, 2), proc.stderr  # loaded with the built-in class, or refused: never run
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- kills
def _run_script(code: str, timeout: int = 300, preexec=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=timeout, preexec_fn=preexec)


def test_random_kills_during_save_teach_and_chat(tmp_path):
    """A few random SIGKILLs (scripts/fault_injection.py runs 50): the folder always loads and answers exactly
    what the memory that was saved whole answered; plus one kill between the two renames of a save."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import fault_injection
    finally:
        sys.path.remove(str(REPO / "scripts"))
    counts = fault_injection.run(kills=5, seed=1, work=tmp_path / "faults", max_delay=0.8, verbose=False)
    assert counts["failures"] == 0, counts["failure_details"]
    assert counts["kills"] == 6 and counts["loads_ok"] == 6 and counts["recovered_rename_window"] == 1


def test_a_save_killed_between_its_renames_is_recovered_by_the_cli(engine, tmp_path):
    folder = engine.save_pretrained(tmp_path / "mem")
    before = digest(folder)
    proc = _run_script(f"""
        import os, signal, torch
        from conftest import make_model, make_tokenizer
        from hf_titans import HybridTitansEngine, hub
        tok = make_tokenizer()
        engine = HybridTitansEngine.from_pretrained(make_model("llama", len(tok)), {str(folder)!r}, tokenizer=tok)
        engine.teach("Another fact that changes the memory.", max_steps=2)
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if ".old-" in str(dst):
                os.kill(os.getpid(), signal.SIGKILL)
        hub.os.replace = replace
        engine.save_pretrained({str(folder)!r})
    """)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not folder.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".mem.old-")]
    from hf_titans.cli import _read_memory_config

    info = _read_memory_config(folder)  # what every CLI command does first: the old checkpoint is put back
    assert info is not None and digest(folder) == before


# ---------------------------------------------------------------------------------------------- full disk, read-only
def _mount_tmpfs(path: Path, options: str) -> bool:
    if os.geteuid() != 0 or sys.platform != "linux":
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def test_full_disk_tmpfs_gives_a_clear_error_and_keeps_the_old_checkpoint(engine, tmp_path):
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "size=8m"):
        pytest.skip("needs root to mount a small tmpfs (the EFBIG test below runs without)")
    try:
        folder = engine.save_pretrained(mount / "mem")
        before = digest(folder)
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk but for a few KB
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
        finally:
            os.close(fd)
        os.truncate(mount / "filler", os.path.getsize(mount / "filler") - 16384)
        with pytest.raises(OSError, match="No space left on device: the disk is full") as info:
            engine.save_pretrained(folder)
        assert info.value.errno == errno.ENOSPC
        assert digest(folder) == before and sorted(p.name for p in mount.iterdir()) == ["filler", "mem"]
        load(folder)
    finally:
        _umount(mount)


def test_file_size_limit_gives_a_clear_error_in_the_library_and_the_cli(engine, tmp_path):
    """A real write failure from the kernel (RLIMIT_FSIZE: EFBIG), no root needed; the CLI exits 1 with the
    library's message and no traceback; the old checkpoint is byte for byte intact."""
    model_dir = tmp_path / "model"
    engine.model.save_pretrained(model_dir)
    engine.tokenizer.save_pretrained(model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    memory = tmp_path / "memory"
    from hf_titans import load_base_model

    model, tokenizer = load_base_model(str(model_dir))  # records model_dir as the base model, as the CLI does
    first = HybridTitansEngine(model, tokenizer, MemoryConfig(max_steps=2))
    first.teach(FACTS[0])
    first.save_pretrained(memory)
    before = digest(memory)
    limit = os.path.getsize(memory / "model.safetensors") // 2

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "hf_titans.cli", "teach", FACTS[1], "--memory", str(memory),
                           "--max-steps", "2"], capture_output=True, text=True, env=env, timeout=300,
                          preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr
    assert "cannot save the memory to" in proc.stderr and "File too large" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "SafetensorError" not in proc.stderr
    assert digest(memory) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".memory.")]


def test_read_only_folder_gives_a_clear_error(engine, tmp_path, monkeypatch):
    folder = engine.save_pretrained(tmp_path / "mem")
    before = digest(folder)
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if Path(path).parent == tmp_path:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(OSError, match="Read-only file system.*the file system is read-only; choose another "
                                      "save_directory") as info:
        engine.save_pretrained(folder)
    assert info.value.errno == errno.EROFS
    monkeypatch.undo()
    assert digest(folder) == before


def test_read_only_mount_in_the_library_and_the_cli(engine, tmp_path):
    mount = tmp_path / "ro"
    if not _mount_tmpfs(mount, "size=4m"):
        pytest.skip("needs root to mount a tmpfs read-only")
    try:
        folder = engine.save_pretrained(mount / "mem")
        before = digest(folder)
        assert subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True).returncode == 0
        with pytest.raises(OSError, match="read-only") as info:
            engine.save_pretrained(folder)
        assert info.value.errno == errno.EROFS
        from typer.testing import CliRunner

        from hf_titans.cli import app

        result = CliRunner().invoke(app, ["teach", FACTS[1], "--memory", str(folder)])
        assert result.exit_code == 2 and "not writable" in result.stderr, result.stderr
        assert digest(folder) == before
        load(folder)
    finally:
        _umount(mount)
