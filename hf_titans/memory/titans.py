"""The Titans test-time update rule (Behrouz et al., arXiv 2501.00663, sec. 3.1).

Surprise is the gradient of the memory's loss on the incoming data. The update keeps a momentum of past
surprise and forgets a fraction of the old memory at every step:

    S_t = eta * S_{t-1} - theta * u_t                            (eq. 14, momentum over surprise)
    M_t = (1 - alpha) * M_{t-1} + S_t                            (eq. 13, forgetting gate)

with ``u_t = grad l(M_{t-1}; x_t)`` (eq. 8's momentary surprise). When ``precondition`` is on, ``u_t`` is the
gradient divided by the root of its running second moment (a diagonal preconditioner, as in Adam): writing
through a frozen language model is badly conditioned, and this makes one step size fit every layer and model.
``eta``, ``theta`` and ``alpha`` are the momentum, step size and forgetting rate; the paper makes them
data-dependent, here they are per-group constants, the special case the paper starts from.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


class TitansOptimizer(torch.optim.Optimizer):
    """Momentum over surprise with forgetting (eqs. 13-14) as a ``torch.optim.Optimizer``.

    Gradients are clipped to ``max_grad_norm`` per parameter group first. A step whose gradients are not
    finite writes nothing (the memory, the momentum and the second moments stay as they were) and returns
    ``False``.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, forget: float = 0.0,
                 max_grad_norm: float = float("inf"), precondition: bool = True, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        defaults = dict(lr=lr, momentum=momentum, forget=forget, max_grad_norm=max_grad_norm,
                        precondition=precondition, beta2=beta2, eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None) -> bool:  # type: ignore[override]
        if closure is not None:
            raise ValueError("TitansOptimizer.step does not take a closure")
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            if not grads:
                continue
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if not torch.isfinite(norm):
                return False
            groups.append((group, params, grads, float(norm)))
        for group, params, grads, norm in groups:
            clip = group["max_grad_norm"]
            scale = min(1.0, clip / (norm + 1e-12)) if math.isfinite(clip) else 1.0
            for p, g in zip(params, grads):
                g = g * scale
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["surprise_momentum"] = torch.zeros_like(p)
                    if group["precondition"]:
                        state["second_moment"] = torch.zeros_like(p)
                state["step"] += 1
                u = g
                if group["precondition"]:
                    v = state["second_moment"].mul_(group["beta2"]).addcmul_(g, g, value=1 - group["beta2"])
                    v_hat = v / (1 - group["beta2"] ** state["step"])
                    u = g / (v_hat.sqrt() + group["eps"])
                s = state["surprise_momentum"]
                s.mul_(group["momentum"]).add_(u, alpha=-group["lr"])  # eq. 14
                p.mul_(1.0 - group["forget"]).add_(s)  # eq. 13
        return True
