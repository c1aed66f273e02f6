"""The chunked (parallel) form of the Titans update for a linear memory (arXiv 2501.00663, sec. 3.2).

Titans' update is mini-batch gradient descent with momentum and weight decay (eqs. 13-14):

    S_t = eta_t S_{t-1} - theta_t u_t                                  (eq. 14, eq. 18)
    M_t = (1 - alpha_t) M_{t-1} + S_t                                  (eq. 13)

Sec. 3.2 makes it parallel by taking every gradient of a chunk of ``b`` tokens at the memory the chunk
starts from, ``u_t = grad l(M_{t'}; x_t)`` (eq. 16, eq. 18), with ``l(M; x_t) = ||M k_t - v_t||^2`` (eq. 12).
The recurrences are then linear with inputs known in advance and have closed forms:

    S_t = (prod_{j<=t} eta_j) S_0 - sum_{i<=t} theta_i (prod_{i<j<=t} eta_j) u_i            (momentum)
    M_t = beta_t M_0 + sum_{s<=t} (beta_t / beta_s) S_s,  beta_t = prod_{j<=t} (1 - alpha_j)   (forgetting)

Without momentum this is eq. 16, ``M_t = beta_t M_0 - sum_i theta_i (beta_t / beta_i) grad l(M_{t'}; x_i)``,
and for a linear memory eq. 17 turns the sum into one matmul, ``Theta_b B_b (W_0 X - X) X^T``. With momentum
the sum over ``i`` keeps the same matmul form with per-token weights ``theta_i sum_s (beta_t/beta_s)
(prod_{i<j<=s} eta_j)`` (:func:`titans_chunked`); eq. 18's scan over ``S`` is what these weights close.

Two notes on the paper's notation. ``t' = t - mod(t, b)`` (eq. 16) is meant as "the last step of the previous
chunk" (the paper: "we focus on the first chunk, i.e. t = b and so t' = 0"); with 1-based ``t`` that is
``b * floor((t - 1) / b)``, which is what is used here (the same convention as TTT sec. 2.4). Eq. 17 writes
``grad l(W_0; x_t) = (W_0 x_t - x_t) x_t^T`` with keys = values = ``x`` and without the factor 2 of the
gradient of eq. 12; here keys and values are separate and the gradient is exactly ``2 (W k - v) k^T``.

Products are never formed as ``beta_t / beta_s`` divisions, so ``eta_j = 0`` or ``alpha_j = 1`` are exact.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch
from torch import Tensor

__all__ = ["titans_chunked", "ChunkedResult", "segment_products", "momentum_closed_form",
           "forgetting_closed_form"]

Gate = Union[float, Tensor]


class ChunkedResult(NamedTuple):
    weight: Tensor  # M_T, (d_v, d_k)
    momentum: Tensor  # S_T, (d_v, d_k)
    outputs: Tensor | None  # y_t = M_t q_t for every token, (T, d_v), when queries are given


def segment_products(x: Tensor) -> Tensor:
    """``P[t, i] = prod_{i < j <= t} x_j`` for ``i <= t`` (so ``P[t, t] = 1``), 0 above the diagonal.

    ``x`` has shape ``(n,)``; the result ``(n, n)``. Without divisions: as ``exp`` of differences of cumulative
    log-sums when every ``x_j > 0`` (``O(n^2)``), else as one masked product (``O(n^3)``, exact for zeros).
    """
    n = x.shape[0]
    idx = torch.arange(n, device=x.device)
    lower = idx.view(1, n) <= idx.view(n, 1)  # i <= t
    if bool((x > 0).all()):
        logs = torch.cumsum(torch.log(x), 0)
        diff = logs.view(n, 1) - logs.view(1, n)
        return torch.exp(torch.where(lower, diff, torch.full_like(diff, -torch.inf)))
    t, i, j = idx.view(n, 1, 1), idx.view(1, n, 1), idx.view(1, 1, n)
    inside = (j > i) & (j <= t)
    factors = torch.where(inside, x.view(1, 1, n).expand(n, n, n), torch.ones((), dtype=x.dtype, device=x.device))
    return factors.prod(-1) * lower.to(x.dtype)


def momentum_closed_form(u: Tensor, eta: Tensor, theta: Tensor, s0: Tensor | None = None) -> Tensor:
    """All ``S_t`` of ``S_t = eta_t S_{t-1} - theta_t u_t`` (Titans eq. 14 / 18) at once, ``t = 1..n``.

    ``S_t = (prod_{j<=t} eta_j) S_0 - sum_{i<=t} theta_i (prod_{i<j<=t} eta_j) u_i``. ``u`` has shape
    ``(n, *shape)``; ``eta`` and ``theta`` ``(n,)``; returns ``(n, *shape)``.
    """
    n = u.shape[0]
    weights = segment_products(eta) * theta.view(1, n)
    out = -(weights @ u.reshape(n, -1)).reshape(u.shape)
    if s0 is not None:
        out = out + torch.cumprod(eta, 0).view(n, *([1] * s0.dim())) * s0
    return out


def forgetting_closed_form(s: Tensor, alpha: Tensor, m0: Tensor) -> Tensor:
    """All ``M_t`` of ``M_t = (1 - alpha_t) M_{t-1} + S_t`` (Titans eq. 13) at once, ``t = 1..n``.

    ``M_t = beta_t M_0 + sum_{s<=t} (prod_{s<j<=t} (1 - alpha_j)) S_s`` with ``beta_t = prod_{j<=t} (1 - alpha_j)``.
    """
    n = s.shape[0]
    keep = 1.0 - alpha
    out = (segment_products(keep) @ s.reshape(n, -1)).reshape(s.shape)
    return out + torch.cumprod(keep, 0).view(n, *([1] * m0.dim())) * m0


def _per_token(value: Gate, n: int, like: Tensor) -> Tensor:
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return v.expand(n).clone() if v.dim() == 0 else v


def titans_chunked(weight: Tensor, keys: Tensor, values: Tensor, theta: Gate, eta: Gate = 0.0,
                   alpha: Gate = 0.0, chunk_size: int = 16, momentum: Tensor | None = None,
                   queries: Tensor | None = None, read: str = "after") -> ChunkedResult:
    """Run the Titans update over a sequence of ``(k_t, v_t)`` in chunks, each chunk in parallel (sec. 3.2).

    Args:
        weight: ``M_0``, the linear memory ``(d_v, d_k)``; ``M(k) = M k``.
        keys, values: ``(T, d_k)`` and ``(T, d_v)``.
        theta, eta, alpha: step size, momentum and forgetting (eqs. 13-14), floats or per-token ``(T,)``
            tensors (data-dependent, e.g. from :class:`~hf_titans.memory.gates.DataDependentGates`).
        chunk_size: ``b``. ``b = 1`` is the exact online recurrence; ``b > 1`` takes every gradient of a
            chunk at the chunk's first memory, as the paper's parallel form does.
        momentum: ``S_0`` (zeros when None).
        queries: optional ``(T, d_k)``; then ``outputs[t] = M_t q_t`` (computed in the same matmul form,
            without materialising the ``M_t``).
        read: ``"after"`` reads ``M_t q_t``, the memory after token ``t``'s update (as TTT's output rule, eq. 5);
            ``"before"`` reads ``M_{t-1} q_t``, the memory before it (as Titans' MAC retrieval, eq. 21).

    Inside a chunk with start memory ``W`` and errors ``e_i = W k_i - v_i`` (so ``u_i = 2 e_i k_i^T``), with
    ``H = segment_products(eta)``, ``B = segment_products(1 - alpha)``, ``C = B H`` and ``c = B cumprod(eta)``:

        M_t = beta_t W + c_t S_0 - 2 sum_i C[t, i] theta_i e_i k_i^T
        S_t = h_t S_0 - 2 sum_i H[t, i] theta_i e_i k_i^T

    Each sum is ``(E * w)^T K``, one matmul (eq. 17 generalised to momentum).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if read not in ("after", "before"):
        raise ValueError(f"read must be 'after' or 'before', got {read!r}")
    total = keys.shape[0]
    theta_t, eta_t, alpha_t = (_per_token(g, total, keys) for g in (theta, eta, alpha))
    m = weight
    s = torch.zeros_like(weight) if momentum is None else momentum
    outputs = []
    for start in range(0, total, chunk_size):
        sl = slice(start, min(start + chunk_size, total))
        k, v, th, et, keep = keys[sl], values[sl], theta_t[sl], eta_t[sl], 1.0 - alpha_t[sl]
        err = k @ m.T - v  # e_i = W k_i - v_i, all at the chunk's first memory (eq. 16)
        h_mat, b_mat = segment_products(et), segment_products(keep)
        h, beta = torch.cumprod(et, 0), torch.cumprod(keep, 0)
        c_mat, c = b_mat @ h_mat, b_mat @ h
        if queries is not None:
            q = queries[sl]
            rb, rc, rc_mat = beta, c, c_mat
            if read == "before":  # M_{t-1}: shift the coefficients by one token, M_0 first
                one, zero = beta.new_ones(1), beta.new_zeros(1)
                rb, rc = torch.cat([one, beta[:-1]]), torch.cat([zero, c[:-1]])
                rc_mat = torch.cat([torch.zeros_like(c_mat[:1]), c_mat[:-1]])
            outputs.append(rb[:, None] * (q @ m.T) + rc[:, None] * (q @ s.T)
                           - 2.0 * ((rc_mat * th[None, :]) * (q @ k.T)) @ err)
        m_next = beta[-1] * m + c[-1] * s - 2.0 * (err * (c_mat[-1] * th)[:, None]).T @ k
        s = h[-1] * s - 2.0 * (err * (h_mat[-1] * th)[:, None]).T @ k
        m = m_next
    return ChunkedResult(m, s, torch.cat(outputs) if queries is not None else None)
