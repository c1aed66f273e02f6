"""Guards the engine, the checkpoints and the CLI share: input checks, a finite-only update, size limits.

Each check fails with a ``TypeError`` or ``ValueError`` that names the argument, what was wrong and how to fix
it, before anything is computed or written (see docs/reliability.md for what is tested and measured).
"""

from __future__ import annotations

import logging
import operator
import os
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- text
def check_unicode(text: str, what: str) -> None:
    """Refuse a string that cannot be encoded as UTF-8 (a lone surrogate, e.g. from undecodable bytes).

    Tokenizers cannot take such strings and fail with an unrelated message deep inside; say it here instead.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} is not valid Unicode: {err.object[err.start:err.end]!r} at character {err.start} "
                         f"is a lone surrogate (undecodable input bytes?); decode the input as UTF-8 "
                         f"(errors='replace') or remove that character") from None


def check_count(value: Any, name: str, minimum: int = 0) -> int:
    """An integer argument (``int`` or numpy integer, not ``bool``, not a float) that is at least ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool ({value!r})")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r})") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r})")
    return value


def check_path(value: Any, what: str) -> Path:
    """A folder argument: a non-empty ``str`` or ``os.PathLike`` without NUL characters."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a folder path (str or pathlib.Path), got {type(value).__name__} ({value!r})")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a text path, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what} is empty; give a folder path")
    if "\x00" in text:
        raise ValueError(f"{what} {text!r} contains a NUL character, which no file system allows")
    return Path(text)


# ---------------------------------------------------------------------------------------------------- generate
def check_generate_kwargs(kwargs: dict[str, Any], prompt_tokens: int, memory_tokens: int, window: Optional[int]) -> None:
    """``max_new_tokens`` must be a positive integer that fits the model's context window with the prompt and the
    memory's soft prompt (past the window, models with learned positions fail deep inside torch)."""
    if "max_new_tokens" not in kwargs or kwargs["max_new_tokens"] is None:
        return
    n = check_count(kwargs["max_new_tokens"], "max_new_tokens", 1)
    if window is not None and prompt_tokens + memory_tokens + n > window:
        raise ValueError(f"max_new_tokens={n} does not fit the model's context window: the prompt is {prompt_tokens} "
                         f"tokens, the memory's soft prompt {memory_tokens}, and the window {window}; ask for at most "
                         f"{max(window - prompt_tokens - memory_tokens, 0)} new tokens or shorten the prompt")


def context_window(model: Any) -> Optional[int]:
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(limit) if limit else None


# ---------------------------------------------------------------------------------------------------- sizes
def memory_bytes(config: Any, hidden_size: int) -> int:
    """Bytes a memory of ``config`` needs (parameters, buffers and two optimizer states per parameter), counted
    on a storage-less copy built on the meta device, so an absurd config is measured without allocating it."""
    from .hub import _architecture

    memory = _architecture(config, hidden_size)
    params = sum(p.numel() * p.element_size() for p in memory.parameters())
    buffers = sum(b.numel() * b.element_size() for b in memory.buffers())
    return buffers + 3 * params


def device_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def check_config_fits(config: Any, model: Any, hidden_size: int, device: torch.device) -> None:
    """Refuse a config whose memory cannot exist beside this model: a soft prompt that leaves no room in the
    context window, or tensors larger than half of the device's memory (they would fail to allocate, or get the
    process killed, deep inside torch)."""
    window = context_window(model)
    prefix = config.n_memory_tokens + config.n_persistent_tokens
    if window is not None and prefix > window - 2:
        raise ValueError(f"MemoryConfig: n_memory_tokens={config.n_memory_tokens} + n_persistent_tokens="
                         f"{config.n_persistent_tokens} leave no room in the model's context window ({window} "
                         f"tokens); use at most {window - 2} in all, a few dozen at most is usual")
    # A lower bound computed without building anything (the soft-prompt bias, one bias per layer, the first weight
    # and the fp16 rehearsal bank), so that an absurd config is refused before even the meta-device build.
    m = config.memory_hidden
    needed = (4 * (prefix * hidden_size + config.memory_depth * m + m * hidden_size)
              + 2 * config.rehearsal_keys * hidden_size)
    if needed < 2 ** 34:
        needed = memory_bytes(config, hidden_size)
    limit = device_bytes(device)
    if limit is not None and needed > limit / 2:
        sizes = ", ".join(f"{k}={getattr(config, k)}" for k in ("n_memory_tokens", "memory_hidden", "memory_depth",
                                                                 "assoc_dim", "rehearsal_keys"))
        raise ValueError(f"MemoryConfig: this memory needs {'at least ' if needed >= 2 ** 34 else ''}"
                         f"{needed / 1e9:.3g} GB ({sizes}, hidden size {hidden_size}), more "
                         f"than half of the {device.type} memory ({limit / 1e9:.1f} GB); use smaller values")


# ---------------------------------------------------------------------------------------------------- updates
def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())


@torch.no_grad()
def finite_step(optimizer: torch.optim.Optimizer) -> bool:
    """``optimizer.step()``, undone when it leaves any memory weight or optimizer state non-finite.

    The optimizers of :mod:`hf_titans.memory` already refuse a non-finite gradient (``step()`` returns ``False``
    and writes nothing); a finite gradient can still overflow (a huge step size, a momentum that grew without
    bound). Returns ``False`` when the step was refused or undone: the weights and the optimizer state are then
    exactly what they were before the call.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    saved_state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
                   for p in params if p in optimizer.state}
    if optimizer.step() is False:  # the memory optimizers return False and write nothing; torch's return None
        return False
    if _all_finite(params) and _all_finite(t for p in params for t in optimizer.state.get(p, {}).values()):
        return True
    for p, old in zip(params, saved):
        p.copy_(old)
        if id(p) in saved_state:
            optimizer.state[p] = saved_state[id(p)]
        else:
            optimizer.state.pop(p, None)
    return False


def weight_stats(memory: torch.nn.Module) -> dict[str, float]:
    """Largest absolute value, count of non-finite values and global L2 norm of a memory's learned weights."""
    params = [p.detach().double() for p in memory.parameters()]
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    return {"max_abs": max(float(p.abs().max()) for p in params),
            "norm": float(torch.sqrt(sum((p ** 2).sum() for p in params))),
            "non_finite": sum(int((~torch.isfinite(p)).sum()) for p in params), "finite": finite}


# ---------------------------------------------------------------------------------------------------- checkpoints
def interrupted_save(target: Path) -> Optional[Path]:
    """The previous checkpoint of ``target`` left aside by a save that was killed between its two renames.

    ``save_pretrained`` replaces an existing folder by renaming it to ``.<name>.old-<id>`` and the new one into
    place; a kill between the two leaves no ``target`` and the complete old checkpoint beside it. Returns the
    newest such folder that holds a ``config.json``, or ``None``.
    """
    target = Path(target)
    parent = target.parent
    if target.exists() or target.is_symlink() or not parent.is_dir():
        return None
    prefix = f".{target.name}.old-"
    aside = [p for p in parent.iterdir()
             if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink() and (p / "config.json").is_file()]
    if not aside:
        return None
    return max(aside, key=lambda p: p.stat().st_mtime)


def recover_interrupted_save(target: Any) -> bool:
    """Put back the checkpoint an interrupted save left aside (see :func:`interrupted_save`); ``True`` if it did.

    Without this a killed save could leave a memory folder missing, and the CLI would start a new, empty memory
    in its place while the old one sat hidden beside it.
    """
    target = Path(target).expanduser().absolute()
    aside = interrupted_save(target)
    if aside is None:
        return False
    try:
        os.rename(aside, target)  # fails, changing nothing, if target appeared meanwhile
    except OSError as err:
        logger.warning("could not put back %s (left aside by an interrupted save) as %s: %s", aside, target, err)
        return False
    logger.warning("%s was missing after an interrupted save; put back the previous checkpoint from %s",
                   target, aside.name)
    return True


def save_error(err: Exception, target: Path) -> OSError:
    """``err`` (same class and errno) with a message that says which save failed, why, and what to do.

    safetensors reports a failed write (a full disk, say) as a ``SafetensorError`` ending in ``(os error N)``;
    that becomes the ``OSError`` of errno N, so callers catch every I/O failure of a save as ``OSError``."""
    import errno as errno_codes
    import re

    if not isinstance(err, OSError):
        match = re.search(r"os error (\d+)", str(err))
        code = int(match.group(1)) if match else None
        err = OSError(code, os.strerror(code)) if code is not None else OSError(f"{type(err).__name__}: {err}")
    reason = err.strerror or str(err)
    hints = {errno_codes.ENOSPC: ": the disk is full; free some space and save again",
             errno_codes.EDQUOT: ": the disk quota is exhausted; free some space and save again",
             errno_codes.EFBIG: ": the file size limit was reached",
             errno_codes.EROFS: ": the file system is read-only; choose another save_directory",
             errno_codes.EACCES: ": the folder is not writable; choose another save_directory",
             errno_codes.EPERM: ": the folder is not writable; choose another save_directory"}
    where = f" ({err.filename})" if err.filename and err.strerror else ""
    message = (f"cannot save the memory to {str(target)!r}: {reason}{where}{hints.get(err.errno, '')}. "
               f"The folder is as it was before (the previous checkpoint, if any, is intact)")
    new = type(err)(err.errno, message) if err.errno is not None else type(err)(message)
    return new


# ---------------------------------------------------------------------------------------------------- checksums
DIGEST_KEY = "hf_titans_sha256"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` over every tensor's name, dtype, shape and bytes (in name order).

    Saved in the safetensors header, so a flipped bit or a partial copy of the weights is refused on load instead
    of silently changing what the memory answers. Integrity only, not authenticity: it is not a signature.
    """
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def verify_digest(path: Path, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights whose bytes do not match the checksum saved with them (older files without one pass)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        expected = (f.metadata() or {}).get(DIGEST_KEY)
    if expected is None:
        return
    actual = tensors_digest(tensors)
    if actual != expected:
        raise ValueError(f"{source}: {path.name} does not match the checksum saved with it ({expected[:19]}..., "
                         f"the bytes give {actual[:19]}...): the file is damaged (a flipped bit, a partial copy) or "
                         f"was edited. Restore it from a good copy, or save the memory again from an engine")
