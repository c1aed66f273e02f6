"""TTT layers with a linear hidden state (Sun et al. 2024, "Learning to (Learn at Test Time)", arXiv 2407.04620).

The hidden state is the weight ``W`` of an inner model ``f``; each token trains it with one gradient step on a
self-supervised reconstruction loss and the output is the inner model's prediction with the updated weight:

    l(W; x_t) = ||f(theta_K x_t; W) - theta_V x_t||^2                     (eq. 4)
    W_t = W_{t-1} - eta grad l(W_{t-1}; x_t)                              (eq. 2, online GD)
    z_t = f(theta_Q x_t; W_t)                                             (eq. 5)

Mini-batch TTT (sec. 2.4, eq. 6) takes every gradient of a mini-batch of ``b`` tokens at the weight the
mini-batch starts from, ``G_t = grad l(W_{t'}; x_t)``, while the descent still accumulates token by token:
``W_t = W_{t'} - eta sum_{s=t'+1..t} G_s``. ``b = 1`` is online GD, ``b = T`` batch GD. For ``f(x) = W x`` the
dual form (sec. 2.5, eqs. 7-8) computes the same outputs and final weight with matmuls and without
materialising the ``G_t``.

Functions take already projected sequences: keys ``K = theta_K x`` (T, d_k), values ``V = theta_V x``
(T, d_v), queries ``Q = theta_Q x`` (T, d_k), tokens as rows, ``W`` of shape ``(d_v, d_k)`` (so
``f(k; W) = W k``), and ``lr`` a float or a per-token ``(T,)`` tensor (the learnable, token-dependent
``eta(x) = eta_base sigmoid(theta_lr . x)`` of sec. 2.7). The gradient of eq. 4 for ``f = W k`` is
``2 (W k - v) k^T`` (sec. 2.5).

Note on ``t' = t - mod(t, b)`` (sec. 2.4, "the last timestep of the previous mini-batch, or 0 for the first"):
with 1-based ``t`` the intended index is ``b * floor((t - 1) / b)``, used here.

:class:`TTTLinear` is the layer: learnable views ``theta_K, theta_V, theta_Q`` (sec. 2.3), learnable
``W_0`` and ``eta(x)`` (sec. 2.7), optional ``f(x) = x + LN(W x)`` (sec. 2.7, the paper's default for
stability; without it the layer is the one of Theorem 1, which with ``W_0 = 0``, batch GD and ``eta = 1/2``
equals linear attention).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["TTTResult", "ttt_linear_online", "ttt_linear_minibatch", "ttt_linear_dual", "ttt_minibatch",
           "TTTLinear"]

LR = Union[float, Tensor]


class TTTResult(NamedTuple):
    outputs: Tensor  # z_t for every token, (T, d_v)
    weight: Tensor  # W_T, (d_v, d_k)


def _lr(lr: LR, n: int, like: Tensor) -> Tensor:
    v = torch.as_tensor(lr, dtype=like.dtype, device=like.device)
    return v.expand(n) if v.dim() == 0 else v


def ttt_linear_online(weight: Tensor, keys: Tensor, values: Tensor, queries: Tensor, lr: LR) -> TTTResult:
    """TTT-Linear with online GD, token by token (eqs. 2, 4, 5): ``W_t = W_{t-1} - eta_t 2 (W_{t-1} k_t - v_t) k_t^T``."""
    eta = _lr(lr, keys.shape[0], keys)
    w, out = weight, []
    for t in range(keys.shape[0]):
        g = 2.0 * torch.outer(w @ keys[t] - values[t], keys[t])
        w = w - eta[t] * g
        out.append(w @ queries[t])
    return TTTResult(torch.stack(out), w)


def ttt_linear_minibatch(weight: Tensor, keys: Tensor, values: Tensor, queries: Tensor, lr: LR,
                         batch_size: int = 16) -> TTTResult:
    """Mini-batch TTT-Linear in the primal form (sec. 2.4, eq. 6): the ``G_t`` are materialised.

    ``G_t = 2 (W_{t'} k_t - v_t) k_t^T``, ``W_t = W_{t'} - sum_{s=t'+1..t} eta_s G_s``, ``z_t = W_t q_t``.
    """
    eta = _lr(lr, keys.shape[0], keys)
    w, out = weight, []
    for start in range(0, keys.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        k, v, q = keys[sl], values[sl], queries[sl]
        g = 2.0 * (k @ w.T - v).unsqueeze(-1) * k.unsqueeze(-2)  # (b, d_v, d_k), all at W_{t'}
        ws = w - torch.cumsum(eta[sl].view(-1, 1, 1) * g, 0)  # W_t for every t of the mini-batch
        out.append((ws @ q.unsqueeze(-1)).squeeze(-1))
        w = ws[-1]
    return TTTResult(torch.cat(out), w)


def ttt_linear_dual(weight: Tensor, keys: Tensor, values: Tensor, queries: Tensor, lr: LR,
                    batch_size: int = 16) -> TTTResult:
    """Mini-batch TTT-Linear in the dual form (sec. 2.5, eqs. 7-8): matmuls only, no ``G_t``.

    Per mini-batch with ``E = K W^T - V`` (rows ``e_s = W k_s - v_s``, scaled by ``eta_s``):

        W_b = W - 2 (eta * E)^T K                                (sec. 2.5, W_b = W_0 - 2 eta (W_0 X - X) X^T)
        Z   = Q W^T - 2 tril(Q K^T) (eta * E)                    (eqs. 7-8, Z = W_0 X - 2 eta Delta)

    ``tril`` keeps ``s <= t`` (the paper's "upper triangular mask" on ``X^T X`` with tokens as columns).
    """
    eta = _lr(lr, keys.shape[0], keys)
    w, out = weight, []
    for start in range(0, keys.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        k, v, q = keys[sl], values[sl], queries[sl]
        e = (k @ w.T - v) * eta[sl].unsqueeze(-1)
        out.append(q @ w.T - 2.0 * torch.tril(q @ k.T) @ e)
        w = w - 2.0 * e.T @ k
    return TTTResult(torch.cat(out), w)


def ttt_minibatch(f: Callable[[dict, Tensor], Tensor], params: dict[str, Tensor], keys: Tensor, values: Tensor,
                  queries: Tensor, lr: LR, batch_size: int = 16) -> tuple[Tensor, dict[str, Tensor]]:
    """Mini-batch TTT (sec. 2.4, eq. 6) for any inner model ``f(params, x)``, in the primal form.

    ``l = ||f(params, k_t) - v_t||^2`` (eq. 4); per-token gradients at the mini-batch's first weights with
    ``torch.func.grad`` + ``vmap``; ``params_t = params_{t'} - sum eta_s G_s``; ``z_t = f(params_t, q_t)``.
    Works for TTT-Linear with LN and residual (sec. 2.7) or TTT-MLP. Returns ``(outputs, final params)``.
    """
    eta = _lr(lr, keys.shape[0], keys)

    def loss(p, k, v):
        return (f(p, k) - v).pow(2).sum()

    per_token_grad = vmap(grad(loss), in_dims=(None, 0, 0))
    read = vmap(f, in_dims=(0, 0))
    out = []
    for start in range(0, keys.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        g = per_token_grad(params, keys[sl], values[sl])
        e = eta[sl]
        steps = {name: params[name] - torch.cumsum(e.view(-1, *([1] * params[name].dim())) * g[name], 0)
                 for name in params}
        out.append(read(steps, queries[sl]))
        params = {name: steps[name][-1] for name in steps}
    return torch.cat(out), params


class TTTLinear(nn.Module):
    """A TTT-Linear layer (sec. 2.3, 2.7): ``z_t = f(theta_Q x_t; W_t)``, W trained per token or mini-batch.

    Args:
        dim: input width. head_dim: width of the views and of ``W`` (``dim`` when None).
        mini_batch: ``b`` (the paper uses 16; 1 is online GD).
        lr_base: ``eta_base`` of ``eta(x) = eta_base sigmoid(theta_lr . x)`` (1 for TTT-Linear, sec. 2.7).
        learnable_lr: token-dependent ``eta(x)``; otherwise ``eta = lr_base``.
        ln_residual: ``f(x) = x + LN(W x)`` (sec. 2.7); then the primal form runs, otherwise the dual form.
    ``W_0`` (``theta_init``) starts at 0 and is learned in the outer loop like the views.
    """

    def __init__(self, dim: int, head_dim: int | None = None, mini_batch: int = 16, lr_base: float = 1.0,
                 learnable_lr: bool = True, ln_residual: bool = False) -> None:
        super().__init__()
        h = head_dim or dim
        self.mini_batch, self.lr_base, self.ln_residual = mini_batch, lr_base, ln_residual
        self.theta_k = nn.Linear(dim, h, bias=False)
        self.theta_v = nn.Linear(dim, h, bias=False)
        self.theta_q = nn.Linear(dim, h, bias=False)
        self.weight_init = nn.Parameter(torch.zeros(h, h))
        self.theta_lr = nn.Linear(dim, 1, bias=False) if learnable_lr else None
        self.norm = nn.LayerNorm(h) if ln_residual else None

    def learning_rate(self, x: Tensor) -> Tensor:
        """``eta(x_t) = eta_base sigmoid(theta_lr . x_t)`` per token (sec. 2.7), shape ``x.shape[:-1]``."""
        if self.theta_lr is None:
            return torch.full(x.shape[:-1], self.lr_base, dtype=x.dtype, device=x.device)
        return self.lr_base * torch.sigmoid(self.theta_lr(x).squeeze(-1))

    def inner(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The inner model ``f``: ``W x`` or ``x + LN(W x)``."""
        y = params["weight"] @ x
        if self.norm is None:
            return y
        return x + functional_call(self.norm, dict(self.norm.named_parameters()), (y,))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` of shape ``(T, dim)`` or ``(B, T, dim)``; returns ``z`` of shape ``(..., T, head_dim)``."""
        if x.dim() == 3:
            return torch.stack([self(row) for row in x])
        k, v, q, lr = self.theta_k(x), self.theta_v(x), self.theta_q(x), self.learning_rate(x)
        if self.norm is None:
            return ttt_linear_dual(self.weight_init, k, v, q, lr, self.mini_batch).outputs
        out, _ = ttt_minibatch(self.inner, {"weight": self.weight_init}, k, v, q, lr, self.mini_batch)
        return out
