"""The MIRAS update rules: Moneta, Yaad and Memora (Behrouz et al., arXiv 2504.13173, sec. 5.3).

Each MIRAS variant is a choice of attentional bias (the loss, in :mod:`~hf_titans.memory.objectives`), of a
retention gate and of a learning algorithm (gradient descent for all three). The retention gate decides the
shape of the update, so each variant is an optimizer here, with the contract of
:class:`~hf_titans.memory.titans.TitansOptimizer`: ``step()`` returns ``True`` after writing and ``False``,
writing nothing, when a gradient is not finite. The gradient it receives must come from the variant's own
attentional bias (see :data:`~hf_titans.memory.variants.VARIANTS`).

============  ====================  ===============================  =========================================
variant       attentional bias      retention                        update (per parameter tensor)
============  ====================  ===============================  =========================================
Moneta        l_p, p = 3 (eq. 10)   l_q (q = 4) + l2                 ``A <- a A - eta g``, ``W = link_q(A)`` (eq. 24)
Yaad          Huber (eq. 16)        l2 local + l2 global             ``W <- a W - eta g`` (eq. 26)
Memora        l2                    KL                               ``W <- c Softmax(a log W - eta g)`` (eq. 27)
============  ====================  ===============================  =========================================

``a`` is the retention ``alpha_t`` of MIRAS (1 keeps everything); this library's optimizers take
``forget = 1 - alpha_t`` so that every rule shares the meaning of ``forget`` in Titans eq. 13 (0 = no
forgetting). ``eta`` is ``lr``. Both may be set per step from data, see :mod:`~hf_titans.memory.gates`.

Equation numbers: two independent transcriptions of arXiv 2504.13173v1 agree on eqs. 10-11 (l_p), 24
(Moneta), 26 (Yaad) and 27 (Memora); the Huber (13-16) and KL (19-21) numbers come from one of them only,
and eq. 25 is the Moneta gradient in one and the smooth Sign/|x| approximations in the other. None could be
checked against the PDF; the section of the variants (5.3, "Miras's Variants: Moneta, Yaad, and Memora") is
confirmed by a source quoting the PDF.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from .objectives import softmax_update
from .optimizers import GDOptimizer, MemoryOptimizer, _check

__all__ = ["MonetaOptimizer", "YaadOptimizer", "MemoraOptimizer", "moneta_step", "yaad_step", "memora_step",
           "lq_link", "lq_link_inverse", "LQ_LINKS", "to_simplex_"]

LQ_LINKS = ("mirror", "printed")


def _grad_half_sq_norm(x: Tensor, r: float) -> Tensor:
    """``grad (||x||_r^2 / 2) = Sign(x) |x|^(r-1) / ||x||_r^(r-2)`` (norm over the whole tensor; 0 at ``x = 0``)."""
    norm = x.abs().pow(r).sum().pow(1.0 / r)
    if float(norm) == 0.0:
        return torch.zeros_like(x)
    return x.sign() * x.abs().pow(r - 1.0) / norm.pow(r - 2.0)


def lq_link(accumulator: Tensor, q: float = 4.0, link: str = "mirror") -> Tensor:
    """The map from Moneta's accumulator ``A`` to its memory ``W`` (MIRAS eq. 24, printed ``W_t = A_t / ||A_t||_q^(q-2)``).

    * ``"mirror"`` (default): mirror descent with Moneta's l_q retention ``R(W) = ||W||_q^2 / 2`` (MIRAS sec. 5.3
      names ``||W||_q^2 / (2 (q - 1))``; the factor ``1 / (q - 1)`` only rescales ``eta``). The accumulator is
      the dual variable ``A = grad R(W) = Sign(W) |W|^(q-1) / ||W||_q^(q-2)`` (the printed normaliser), so the
      memory is read off with the conjugate's gradient, ``W = grad R*(A) = Sign(A) |A|^(r-1) / ||A||_r^(r-2)``
      with ``r = q / (q - 1)`` (4/3 for ``q = 4``). It is 1-homogeneous (``A -> a A`` scales ``W`` by ``a``) and a
      gradient step on ``A`` descends. For ``q > 2`` it spreads a write over many entries (``|A|^(1/3)``); the
      gradient-of-``||A||_q`` map (``|A|^3``) concentrates it on a few, which is the mirror map of an l_(4/3)
      retention: measured on SmolLM2 keys, that map never made the taught prompts familiar at any step size.
    * ``"printed"``: eq. 24 literally, ``W = A / ||A||_q^(q-2)``. For ``q > 2`` this map is homogeneous of
      degree ``3 - q`` (for ``q = 4`` it is an inversion: ``||W||_q = 1 / ||A||_q``), so it cannot represent
      ``W = 0``, turns the radial part of a gradient step into an ascent, and makes ``alpha_t < 1`` grow the
      memory instead of shrinking it.

    ``q = 2`` gives ``W = A`` for both links. ``A = 0`` gives ``W = 0``.
    """
    if link not in LQ_LINKS:
        raise ValueError(f"unknown l_q link {link!r}; choose one of {', '.join(LQ_LINKS)}")
    if link == "printed":
        norm = accumulator.abs().pow(q).sum().pow(1.0 / q)
        return torch.zeros_like(accumulator) if float(norm) == 0.0 else accumulator / norm.pow(q - 2.0)
    return _grad_half_sq_norm(accumulator, q / (q - 1.0))


def lq_link_inverse(weight: Tensor, q: float = 4.0, link: str = "mirror") -> Tensor:
    """The accumulator ``A`` with ``lq_link(A, q, link) == weight`` (used to start Moneta from a given memory).

    ``"mirror"``: ``A = grad (||W||_q^2 / 2) = Sign(W) |W|^(q-1) / ||W||_q^(q-2)``.
    ``"printed"``: ``A = W ||W||_q^((q-2)/(3-q))`` (not invertible at ``q = 3``). ``W = 0`` gives ``A = 0``.
    """
    if link not in LQ_LINKS:
        raise ValueError(f"unknown l_q link {link!r}; choose one of {', '.join(LQ_LINKS)}")
    if link == "printed":
        if q == 3.0:
            raise ValueError("the printed l_q link W = A / ||A||_q is not invertible for q = 3")
        norm = weight.abs().pow(q).sum().pow(1.0 / q)
        if float(norm) == 0.0:
            return torch.zeros_like(weight)
        return weight * norm.pow((q - 2.0) / (3.0 - q))
    return _grad_half_sq_norm(weight, q)


def moneta_step(accumulator: Tensor, grad: Tensor, lr: float | Tensor, retain: float | Tensor = 1.0,
                q: float = 4.0, link: str = "mirror") -> tuple[Tensor, Tensor]:
    """One Moneta step (MIRAS eq. 24): ``A_t = alpha_t A_{t-1} - eta_t grad``; ``W_t = link_q(A_t)``.

    ``grad`` is the gradient of the l_p attentional bias at ``W_{t-1}`` (eq. 11 / 25: ``p (Sign(e) |e|^(p-1)) k^T``
    for a linear memory, with ``e = W k - v``). Returns ``(A_t, W_t)``.
    """
    a = retain * accumulator - lr * grad
    return a, lq_link(a, q, link)


def yaad_step(weight: Tensor, grad: Tensor, lr: float | Tensor, retain: float | Tensor = 1.0) -> Tensor:
    """One Yaad step (MIRAS eq. 26): ``W_t = alpha_t W_{t-1} - (eta_t grad l2 if ||e|| <= delta else eta_t delta grad l1)``.

    The branch between l2 and l1 belongs to the attentional bias; ``grad`` is the gradient of
    :func:`~hf_titans.memory.objectives.huber_loss` (``variant="mixture"``), so the rule itself is gradient
    descent with the l2-retention gate ``alpha_t = beta_t / (beta_t + theta_t)`` (local and global l2 retention).
    """
    return retain * weight - lr * grad


def memora_step(weight: Tensor, grad: Tensor, lr: float | Tensor, retain: float | Tensor = 1.0,
                dim: int = -1) -> Tensor:
    """One Memora step (MIRAS eq. 27): ``W_t = c Softmax(alpha_t log W_{t-1} - eta_t grad l2)`` along ``dim``."""
    return softmax_update(weight, grad, lr=lr, retain=retain, dim=dim)


class MonetaOptimizer(MemoryOptimizer):
    """Moneta (MIRAS sec. 5.3, eq. 24) on any parameters; use with :func:`~hf_titans.memory.objectives.lp_loss`, ``p = 3``.

    Each parameter keeps an accumulator ``A`` (optimizer state ``"accumulator"``), started at
    ``lq_link_inverse(W_0)`` so that the first write continues from the current memory. A step sets
    ``A <- (1 - forget) A - lr g`` and writes ``W = lq_link(A, q, link)`` (l_q norm over the whole tensor).
    See :func:`lq_link` for the two links; the default ``"mirror"`` is mirror descent with the l_q retention.
    Moneta uses ``q = 4``. An accumulator that no longer maps to the memory (the memory was changed outside
    this optimizer, or the state was saved under another link) is derived again from the memory, so a step
    always continues from the current ``W``.
    """

    def __init__(self, params: Iterable, lr: float, forget: float = 0.0, q: float = 4.0, link: str = "mirror",
                 max_grad_norm: float = math.inf) -> None:
        _check(lr=lr, forget=forget)
        if q <= 1:
            raise ValueError(f"q must be > 1, got {q}")
        if link not in LQ_LINKS:
            raise ValueError(f"unknown l_q link {link!r}; choose one of {', '.join(LQ_LINKS)}")
        super().__init__(params, dict(lr=lr, forget=forget, q=q, link=link, max_grad_norm=max_grad_norm))

    def _update(self, group, params, grads) -> None:
        q, link = group["q"], group["link"]
        for p, g in zip(params, grads):
            state = self.state[p]
            a = state.get("accumulator")
            if a is None or not torch.allclose(lq_link(a, q, link), p, rtol=1e-3, atol=1e-6):
                state["accumulator"] = lq_link_inverse(p.detach(), q, link)
            a, w = moneta_step(state["accumulator"], g, group["lr"], 1.0 - group["forget"], q, link)
            state["accumulator"] = a
            p.copy_(w)


class YaadOptimizer(GDOptimizer):
    """Yaad (MIRAS sec. 5.3, eq. 26): ``W <- (1 - forget) W - lr g`` with ``g`` the Huber-mixture gradient.

    Use with :func:`~hf_titans.memory.objectives.huber_loss` (``variant="mixture"``, data-dependent
    ``delta``): the l2/l1 switch of eq. 26 is in that loss's gradient, and what remains of the rule is gradient
    descent with the l2 retention gate, i.e. :class:`~hf_titans.memory.optimizers.GDOptimizer`.
    """


class MemoraOptimizer(MemoryOptimizer):
    """Memora (MIRAS sec. 5.3, eq. 27): ``W <- c Softmax((1 - forget) log W - lr g)`` per slice along ``dim``.

    Use with :func:`~hf_titans.memory.objectives.l2_loss`. The memory must lie on the scaled simplex (every
    entry > 0; ``c``, the mass of each slice along ``dim``, is kept from the previous memory): put parameters
    there first with :func:`to_simplex_`. MIRAS applies the softmax per slice for deep memories; slices here
    are the rows (``dim=-1``) of each weight matrix and the whole of each bias vector. ``forget`` pulls every
    slice towards uniform (MIRAS's global KL retention); with ``forget = 0`` the step is exponentiated gradient.
    A step raises ``ValueError`` (writing nothing) if a parameter has entries <= 0; entries a step would underflow
    to 0 are kept at ``torch.finfo(dtype).tiny``.
    """

    def __init__(self, params: Iterable, lr: float, forget: float = 0.0, dim: int = -1,
                 max_grad_norm: float = math.inf) -> None:
        _check(lr=lr, forget=forget)
        super().__init__(params, dict(lr=lr, forget=forget, dim=dim, max_grad_norm=max_grad_norm))

    @torch.no_grad()
    def step(self, closure=None) -> bool:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and bool((p <= 0).any()):
                    raise ValueError("MemoraOptimizer needs every memory entry > 0; call to_simplex_ first")
        return super().step(closure)

    def _update(self, group, params, grads) -> None:
        for p, g in zip(params, grads):
            dim = group["dim"] if p.dim() > 0 else 0
            w, gg = (p, g) if p.dim() > 0 else (p.reshape(1), g.reshape(1))
            new = memora_step(w, gg, group["lr"], 1.0 - group["forget"], dim=dim).reshape(p.shape)
            # A large step can underflow an entry of the softmax to exactly 0 in float32, which would leave the
            # simplex's interior (log 0); keep every entry at least the smallest normal number instead.
            p.copy_(new.clamp_min(torch.finfo(new.dtype).tiny))


@torch.no_grad()
def to_simplex_(params: Iterable[Tensor], mass: float = 1.0, dim: int = -1) -> None:
    """Map parameters in place onto the scaled simplex Memora needs: ``W <- mass * Softmax(W)`` along ``dim``.

    The current values act as logits, so a random initialisation stays random and a zero one becomes uniform.
    """
    for p in params:
        if p.dim() == 0:
            p.fill_(mass)
        else:
            p.copy_(mass * torch.softmax(p, dim=dim))
