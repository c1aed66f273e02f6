"""Data-dependent step size, momentum, forgetting (and Huber threshold) computed from the input.

Titans makes ``theta_t`` (step size), ``eta_t`` (momentum, "surprise decay") and ``alpha_t`` (forgetting)
functions of the token ``x_t`` (sec. 3.1, eqs. 13-14: "eta_t is a data-dependent surprise decay (a function
of x_t)"), or of its chunk (sec. 3.2, "Parameters as the Function of Chunks"); TTT uses
``eta(x) = eta_base sigmoid(theta_lr . x)`` (sec. 2.7); MIRAS makes ``eta_t, delta_t, alpha_t`` channel-wise
and data-dependent (sec. 5.3). The common form, used here for every gate, is a bounded sigmoid of a linear map:

    gate_t = max * sigmoid(x_t w + b)

With the weights at zero (the default) every gate equals its initial value for every input, so a rule
driven by :class:`DataDependentGates` starts exactly as the same rule with constants; ``init_std > 0`` makes
it data-dependent from the start. Training ``w, b`` is the outer loop's job.

Using the gates. The functional rules (:func:`~hf_titans.memory.parallel.titans_chunked`,
:mod:`~hf_titans.memory.ttt`) take per-token tensors directly. An optimizer step writes a whole batch at once,
so per-sample step sizes go into the loss, ``sum_i theta_i grad l_i = grad sum_i theta_i l_i`` (weight the
per-sample losses of :mod:`~hf_titans.memory.objectives`), and per-step scalars (``eta``, ``alpha``, or one
``theta`` per step) are set on the optimizer with :func:`apply_gates` before ``step()``.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

__all__ = ["DataDependentGates", "TITANS_GATES", "YAAD_GATES", "MIRAS_GATES", "apply_gates", "GATE_TO_GROUP_KEY"]

#: name -> (initial value, maximum). theta: step size; eta: momentum; alpha: forgetting.
TITANS_GATES: Mapping[str, tuple[float, float]] = {"theta": (0.1, 1.0), "eta": (0.9, 1.0), "alpha": (0.001, 1.0)}
#: Moneta, Memora: a step size and a forgetting gate (MIRAS eqs. 24, 27).
MIRAS_GATES: Mapping[str, tuple[float, float]] = {"theta": (0.1, 1.0), "alpha": (0.001, 1.0)}
#: Yaad adds the data-dependent Huber threshold delta_t (MIRAS eq. 26).
YAAD_GATES: Mapping[str, tuple[float, float]] = {**MIRAS_GATES, "delta": (1.0, 10.0)}

#: Which optimizer param-group key each gate sets in :func:`apply_gates` (alpha is always "forget" = 1 - retain).
GATE_TO_GROUP_KEY = {"theta": "lr", "eta": "momentum", "alpha": "forget"}


class DataDependentGates(nn.Module):
    """``gate_t = max * sigmoid(x_t w + b)`` for each named gate, per token (or per chunk).

    Args:
        d_in: width of the input ``x``.
        gates: name -> ``(initial value, maximum)``; the bias starts at ``logit(initial / maximum)``.
        channels: 1 for one scalar per token (output shape ``x.shape[:-1]``), or ``c > 1`` for channel-wise
            gates (output ``(*x.shape[:-1], c)``), as MIRAS does.
        chunk_size: when set, the input is averaged over consecutive chunks of this many tokens along dim -2
            and every token of a chunk gets the chunk's gate (Titans sec. 3.2).
        init_std: standard deviation of the initial weights (0: input-independent at start).
        dtype: parameter dtype (the initial biases are exact in it).
    """

    def __init__(self, d_in: int, gates: Mapping[str, tuple[float, float]] = TITANS_GATES, channels: int = 1,
                 chunk_size: int | None = None, init_std: float = 0.0, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not gates:
            raise ValueError("at least one gate is needed")
        self.names = tuple(gates)
        self.channels = channels
        self.chunk_size = chunk_size
        self.proj = nn.Linear(d_in, len(self.names) * channels, dtype=dtype)
        maxima, biases = [], []
        for name in self.names:
            init, top = gates[name]
            if not (0 < init < top):
                raise ValueError(f"gate {name!r}: need 0 < initial value < maximum, got {init}, {top}")
            maxima.append(top)
            biases.append(math.log(init / (top - init)))
        self.register_buffer("maxima", torch.tensor(maxima, dtype=self.proj.weight.dtype).repeat_interleave(channels))
        with torch.no_grad():
            self.proj.bias.copy_(torch.tensor(biases, dtype=torch.float64).repeat_interleave(channels))
            if init_std > 0:
                self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=generator, dtype=torch.float64)
                                       * init_std)
            else:
                self.proj.weight.zero_()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.chunk_size is not None and x.dim() >= 2:
            x = _chunk_mean(x, self.chunk_size)
        out = self.maxima.to(x.dtype) * torch.sigmoid(self.proj(x))
        out = out.view(*x.shape[:-1], len(self.names), self.channels)
        return {name: (out[..., i, 0] if self.channels == 1 else out[..., i, :]) for i, name in enumerate(self.names)}


def _chunk_mean(x: Tensor, size: int) -> Tensor:
    """Replace every token by the mean of its chunk of ``size`` tokens (along dim -2)."""
    t = x.shape[-2]
    idx = torch.arange(t, device=x.device) // size
    n = int(idx[-1]) + 1
    sums = torch.zeros(*x.shape[:-2], n, x.shape[-1], dtype=x.dtype, device=x.device).index_add_(-2, idx, x)
    counts = torch.bincount(idx, minlength=n).to(x.dtype).unsqueeze(-1)
    return (sums / counts).index_select(-2, idx)


def apply_gates(optimizer: torch.optim.Optimizer, group: int | None = None, **gates: float | Tensor) -> None:
    """Set per-step gate values on an optimizer's param groups before ``step()``.

    Keyword names are gate names (``theta``, ``eta``, ``alpha``; mapped by :data:`GATE_TO_GROUP_KEY` to
    ``lr``, ``momentum``, ``forget``) or param-group keys directly. Tensor values must hold one number (reduce a
    per-sample gate first, e.g. with ``.mean()``). ``group=None`` sets every group.
    """
    groups = optimizer.param_groups if group is None else [optimizer.param_groups[group]]
    for name, value in gates.items():
        key = GATE_TO_GROUP_KEY.get(name, name)
        v = float(value.detach()) if isinstance(value, Tensor) else float(value)
        for g in groups:
            if key not in g:
                raise KeyError(f"{type(optimizer).__name__} has no param-group key {key!r} (gate {name!r})")
            g[key] = v
