"""Registry of memory variants: which attentional bias, which update rule, which defaults.

A variant is what the engine needs to write a memory the way a paper does:

* ``loss(prediction, target, **kw)``: the attentional bias, one loss per sample (weight samples by a
  data-dependent ``theta_t`` before reducing, if used);
* ``make_optimizer(params, lr, forget=..., inner=..., **overrides)``: the update rule, an optimizer with
  ``step() -> bool`` (False and no write on non-finite gradients);
* ``gates``: the data-dependent gates the rule uses, for :class:`~hf_titans.memory.gates.DataDependentGates`;
* ``needs_simplex``: the memory must be put on the simplex first (Memora; :func:`~hf_titans.memory.miras.to_simplex_`).

``forget`` always means "fraction of the old memory dropped per step" (Titans' ``alpha_t``; MIRAS's
retention ``alpha_t`` is ``1 - forget``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from .gates import MIRAS_GATES, TITANS_GATES, YAAD_GATES
from .miras import MemoraOptimizer, MonetaOptimizer, YaadOptimizer
from .objectives import huber_loss, l2_loss, lp_loss
from .optimizers import GDOptimizer, M3Optimizer, MomentumOptimizer

__all__ = ["VariantSpec", "VARIANTS", "INNER_OPTIMIZERS", "get_variant"]

#: The Nested-Learning inner-loop optimizers, selectable for the variants whose retention is l2.
INNER_OPTIMIZERS: Mapping[str, type[torch.optim.Optimizer]] = {
    "gd": GDOptimizer,
    "momentum": MomentumOptimizer,
    "m3": M3Optimizer,
}


@dataclass(frozen=True)
class VariantSpec:
    """How one paper writes its memory. See the module docstring."""

    name: str
    objective: Callable[..., Tensor]
    optimizer: type[torch.optim.Optimizer]
    optimizer_defaults: Mapping[str, Any] = field(default_factory=dict)
    inner_optimizers: tuple[str, ...] = ()
    gates: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    needs_simplex: bool = False
    reference: str = ""

    def loss(self, prediction: Tensor, target: Tensor, **kwargs: Any) -> Tensor:
        """The attentional bias per sample (e.g. ``delta=`` for Yaad)."""
        return self.objective(prediction, target, **kwargs)

    def make_optimizer(self, params: Iterable, lr: float, forget: float = 0.0, inner: str | None = None,
                       max_grad_norm: float = math.inf, **overrides: Any) -> torch.optim.Optimizer:
        """The update rule over ``params`` (tensors or param-group dicts).

        ``inner`` picks a Nested-Learning optimizer (``"gd"``, ``"momentum"``, ``"m3"``) for variants whose
        retention is l2 (titans, yaad, ttt_linear); ``None`` uses the paper's own rule. ``overrides`` go to the
        optimizer (e.g. ``momentum=``, ``q=``, ``betas=``).
        """
        if inner is None:
            cls, kwargs = self.optimizer, dict(self.optimizer_defaults)
        elif inner in self.inner_optimizers:
            cls, kwargs = INNER_OPTIMIZERS[inner], {}
        else:
            allowed = ", ".join(self.inner_optimizers) or "none (the rule's geometry is its own)"
            raise ValueError(f"variant {self.name!r} takes inner optimizers: {allowed}; got {inner!r}")
        kwargs.update(overrides)
        return cls(params, lr=lr, forget=forget, max_grad_norm=max_grad_norm, **kwargs)


VARIANTS: Mapping[str, VariantSpec] = {
    "titans": VariantSpec(
        "titans", l2_loss, MomentumOptimizer, {"momentum": 0.9}, ("gd", "momentum", "m3"), TITANS_GATES,
        reference="Titans (arXiv 2501.00663): l2 bias (eq. 12), momentum + forgetting (eqs. 13-14)"),
    "moneta": VariantSpec(
        "moneta", partial(lp_loss, p=3.0), MonetaOptimizer, {"q": 4.0, "link": "mirror"}, (), MIRAS_GATES,
        reference="MIRAS (arXiv 2504.13173) sec. 5.3: l_p bias p=3 (eq. 10), l_q retention q=4 (eq. 24)"),
    "yaad": VariantSpec(
        "yaad", partial(huber_loss, delta=1.0, variant="mixture"), YaadOptimizer, {}, ("gd", "momentum", "m3"),
        YAAD_GATES,
        reference="MIRAS (arXiv 2504.13173) sec. 5.3: Huber bias (eq. 16), l2 retention, GD (eq. 26)"),
    "memora": VariantSpec(
        "memora", l2_loss, MemoraOptimizer, {}, (), MIRAS_GATES, needs_simplex=True,
        reference="MIRAS (arXiv 2504.13173) sec. 5.3: l2 bias, KL retention, softmax update (eq. 27)"),
    "ttt_linear": VariantSpec(
        "ttt_linear", l2_loss, GDOptimizer, {}, ("gd", "momentum", "m3"), {"theta": (0.5, 1.0)},
        reference="TTT (arXiv 2407.04620): reconstruction loss (eq. 4), GD per token or mini-batch (eqs. 2, 6); "
                  "the layer itself is hf_titans.memory.ttt.TTTLinear"),
}


def get_variant(name: str) -> VariantSpec:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown memory variant {name!r}; choose one of {', '.join(VARIANTS)}") from None
