"""The engine's update rules over one :class:`NeuralMemory`, stepped as one all-or-nothing write.

The memory has two parts written by two rules:

* the associative (familiarity) memory ``assoc_net`` is written with the variant's own update rule
  (:data:`~hf_titans.memory.variants.VARIANTS`: Titans eqs. 13-14, Moneta eq. 24, Yaad eq. 26, Memora
  eq. 27, TTT eq. 2/6, or a Nested-Learning inner optimizer);
* the reader (soft-prompt memory for ``mac``, layer memory for ``mag`` / ``mal``) is written through the frozen
  language model with :class:`TitansOptimizer` (momentum over surprise and forgetting, eqs. 13-14, with the
  library's diagonal preconditioner when ``config.precondition``).

:class:`JointOptimizer` steps both only if every gradient of both is finite (else writes nothing and returns
``False``), and snapshots/restores both with ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

from typing import Iterator, MutableMapping

import torch
from torch import Tensor

from .miras import MemoraOptimizer, MonetaOptimizer
from .optimizers import GDOptimizer, M3Optimizer, _global_norm
from .titans import TitansOptimizer
from .variants import get_variant

__all__ = ["JointOptimizer", "build_optimizer", "state_fields"]


class _JointState(MutableMapping):
    """``optimizer.state`` across the parts: each parameter's state lives in the part that owns it."""

    def __init__(self, joint: "JointOptimizer") -> None:
        self._joint = joint

    def _owner(self, param: Tensor) -> torch.optim.Optimizer:
        for part in self._joint.parts.values():
            if any(p is param for g in part.param_groups for p in g["params"]):
                return part
        raise KeyError("not a parameter of this optimizer")

    def __getitem__(self, param: Tensor) -> dict:
        for part in self._joint.parts.values():
            if param in part.state:
                return part.state[param]
        raise KeyError(param)

    def __setitem__(self, param: Tensor, value: dict) -> None:
        self._owner(param).state[param] = value

    def __delitem__(self, param: Tensor) -> None:
        del self._owner(param).state[param]

    def __iter__(self) -> Iterator[Tensor]:
        for part in self._joint.parts.values():
            yield from part.state

    def __len__(self) -> int:
        return sum(len(part.state) for part in self._joint.parts.values())


class JointOptimizer:
    """Several memory optimizers over disjoint parameters, written as one step (all or nothing).

    ``param_groups`` are the parts' own group dicts (setting ``group["forget"]`` reaches the part), ``state``
    maps every parameter to its state in whichever part owns it.
    """

    def __init__(self, parts: dict[str, torch.optim.Optimizer]) -> None:
        self.parts = dict(parts)

    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts.values() for g in part.param_groups]

    @property
    def state(self) -> _JointState:
        return _JointState(self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> bool:
        """Write every part, or nothing (returns ``False``) if any gradient of any part is not finite."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads and not torch.isfinite(_global_norm(grads)):
            return False
        for part in self.parts.values():
            if not part.step():  # pragma: no cover - finiteness was checked above
                raise RuntimeError(f"{type(part).__name__} refused a finite step after others were written")
        return True

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state[name])

    def state_fields(self) -> dict[Tensor, tuple[str, ...]]:
        """Per parameter, the optimizer-state fields a checkpoint holds for it once it has been written."""
        return {p: state_fields(part, group) for part in self.parts.values()
                for group in part.param_groups for p in group["params"]}


def state_fields(optimizer: torch.optim.Optimizer, group: dict) -> tuple[str, ...]:
    """The per-parameter state an optimizer keeps (``"step"`` an integer, the others tensors shaped like it)."""
    if isinstance(optimizer, TitansOptimizer):  # also MomentumOptimizer
        return ("step", "surprise_momentum") + (("second_moment",) if group["precondition"] else ())
    if isinstance(optimizer, M3Optimizer):
        return ("step", "fast", "slow", "second", "slow_out", "block_sum")
    if isinstance(optimizer, MonetaOptimizer):
        return ("accumulator",)
    if isinstance(optimizer, (GDOptimizer, MemoraOptimizer)):
        return ()
    raise TypeError(f"unknown memory optimizer {type(optimizer).__name__}")


def build_optimizer(memory, config) -> JointOptimizer:
    """The update rules of ``memory`` for ``config`` (a :class:`~hf_titans.MemoryConfig`).

    ``assoc``: the variant's rule at ``assoc_lr`` with ``forget``; for ``titans`` with no ``inner_optimizer``
    it is :class:`TitansOptimizer` with ``momentum`` and ``precondition`` from the config (eqs. 13-14 exactly
    when ``precondition`` is off). ``inner_optimizer="momentum"`` takes the config's ``momentum``.
    ``reader``: :class:`TitansOptimizer` at ``lr`` over :meth:`NeuralMemory.reader_parameters`.
    """
    spec = get_variant(config.variant)
    assoc_params = list(memory.assoc_net.parameters())
    if config.variant == "titans" and config.inner_optimizer is None:
        assoc = TitansOptimizer(assoc_params, lr=config.assoc_lr, momentum=config.momentum, forget=config.forget,
                                max_grad_norm=config.max_grad_norm, precondition=config.precondition)
    else:
        overrides = {"momentum": config.momentum} if config.inner_optimizer == "momentum" else {}
        assoc = spec.make_optimizer(assoc_params, lr=config.assoc_lr, forget=config.forget,
                                    inner=config.inner_optimizer, max_grad_norm=config.max_grad_norm, **overrides)
    reader = TitansOptimizer([{"params": memory.reader_parameters()}], lr=config.lr, momentum=config.momentum,
                             forget=config.forget, max_grad_norm=config.max_grad_norm,
                             precondition=config.precondition)
    return JointOptimizer({"assoc": assoc, "reader": reader})
