"""Inner-loop optimizers of the memory (Nested Learning, arXiv 2512.24695; Titans, arXiv 2501.00663).

Nested Learning (NL) reads an optimizer as one more associative memory: plain gradient descent maps each
input to its local error with no memory of the past (NL sec. 4.1-4.2), momentum is a memory that compresses
past gradients (NL sec. 4.2, eq. 33; the same recurrence as Titans eqs. 13-14), and M3 gives that memory
two time scales and an orthogonalising map (NL sec. 7.2, Algorithm 1).

Every class here is a ``torch.optim.Optimizer`` with the contract of
:class:`~hf_titans.memory.titans.TitansOptimizer`: ``step()`` takes no closure and returns ``True`` when it
wrote, ``False`` (and writes nothing: no parameter, no optimizer state) when any gradient is not finite.
Gradients are clipped to ``max_grad_norm`` per parameter group first. Per-step (data-dependent) values of
``lr``, ``momentum`` or ``forget`` are set on the param groups before ``step()``, see
:func:`~hf_titans.memory.gates.apply_gates`.

* :class:`GDOptimizer`: ``W_t = (1 - alpha) W_{t-1} - theta g_t`` (Titans eq. 8 plus the forget gate of
  eq. 13; TTT eq. 2 with ``alpha = 0``).
* :class:`MomentumOptimizer`: Titans eqs. 13-14 exactly, i.e. :class:`TitansOptimizer` without its (non-paper)
  diagonal preconditioner.
* :class:`M3Optimizer`: Multi-scale Momentum Muon, NL Algorithm 1.

NL equation numbers were read from a translation of the arXiv text and Algorithm 1 from two independent
transcriptions; they could not be checked against the PDF itself.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .titans import TitansOptimizer

__all__ = ["MemoryOptimizer", "GDOptimizer", "MomentumOptimizer", "M3Optimizer", "newton_schulz",
           "MUON_COEFFICIENTS", "CUBIC_COEFFICIENTS", "gd_step"]

#: Quintic Newton-Schulz coefficients of Muon (Jordan et al. 2024), the orthogonaliser M3 follows.
MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
#: The classical cubic Newton-Schulz iteration ``X <- 1.5 X - 0.5 X X^T X`` (converges to the polar factor);
#: NL eq. 44 derives this cubic polynomial as one gradient step on ``||O^T O - I||_F^2``.
CUBIC_COEFFICIENTS = (1.5, -0.5, 0.0)


def newton_schulz(matrix: Tensor, steps: int = 5, coefficients: Sequence[float] = MUON_COEFFICIENTS,
                  eps: float = 1e-7) -> Tensor:
    """``Newton-Schulz_T(G)``: approximately orthogonalise a matrix (NL sec. 4.2 eq. 42, Algorithm 1 lines 4, 9).

    ``X_0 = G / (||G||_F + eps)``, then ``T`` times ``X <- a X + (b X X^T + c (X X^T)^2) X`` (computed on the
    wide orientation). With :data:`CUBIC_COEFFICIENTS` and enough steps this converges to ``U V^T`` of the SVD
    ``G = U S V^T``; Muon's quintic coefficients (the default, as M3 follows Muon) reach singular values near 1
    in 5 steps without converging exactly. Tensors with more than 2 dimensions are flattened to
    ``(shape[0], -1)``; vectors and scalars are returned unchanged (Muon orthogonalises matrices only).
    """
    if matrix.dim() < 2 or matrix.numel() == 0:
        return matrix.clone()
    a, b, c = coefficients
    x = matrix.reshape(matrix.shape[0], -1)
    x = x / (torch.linalg.matrix_norm(x) + eps)
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if not wide:
        x = x.T
    return x.reshape(matrix.shape)


def gd_step(weight: Tensor, grad: Tensor, lr: float | Tensor, forget: float | Tensor = 0.0) -> Tensor:
    """``W_t = (1 - alpha) W_{t-1} - theta grad`` (Titans eq. 8 with the forget gate of eq. 13; NL sec. 4.2)."""
    return (1.0 - forget) * weight - lr * grad


class MemoryOptimizer(torch.optim.Optimizer):
    """Base class: clipping, the non-finite check and the ``step() -> bool`` contract.

    Subclasses implement :meth:`_update` for one param group, given its parameters and their (clipped,
    finite) gradients; it runs under ``torch.no_grad()``.
    """

    @torch.no_grad()
    def step(self, closure=None) -> bool:  # type: ignore[override]
        if closure is not None:
            raise ValueError(f"{type(self).__name__}.step does not take a closure")
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            norm = _global_norm(grads)
            if not torch.isfinite(norm):
                return False  # nothing has been written yet
            clip = group.get("max_grad_norm", math.inf)
            if math.isfinite(clip) and float(norm) > clip:
                scale = clip / (float(norm) + 1e-12)
                grads = [g * scale for g in grads]
            work.append((group, params, grads))
        for group, params, grads in work:
            self._update(group, params, grads)
        return True

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        raise NotImplementedError


class GDOptimizer(MemoryOptimizer):
    """Plain gradient descent with an optional forget gate: ``W <- (1 - forget) W - lr g``.

    Titans eq. 8 (``forget = 0``), TTT eq. 2 (one step per token or, with a batch of samples, one step of
    mini-batch GD, TTT eq. 6), NL sec. 4.2's "simple gradient descent", and the gate of Titans eq. 13 /
    MIRAS's l2 retention when ``forget > 0`` (see :func:`~hf_titans.memory.objectives.l2_retention_update`).
    """

    def __init__(self, params: Iterable, lr: float, forget: float = 0.0, max_grad_norm: float = math.inf) -> None:
        _check(lr=lr, forget=forget)
        super().__init__(params, dict(lr=lr, forget=forget, max_grad_norm=max_grad_norm))

    def _update(self, group, params, grads) -> None:
        for p, g in zip(params, grads):
            p.copy_(gd_step(p, g, group["lr"], group["forget"]))


class MomentumOptimizer(TitansOptimizer):
    """Titans eqs. 13-14 exactly: ``S_t = eta S_{t-1} - theta g_t``, ``M_t = (1 - alpha) M_{t-1} + S_t``.

    The same recurrence as NL eq. 33 (momentum as an associative memory of past gradients). This is
    :class:`~hf_titans.memory.titans.TitansOptimizer` with its diagonal preconditioner off (the
    preconditioner is this library's addition, not the paper's); ``lr`` is theta, ``momentum`` eta and
    ``forget`` alpha.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, forget: float = 0.0,
                 max_grad_norm: float = math.inf) -> None:
        _check(lr=lr, forget=forget, momentum=momentum)
        super().__init__(params, lr=lr, momentum=momentum, forget=forget, max_grad_norm=max_grad_norm,
                         precondition=False)


class M3Optimizer(MemoryOptimizer):
    """Multi-scale Momentum Muon (NL sec. 7.2, Algorithm 1), one ``step()`` per line-5 iteration ``t``.

    Per parameter, with ``g_t`` its gradient::

        every f steps (line 3):  M2 <- M2 + beta3 * (sum of the f gradients of the previous block)
                      (line 4):  O2 <- Newton-Schulz_T(M2)
        every step    (line 7):  M1 <- M1 + beta1 * g_t
                      (line 8):  V  <- V  + beta2 * g_t^2
                      (line 9):  O1 <- Newton-Schulz_T(M1)
                      (line 10): W  <- W - lr * (O1 + alpha * O2) / (sqrt(V) + eps)

    Notes on the printed algorithm: line 3 sums ``g_i`` for ``i = (k-1)f .. kf``, which counts the block's
    boundary gradient twice across blocks; here the slow memory receives each gradient exactly once (the
    ``f`` gradients ``(k-1)f+1 .. kf``). The momenta accumulate without decay as printed (``M <- M + beta g``);
    ``momentum_decay < 1`` multiplies ``M1`` and ``M2`` by it before each addition, the EMA reading of
    momentum in NL eq. 33, and is off (1.0) by default. One transcription writes the denominator as
    ``sqrt(V + eps)``; this follows the other, ``sqrt(V) + eps``. Newton-Schulz applies to matrices only;
    for vectors (biases) ``O = M``. ``forget`` (default 0) adds the Titans eq. 13 gate
    ``W <- (1 - forget) W`` before the step; it is not part of Algorithm 1. The paper gives no default values
    for ``betas``, ``alpha``, ``f`` or ``eps``; the defaults here are this library's. ``eps`` defaults to 1e-3,
    not Adam's 1e-8: the Newton-Schulz numerator has entries of size about ``1 / sqrt(n)`` whatever the
    gradient's scale while ``sqrt(V)`` follows each entry's own gradient, so a tiny ``eps`` gives entries whose
    gradient is near zero enormous steps (on a toy associative task, ``eps = 1e-8`` diverges at ``lr = 1e-2``
    where ``eps = 1e-3`` converges).
    """

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float, float] = (0.9, 0.999, 0.9),
                 alpha: float = 0.5, frequency: int = 8, ns_steps: int = 5,
                 ns_coefficients: Sequence[float] = MUON_COEFFICIENTS, eps: float = 1e-3,
                 momentum_decay: float = 1.0, forget: float = 0.0, max_grad_norm: float = math.inf) -> None:
        _check(lr=lr, forget=forget)
        if frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {frequency}")
        if not all(0 <= b < 1 for b in betas) or len(betas) != 3:
            raise ValueError(f"betas must be three values in [0, 1), got {betas}")
        if alpha < 0 or not (0 < momentum_decay <= 1):
            raise ValueError("alpha must be >= 0 and momentum_decay in (0, 1]")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), alpha=alpha, frequency=int(frequency),
                                      ns_steps=int(ns_steps), ns_coefficients=tuple(ns_coefficients), eps=eps,
                                      momentum_decay=momentum_decay, forget=forget, max_grad_norm=max_grad_norm))

    def _update(self, group, params, grads) -> None:
        b1, b2, b3 = group["betas"]
        decay, f = group["momentum_decay"], group["frequency"]
        ns = dict(steps=group["ns_steps"], coefficients=group["ns_coefficients"])
        for p, g in zip(params, grads):
            state = self.state[p]
            if not state:
                state["step"] = 0
                for name in ("fast", "slow", "second", "slow_out", "block_sum"):
                    state[name] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            if t > 1 and (t - 1) % f == 0:  # lines 3-4: a new block begins; fold the last block into M2
                state["slow"].mul_(decay).add_(state["block_sum"], alpha=b3)
                state["slow_out"] = _orthogonalise(state["slow"], ns)
                state["block_sum"].zero_()
            state["block_sum"].add_(g)
            state["fast"].mul_(decay).add_(g, alpha=b1)  # line 7
            state["second"].addcmul_(g, g, value=b2)  # line 8
            fast_out = _orthogonalise(state["fast"], ns)  # line 9
            update = (fast_out + group["alpha"] * state["slow_out"]) / (state["second"].sqrt() + group["eps"])
            if group["forget"]:
                p.mul_(1.0 - group["forget"])
            p.sub_(group["lr"] * update)  # line 10


def _global_norm(grads: list[Tensor]) -> Tensor:
    norms = [torch.linalg.vector_norm(g) for g in grads]
    dtype = norms[0].dtype
    for n in norms[1:]:
        dtype = torch.promote_types(dtype, n.dtype)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


def _orthogonalise(m: Tensor, ns: dict) -> Tensor:
    return newton_schulz(m, **ns) if m.dim() >= 2 else m.clone()


def _check(**values: float) -> None:
    for name, v in values.items():
        if name == "lr" and not (0 <= v < math.inf):
            raise ValueError(f"lr must be a finite number >= 0, got {v}")
        if name in ("forget", "momentum") and not (0 <= v <= 1):
            raise ValueError(f"{name} must be in [0, 1], got {v}")
