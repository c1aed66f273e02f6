"""Attentional-bias objectives and retention terms of the memory (MIRAS, arXiv 2504.13173; Titans, arXiv 2501.00663).

MIRAS views every memory update as one step of an online problem with two parts (its *Learning-Retaining*
viewpoint): an **attentional bias** ``l(W; k_t, v_t)`` that says how well the memory maps a key to its value,
and a **retention** term ``Ret_t(W, W_{t-1}) = (1/eta_t) D_t(W, W_{t-1}) + (1/alpha_t) G_t(W)`` that keeps
the new memory close to the old one (local retention ``D``) and small or well spread (global retention ``G``).
This module holds both halves as plain functions of tensors:

* attentional biases, functions of ``(prediction, target)`` returning one loss per sample (reduce over the
  last dimension only, so a caller can weight samples, e.g. by a data-dependent ``theta_t``):
  :func:`l2_loss` (Titans eq. 12), :func:`lp_loss` (MIRAS l_p bias, Moneta), :func:`huber_loss` (MIRAS Huber
  biases, Yaad);
* retention terms, functions of a parameter tensor: :func:`l2_retention` (weight decay / proximity),
  :func:`lq_retention` (Moneta), :func:`kl_retention` (Memora), and the closed-form minimisers of
  "linearised loss + retention" that turn them into update rules: :func:`l2_retention_update`
  (the forget gate) and :func:`kl_retention_update` / :func:`softmax_update` (Memora's softmax update).

Equation numbers. Titans and TTT numbers were checked against the papers' text. For MIRAS no copy of the
paper was available: two independent transcriptions of arXiv 2504.13173v1 agree on eqs. 10-11 (l_p) and
24, 26, 27 (the variants); the Huber numbers (13-16) and the KL ones (19-21) come from one transcription
only. None could be checked against the PDF, so each MIRAS citation below also names the construct it is.

No transformers imports here.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]

__all__ = [
    "l2_loss", "lp_loss", "huber", "huber_loss", "HUBER_VARIANTS",
    "l2_retention", "lq_retention", "kl_retention",
    "l2_retention_update", "kl_retention_update", "softmax_update",
]


# ---------------------------------------------------------------------------------------------- attentional bias
def l2_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """``||M(k) - v||_2^2`` per sample: Titans eq. 12, the l2 attentional bias of MIRAS, TTT eq. 4.

    No factor 1/2, as in Titans eq. 12 and TTT eq. 4, so the gradient for a linear memory ``M(k) = W k`` is
    ``2 (W k - v) k^T`` (TTT sec. 2.5 writes it out; Titans eq. 17 drops the constant 2).
    """
    return (prediction - target).pow(2).sum(-1)


def lp_loss(prediction: Tensor, target: Tensor, p: float = 3.0, eps: float = 0.0) -> Tensor:
    """``||M(k) - v||_p^p = sum_j |M(k)_j - v_j|^p`` per sample: the MIRAS l_p attentional bias (eq. 10).

    Its gradient for a linear memory is ``p (Sign(W k - v) * |W k - v|^(p-1)) k^T`` (MIRAS eq. 11; Moneta,
    sec. 5.3, uses ``p = 3``); autograd gives exactly that. ``eps > 0`` replaces ``|x|`` by the smooth
    ``sqrt(x^2 + eps)`` that MIRAS suggests for small ``p`` (where ``|x|^(p-1)`` is not differentiable at 0);
    for ``p >= 2`` the loss is already smooth and ``eps = 0`` is exact.
    """
    if p < 1:
        raise ValueError(f"p must be >= 1 for an l_p attentional bias, got {p}")
    e = prediction - target
    a = (e.pow(2) + eps).sqrt() if eps > 0 else e.abs()
    return a.pow(p).sum(-1)


def huber(a: Tensor, delta: Scalar) -> Tensor:
    """The Huber function of MIRAS eq. 13: ``a^2 / 2`` for ``|a| <= delta``, else ``delta (|a| - delta / 2)``."""
    delta = torch.as_tensor(delta, dtype=a.dtype, device=a.device)
    absolute = a.abs()
    return torch.where(absolute <= delta, 0.5 * a.pow(2), delta * (absolute - 0.5 * delta))


HUBER_VARIANTS = ("coordinate", "norm", "mixture")


def huber_loss(prediction: Tensor, target: Tensor, delta: Scalar, variant: str = "mixture") -> Tensor:
    """The MIRAS Huber attentional biases (Yaad), one loss per sample; ``delta`` may be data-dependent.

    ``delta`` is a float or a tensor: per sample (shape ``(B,)`` or ``(B, 1)``) for every variant, or per
    channel (shape ``(B, d)``) for ``"coordinate"``; MIRAS makes it a data-dependent ``delta_t``.

    * ``"coordinate"`` (MIRAS eq. 14): ``sum_j H(M(k)_j - v_j)``. Gradient for a linear memory:
      ``(e k^T) * 1[|e| <= delta] + (delta Sign(e) k^T) * 1[|e| > delta]`` with ``e = W k - v``.
    * ``"norm"`` (MIRAS eq. 15): ``H(||M(k) - v||_2)``. Gradient: ``e k^T`` when ``||e|| <= delta``, else
      ``delta e / ||e|| k^T``.
    * ``"mixture"`` (MIRAS eq. 16, the bias of Yaad, eq. 26): the l2 loss ``||e||^2 / 2`` while
      ``||e||_2 <= delta`` and the l1 loss scaled by ``delta`` beyond, so the update is ``eta grad l2`` or
      ``eta delta grad l1``. The paper specifies this bias by its gradient; the value returned beyond
      ``delta`` is ``delta (||e||_1 - delta / 2)``, whose gradient is ``delta Sign(e) k^T`` as eq. 16 states.
    """
    if variant not in HUBER_VARIANTS:
        raise ValueError(f"unknown Huber variant {variant!r}; choose one of {', '.join(HUBER_VARIANTS)}")
    e = prediction - target
    delta = torch.as_tensor(delta, dtype=e.dtype, device=e.device)
    if variant == "coordinate":
        if delta.shape != e.shape:
            delta = _sample_delta(delta, e)
            delta = delta.unsqueeze(-1) if delta.dim() else delta
        return huber(e, delta).sum(-1)
    delta = _sample_delta(delta, e)
    norm = e.pow(2).sum(-1).sqrt()
    if variant == "norm":
        return huber(norm, delta)
    small = 0.5 * e.pow(2).sum(-1)
    large = delta * (e.abs().sum(-1) - 0.5 * delta)
    return torch.where(norm <= delta, small, large)


def _sample_delta(delta: Tensor, e: Tensor) -> Tensor:
    """A scalar ``delta`` as is, a per-sample one as shape ``e.shape[:-1]``."""
    if delta.dim() == 0 or delta.shape == e.shape[:-1]:
        return delta
    if delta.shape == (*e.shape[:-1], 1):
        return delta.squeeze(-1)
    raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit errors of shape {tuple(e.shape)}")


# ---------------------------------------------------------------------------------------------- retention
def l2_retention(weight: Tensor, previous: Tensor | None = None) -> Tensor:
    """``||W - W_prev||_F^2 / 2``: l2 retention (MIRAS, Learning-Retaining viewpoint).

    With ``previous=None`` it is the global term ``G(W) = ||W||^2 / 2``, plain weight decay; with the previous
    memory it is the local proximity ``D(W, W_prev)`` that makes gradient descent "retain" the past. Their
    combination gives the Titans/Yaad forget gate, see :func:`l2_retention_update`.
    """
    diff = weight if previous is None else weight - previous
    return 0.5 * diff.pow(2).sum()


def lq_retention(weight: Tensor, q: float = 4.0) -> Tensor:
    """``||W||_q^2 / (2 (q - 1))``: the l_q global retention of Moneta (MIRAS sec. 5.3, ``q = 4``).

    Moneta combines it with l2 retention; :class:`~hf_titans.memory.miras.MonetaOptimizer` implements the
    resulting update (MIRAS eq. 24), which keeps an accumulator ``A`` and reads the memory off through an
    l_q normalisation.
    """
    if q <= 1:
        raise ValueError(f"q must be > 1, got {q}")
    return weight.abs().pow(q).sum().pow(2.0 / q) / (2.0 * (q - 1.0))


def kl_retention(weight: Tensor, previous: Tensor, eta: Scalar, alpha: Scalar) -> Tensor:
    """KL retention of Memora (MIRAS, f-divergence retention with ``f(x) = x log x``; eqs. 19-21 in the
    transcription, unverified):

        Ret(W, W_prev) = (1/eta) sum_jl W_jl log(W_jl / (W_prev)_jl) + (1/alpha) sum_jl W_jl log W_jl

    over memories on the scaled simplex ``{W >= 0, ||W||_1 = c}``: the first term (local) keeps ``W`` close to
    the previous memory, the second (global, a negative entropy) pulls it towards the uniform memory.
    """
    return (weight * (weight / previous).log()).sum() / eta + (weight * weight.log()).sum() / alpha


def l2_retention_update(previous: Tensor, grad: Tensor, eta: Scalar, beta: Scalar) -> Tensor:
    """Closed-form ``argmin_W <W, g> + ||W - W_prev||^2 / (2 eta) + ||W||^2 / (2 beta)`` (MIRAS Learning-Retaining).

    The minimiser is ``W = lam W_prev - lam eta g`` with ``lam = beta / (beta + eta)``: gradient descent with
    the forget gate ``1 - alpha_t = lam`` of Titans eq. 13 and Yaad (MIRAS eq. 26, where
    ``alpha_t = beta_t / (beta_t + theta_t)``).
    """
    lam = beta / (beta + eta)
    return lam * previous - lam * eta * grad


def softmax_update(previous: Tensor, grad: Tensor, lr: Scalar, retain: Scalar = 1.0, dim: int = -1,
                   scale: Tensor | float | None = None) -> Tensor:
    """Memora's update (MIRAS eq. 27): ``W_t = c Softmax(alpha_t log W_{t-1} - eta_t grad)`` along ``dim``.

    ``retain`` is Memora's ``alpha_t`` (1 keeps everything; below 1 pulls the memory towards uniform, which is
    how it forgets) and ``lr`` its ``eta_t``. ``c`` is the mass of each slice, kept from the previous memory
    when ``scale`` is None (the constraint ``||W||_1 = c`` of the KL retention). ``previous`` must be > 0.
    """
    logits = retain * previous.log() - lr * grad
    c = previous.sum(dim, keepdim=True) if scale is None else scale
    return c * torch.softmax(logits, dim=dim)


def kl_retention_update(previous: Tensor, grad: Tensor, eta: Scalar, alpha: Scalar, dim: int = -1,
                        scale: Tensor | float | None = None) -> Tensor:
    """Closed-form ``argmin_{W >= 0, sum W = c} <W, g> + Ret(W, W_prev)`` for the KL retention (MIRAS eq. 21).

    ``W = c Softmax((1 - lam) log W_prev - eta' g)`` with ``lam = (1/alpha) / (1/alpha + 1/eta)`` and
    ``eta' = 1 / (1/alpha + 1/eta)``; Memora's eq. 27 is this rule written with ``alpha_t = 1 - lam`` and
    ``eta_t = eta'``, which is what :func:`softmax_update` takes.
    """
    inv = 1.0 / alpha + 1.0 / eta
    lam = (1.0 / alpha) / inv
    return softmax_update(previous, grad, lr=1.0 / inv, retain=1.0 - lam, dim=dim, scale=scale)
