"""MemoryBank: several memories on one frozen base model, turned into prompt embeddings for a serving engine.

    bank = MemoryBank(model, tokenizer)
    bank.add("omega", "memories/project-omega")          # a memory folder (reloaded when it changes on disk)
    bank.add("team", "user/team-memory")                 # a Hub repo (re-resolved every hub_check_interval s)
    bank.add("live", engine)                             # a live engine: what it learns is served at once
    bank.add_directory("memories/")                      # every memory folder in it, by folder name
    bank.prompt_embeds("The secret project code is", "omega")   # (sequence, hidden), as vLLM takes it

For a prompt and a memory the bank computes exactly what :meth:`HybridTitansEngine.prompt_embeds` computes: the
memory's soft-prompt vectors joined in front of the prompt's token embeddings when the memory finds the prompt
familiar, otherwise the plain token embeddings (the locality gate). The frozen model's early layers, which give the
memory keys, run once per prompt and key layer, whatever the number of memories; memories are tiny MLPs read once
per prompt. Nothing here imports vLLM.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .. import hub
from ..config import MemoryConfig
from ..engine import HybridTitansEngine
from ..injection import input_embeddings, prompt_key_candidates
from ..memory import NeuralMemory

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")
Prompt = Union[str, Sequence[int]]


class UnknownMemoryError(KeyError):
    """No memory of that name is loaded (a ``KeyError``; the server answers 404)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown memory"


@dataclass
class PromptEmbeds:
    """What the base model gets for one prompt, and what the memory did.

    ``embeds`` is ``(sequence, hidden)``; ``token_ids`` are the prompt's own tokens, and ``insert_at`` the token the
    ``n_soft`` soft-prompt rows stand in front of (0: the whole prompt; else the start of the last sentence, which
    the memory recognised). When the memory is silent ``embeds`` are exactly the token embeddings of
    ``token_ids``, so a server may send the token ids instead.
    """

    embeds: torch.Tensor
    token_ids: list[int]
    memory: Optional[str]
    speaks: bool
    familiarity: Optional[float]
    version: Optional[int] = None
    insert_at: int = 0

    @property
    def n_soft(self) -> int:
        return self.embeds.shape[0] - len(self.token_ids)


@dataclass
class _Entry:
    name: str
    kind: str  # "folder" | "hub" | "engine" | "memory"
    source: Any
    memory: Optional[NeuralMemory] = None
    config: Optional[MemoryConfig] = None
    revision: Optional[str] = None  # hub: the revision asked for; folder: None
    commit: Optional[str] = None  # hub: the commit loaded
    stamp: Any = None  # folder: what the files on disk looked like when loaded
    version: int = 1
    loaded_at: float = field(default_factory=time.time)
    checked_at: float = field(default_factory=time.monotonic)
    last_error: Optional[str] = None
    from_directory: Optional[Path] = None
    loading: threading.Lock = field(default_factory=threading.Lock)  # one reload at a time

    def live(self) -> tuple[NeuralMemory, MemoryConfig, int, Optional[threading.RLock]]:
        if self.kind == "engine":
            engine: HybridTitansEngine = self.source
            return engine.memory, engine.config, int(engine.updates), engine._lock
        assert self.memory is not None and self.config is not None
        return self.memory, self.config, self.version, None


def _folder_stamp(path: Path) -> Optional[tuple]:
    """What a memory folder looks like on disk (files, sizes, inodes, mtimes); None while it is missing.

    ``save_pretrained`` renames a new folder into place, so every save changes the folder's inode and its files'.
    """
    try:
        top = path.stat()
        files = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns, e.stat().st_ino)
                             for e in os.scandir(path) if e.is_file()))
    except FileNotFoundError:
        return None
    return (top.st_ino, top.st_mtime_ns, files)


class MemoryBank:
    """Named memories sharing one frozen base model (the transformers side of a served deployment).

    Args:
        model, tokenizer: the base model the memories were written through, and its tokenizer. Only its input
            embeddings and the layers below each memory's ``key_layer`` are run here; generation runs elsewhere
            (vLLM), on the same weights.
        ignore_base_mismatch: load memories whose recorded base model differs (see :mod:`hf_titans.hub`).
        check_interval: seconds between checks of a memory folder for a new checkpoint (a few ``stat`` calls);
            0 checks on every use.
        hub_check_interval: seconds between re-resolving a Hub memory's revision (one HTTP request); a memory
            added at a commit hash is never re-resolved.
        token, cache_dir, local_files_only: passed to the Hub for Hub memories.
        max_batch: prompts per pass through the early layers.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, ignore_base_mismatch: bool = False,
                 check_interval: float = 1.0, hub_check_interval: float = 60.0, token: Union[str, bool, None] = None,
                 cache_dir: Any = None, local_files_only: bool = False, max_batch: int = 64) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.ignore_base_mismatch = ignore_base_mismatch
        self.check_interval = float(check_interval)
        self.hub_check_interval = float(hub_check_interval)
        self.hub_kwargs = {"token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
        self.max_batch = int(max_batch)
        weight = input_embeddings(model).weight
        self.hidden_size = int(weight.shape[1])
        self.device = weight.device
        self._entries: dict[str, _Entry] = {}
        self._directories: dict[Path, float] = {}  # root -> monotonic time of its last scan
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ adding and removing memories
    def add(self, name: str, source: Any, revision: Optional[str] = None, replace: bool = False) -> None:
        """Serve ``source`` under ``name``.

        ``source`` is a memory folder, a Hub repo id (``revision`` optional), a :class:`HybridTitansEngine` on the
        same base model (served live: what it learns is used from the next request on), or a bare
        :class:`NeuralMemory` (its ``config`` is used). A folder or Hub memory is loaded and checked now (base
        model fingerprint included); errors raise and nothing is added.
        """
        self._check_name(name)
        with self._lock:
            if name in self._entries and not replace:
                raise ValueError(f"a memory named {name!r} is already loaded; pass replace=True to replace it")
        entry = self._make_entry(name, source, revision)
        with self._lock:
            self._entries[name] = entry

    def add_directory(self, root: Any) -> list[str]:
        """Serve every memory folder directly inside ``root`` under its folder name; returns the names added.

        The directory is rescanned every ``check_interval`` seconds: folders saved there later are served from
        then on, folders removed are dropped. A folder that fails to load is skipped with a warning.
        """
        root = Path(root).expanduser().absolute()
        if not root.is_dir():
            raise NotADirectoryError(f"{str(root)!r} is not a folder")
        with self._lock:
            self._directories[root] = -float("inf")
        return self._scan(root)

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._entries:
                raise UnknownMemoryError(f"no memory named {name!r}")
            del self._entries[name]

    def names(self) -> list[str]:
        self._scan_due()
        with self._lock:
            return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __len__(self) -> int:
        return len(self.names())

    def info(self, name: Optional[str] = None) -> Union[dict[str, Any], list[dict[str, Any]]]:
        """What is loaded: kind, source, version (bumped on every reload), commit, load time, last error."""
        if name is None:
            return [self.info(n) for n in self.names()]
        entry = self._entry(name)
        memory, config, version, _ = entry.live()
        return {"name": entry.name, "kind": entry.kind, "source": str(entry.source) if entry.kind in ("folder", "hub")
                else type(entry.source).__name__, "revision": entry.revision, "commit": entry.commit,
                "version": version, "loaded_at": entry.loaded_at, "last_error": entry.last_error,
                "n_memory_tokens": config.n_memory_tokens, "key_layer": config.key_layer,
                "familiarity_threshold": config.familiarity_threshold}

    @staticmethod
    def _check_name(name: Any) -> None:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"memory name must be 1-128 characters of letters, digits and ._:@/+- starting with a "
                             f"letter or digit, got {name!r}")

    def _make_entry(self, name: str, source: Any, revision: Optional[str]) -> _Entry:
        if isinstance(source, HybridTitansEngine):
            if revision is not None:
                raise ValueError("revision applies to Hub memories, not to an engine")
            _check_servable(source.config, f"memory {name!r}")
            if source.model is not self.model:
                base = hub.base_model_info(source.model)
                hub.check_base_model(base, self.model, self.ignore_base_mismatch, source=f"memory {name!r}")
            return _Entry(name, "engine", source)
        if isinstance(source, NeuralMemory):
            if revision is not None:
                raise ValueError("revision applies to Hub memories, not to a NeuralMemory")
            _check_servable(source.config, f"memory {name!r}")
            if source.hidden_size != self.hidden_size:
                raise ValueError(f"memory {name!r} is {source.hidden_size} wide but the base model's hidden size is "
                                 f"{self.hidden_size}")
            return _Entry(name, "memory", source, memory=source.eval(), config=source.config)
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"a memory source is a folder, a Hub repo id, a HybridTitansEngine or a NeuralMemory; "
                            f"got {type(source).__name__}")
        path = Path(source).expanduser()
        if path.is_dir():
            if revision is not None:
                raise ValueError(f"revision={revision!r} applies to Hub repos, but {str(source)!r} is a local folder")
            path = path.absolute()
            stamp = _folder_stamp(path)
            memory, config = self._load(path, None)
            return _Entry(name, "folder", path, memory=memory, config=config, stamp=stamp)
        commit = self._resolve(str(source), revision)
        memory, config = self._load(str(source), commit)
        return _Entry(name, "hub", str(source), memory=memory, config=config, revision=revision, commit=commit)

    def _resolve(self, repo_id: str, revision: Optional[str]) -> Optional[str]:
        """The commit ``revision`` of a Hub repo points to now (None for something that is not a repo id)."""
        if not hub._looks_like_repo_id(repo_id):
            raise FileNotFoundError(f"no memory folder {repo_id!r}, and it is not a Hub repo id ('user/name')")
        from huggingface_hub import HfApi

        kwargs = self.hub_kwargs
        resolved = HfApi().resolve_revision(repo_id, revision=revision, token=kwargs["token"],
                                            cache_dir=kwargs["cache_dir"], local_files_only=kwargs["local_files_only"])
        return getattr(resolved, "resolved", None) or str(resolved)

    def _load(self, source: Any, commit: Optional[str]) -> tuple[NeuralMemory, MemoryConfig]:
        """Read, validate and build a checkpoint's memory (not yet served); raises on any problem."""
        if commit is None:
            checkpoint = hub.load_checkpoint(source)
        else:
            checkpoint = hub.load_checkpoint(source, revision=commit, **self.hub_kwargs)
        hub.check_base_model(checkpoint.base_model, self.model, self.ignore_base_mismatch,
                             source=repr(checkpoint.source))
        _check_servable(checkpoint.config, repr(checkpoint.source))
        memory = checkpoint._build_memory(self.device)
        memory.eval()
        memory.requires_grad_(False)
        return memory, checkpoint.config

    # ------------------------------------------------------------------ reloading
    def refresh(self, name: Optional[str] = None, force: bool = False) -> dict[str, str]:
        """Check memories (all, or ``name``) for a new checkpoint now and reload the changed ones.

        Returns ``{name: what happened}`` for each memory checked: ``"unchanged"``, ``"reloaded"``, ``"added"``,
        ``"removed"`` or ``"error: ..."`` (the memory keeps serving its last good version). ``force=True`` reloads
        even when nothing seems to have changed.
        """
        result: dict[str, str] = {}
        if name is None:
            with self._lock:
                roots = list(self._directories)
            for root in roots:
                before = set(self._entries)
                added = self._scan(root)
                result.update({n: "added" for n in added})
                result.update({n: "removed" for n in before - set(self._entries)})
            with self._lock:
                names = [n for n in self._entries if n not in result]
        else:
            self._entry(name, refresh=False)
            names = [name]
        for n in names:
            entry = self._entries.get(n)
            if entry is not None:
                result[n] = self._refresh_entry(entry, force=force)
        return result

    def _refresh_entry(self, entry: _Entry, force: bool = False) -> str:
        entry.checked_at = time.monotonic()
        if entry.kind not in ("folder", "hub"):
            return "unchanged"  # live objects are always current
        # One reload at a time per memory; other requests meanwhile keep using the version being replaced.
        if not entry.loading.acquire(blocking=force):
            return "unchanged"
        try:
            return self._reload(entry, force)
        finally:
            entry.loading.release()

    def _reload(self, entry: _Entry, force: bool) -> str:
        try:
            if entry.kind == "folder":
                stamp = _folder_stamp(entry.source)
                if stamp is None:  # mid-swap, or removed: keep serving the last good version
                    return "unchanged"
                if stamp == entry.stamp and not force:
                    return "unchanged"
                memory, config = self._load(entry.source, None)
                self._swap(entry, memory, config, stamp=stamp)
            elif entry.kind == "hub":
                commit = self._resolve(entry.source, entry.revision)
                if commit == entry.commit and not force:
                    return "unchanged"
                memory, config = self._load(entry.source, commit)
                self._swap(entry, memory, config, commit=commit)
        except Exception as err:  # keep serving the last good version
            message = f"{type(err).__name__}: {err}"
            if message != entry.last_error:
                logger.warning("memory %r: could not reload %s (%s); still serving version %d",
                               entry.name, entry.source, message, entry.version)
            entry.last_error = message
            return f"error: {message}"
        logger.info("memory %r: reloaded %s (version %d)", entry.name, entry.source, entry.version)
        return "reloaded"

    def _swap(self, entry: _Entry, memory: NeuralMemory, config: MemoryConfig, **fields: Any) -> None:
        with self._lock:
            entry.memory, entry.config = memory, config
            for key, value in fields.items():
                setattr(entry, key, value)
            entry.version += 1
            entry.loaded_at = time.time()
            entry.last_error = None

    def _scan_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [root for root, at in self._directories.items() if now - at >= self.check_interval]
        for root in due:
            self._scan(root)

    def _scan(self, root: Path) -> list[str]:
        """Add memory folders new in ``root``; drop those whose folder is gone. Returns the names added."""
        with self._lock:
            self._directories[root] = time.monotonic()
            mine = {n: e for n, e in self._entries.items() if e.from_directory == root}
        try:
            folders = {p.name: p for p in root.iterdir()
                       if p.is_dir() and not p.name.startswith(".") and (p / hub.CONFIG_NAME).is_file()}
        except FileNotFoundError:
            folders = {}
        added = []
        for name, entry in mine.items():
            if name not in folders and _folder_stamp(entry.source) is None:
                with self._lock:
                    if self._entries.get(name) is entry:
                        del self._entries[name]
        for name, path in sorted(folders.items()):
            with self._lock:
                if name in self._entries:
                    continue
            if not NAME_RE.fullmatch(name):
                logger.warning("skipping memory folder %s: %r is not a valid memory name", path, name)
                continue
            try:
                entry = self._make_entry(name, path, None)
            except Exception as err:
                logger.warning("skipping memory folder %s: %s: %s", path, type(err).__name__, err)
                continue
            entry.from_directory = root
            with self._lock:
                if name not in self._entries:
                    self._entries[name] = entry
                    added.append(name)
        return added

    def _entry(self, name: str, refresh: bool = True) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            self._scan_due()
            entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownMemoryError(f"no memory named {name!r} (loaded: {known})")
        if refresh:
            interval = self.hub_check_interval if entry.kind == "hub" else self.check_interval
            if time.monotonic() - entry.checked_at >= interval:
                self._refresh_entry(entry)
        return entry

    # ------------------------------------------------------------------ prompt embeddings
    def _token_ids(self, prompt: Prompt, add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("a prompt is empty or whitespace; give it some content")
            ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            ids = list(prompt)
        else:
            raise TypeError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if len(ids) == 0:
            raise ValueError("a prompt tokenizes to nothing; give it some content")
        vocab = input_embeddings(self.model).weight.shape[0]
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        return [int(i) for i in ids]

    def _max_tokens(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 10 ** 9)

    @torch.no_grad()
    def embed(self, prompts: Sequence[Prompt], memories: Union[None, str, Sequence[Optional[str]]] = None, *,
              add_special_tokens: bool = True, out_device: Union[str, torch.device, None] = "cpu") -> list[PromptEmbeds]:
        """Prompt embeddings for a batch of prompts, each with its own memory (a name, or None for none).

        ``prompts`` are strings (tokenized like the engine does, with the tokenizer's special tokens unless
        ``add_special_tokens=False``, e.g. for an already templated chat) or lists of token ids. Prompts with the
        same key layer share one pass through the base model's early layers, and each memory reads the keys of all
        its prompts at once.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list; use prompt_embeds() for one prompt")
        prompts = list(prompts)
        if isinstance(memories, str) or memories is None:
            memories = [memories] * len(prompts)
        memories = list(memories)
        if len(memories) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(memories)} memories")
        ids = [self._token_ids(p, add_special_tokens) for p in prompts]
        live = {}
        for name in set(m for m in memories if m is not None):
            live[name] = self._entry(name).live()
        # Raw keys: one pass through the early layers per key layer for all its prompts, right-padded. Causal
        # attention never looks at the pads after a token and positions start at 0 in every row, so each prompt's
        # hidden states are those of the prompt alone (up to float rounding); a single prompt has no padding.
        needed: dict[int, list[int]] = {}
        for i, name in enumerate(memories):
            if name is not None:
                config = live[name][1]
                if len(ids[i]) + config.n_memory_tokens > self._max_tokens():
                    raise ValueError(f"prompt {i} is {len(ids[i])} tokens, longer than the context window left "
                                     f"beside memory {name!r} ({self._max_tokens() - config.n_memory_tokens} tokens)")
                needed.setdefault(config.key_layer, []).append(i)
        raw: dict[tuple[int, int], torch.Tensor] = {}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for layer, rows in needed.items():
            unique = sorted(set(rows))
            for start in range(0, len(unique), self.max_batch):
                group = unique[start:start + self.max_batch]
                width = max(len(ids[i]) for i in group)
                batch = torch.full((len(group), width), pad, dtype=torch.long)
                mask = torch.zeros((len(group), width), dtype=torch.long)
                for row, i in enumerate(group):
                    batch[row, :len(ids[i])] = torch.tensor(ids[i])
                    mask[row, :len(ids[i])] = 1
                batch, mask = batch.to(self.device), mask.to(self.device)
                # the whole prompt and its last sentence, as the engine reads them (HybridTitansEngine._prompt_keys)
                (whole, *sentence), (_, *start) = prompt_key_candidates(self.model, self.tokenizer, batch, mask,
                                                                        layer)
                sentence, start = (sentence[0], start[0]) if sentence else (whole, torch.zeros(len(group)))
                for row, i in enumerate(group):  # rows are right-padded: a start is a place in the prompt
                    raw[(layer, i)] = (whole[row].to(self.device), sentence[row].to(self.device), int(start[row]))
        # Each memory reads the keys of its prompts in one call.
        read: dict[int, tuple[torch.Tensor, float, int]] = {}
        for name, (memory, config, _version, engine_lock) in live.items():
            rows = [i for i, m in enumerate(memories) if m == name]
            if engine_lock is not None:
                engine_lock.acquire()
            try:
                whole, sentence, start = zip(*(raw[(config.key_layer, i)] for i in rows))
                keys, choice = memory.most_familiar_keys(torch.stack(whole), torch.stack(sentence))
                soft, familiarity = memory.read(keys)
            finally:
                if engine_lock is not None:
                    engine_lock.release()
            for row, i in enumerate(rows):
                # the soft prompt goes in front of the candidate read: the whole prompt or its last sentence
                read[i] = (soft[row], float(familiarity[row]), start[row] if int(choice[row]) else 0)
        embedding = input_embeddings(self.model)
        out = []
        for i, name in enumerate(memories):
            tokens = embedding(torch.tensor([ids[i]], device=self.device))[0]
            if name is None:
                out.append(PromptEmbeds(tokens, ids[i], None, False, None))
                continue
            config, version = live[name][1], live[name][2]
            soft, familiarity, at = read[i]
            speaks = familiarity >= config.familiarity_threshold
            embeds = torch.cat([tokens[:at], soft.to(tokens.dtype), tokens[at:]]) if speaks else tokens
            out.append(PromptEmbeds(embeds, ids[i], name, speaks, familiarity, version, at if speaks else 0))
        if out_device is not None:
            for item in out:
                item.embeds = item.embeds.detach().to(out_device)
        return out

    def prompt_embeds(self, prompt: Prompt, memory: Optional[str] = None, *, add_special_tokens: bool = True,
                      ) -> torch.Tensor:
        """The ``(sequence, hidden)`` embeddings for one prompt and memory (None: the plain token embeddings);
        the same as ``HybridTitansEngine.prompt_embeds`` of an engine holding that memory."""
        return self.embed([prompt], [memory], add_special_tokens=add_special_tokens)[0].embeds


def _check_servable(config: MemoryConfig, what: str) -> None:
    """Prompt embeddings carry a memory-as-context soft prompt only; refuse memories that act inside the layers."""
    if config.mode != "mac" or config.n_persistent_tokens:
        raise ValueError(f"{what} is a mode={config.mode!r} memory with {config.n_persistent_tokens} persistent "
                         "token(s); serving through prompt embeddings needs mode='mac' without persistent tokens. "
                         "Use HybridTitansEngine.generate for it, or teach a mac memory.")


def load_bank(model: nn.Module, tokenizer: Any, memories: Union[dict[str, Any], Iterable[tuple[str, Any]]] = (),
              directories: Iterable[Any] = (), **kwargs: Any) -> MemoryBank:
    """A :class:`MemoryBank` with ``memories`` (``{name: folder, Hub id, engine or NeuralMemory}``) and every memory
    folder in ``directories`` loaded."""
    bank = MemoryBank(model, tokenizer, **kwargs)
    items = memories.items() if isinstance(memories, dict) else memories
    for name, source in items:
        bank.add(name, source)
    for root in directories:
        bank.add_directory(root)
    return bank
