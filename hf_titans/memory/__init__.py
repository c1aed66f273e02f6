"""The memory maths: no transformers imports."""

from .core import NeuralMemory
from .joint import JointOptimizer, build_optimizer, state_fields
from .gates import DataDependentGates, MIRAS_GATES, TITANS_GATES, YAAD_GATES, apply_gates
from .miras import (MemoraOptimizer, MonetaOptimizer, YaadOptimizer, lq_link, lq_link_inverse, memora_step,
                    moneta_step, to_simplex_, yaad_step)
from .objectives import (huber, huber_loss, kl_retention, kl_retention_update, l2_loss, l2_retention,
                         l2_retention_update, lp_loss, lq_retention, softmax_update)
from .optimizers import GDOptimizer, M3Optimizer, MemoryOptimizer, MomentumOptimizer, gd_step, newton_schulz
from .parallel import ChunkedResult, forgetting_closed_form, momentum_closed_form, segment_products, titans_chunked
from .titans import TitansOptimizer
from .ttt import TTTLinear, TTTResult, ttt_linear_dual, ttt_linear_minibatch, ttt_linear_online, ttt_minibatch
from .variants import INNER_OPTIMIZERS, VARIANTS, VariantSpec, get_variant

__all__ = [
    "NeuralMemory", "TitansOptimizer", "JointOptimizer", "build_optimizer", "state_fields",
    # objectives and retention (MIRAS, Titans eq. 12)
    "l2_loss", "lp_loss", "huber", "huber_loss", "l2_retention", "lq_retention", "kl_retention",
    "l2_retention_update", "kl_retention_update", "softmax_update",
    # update rules
    "MemoryOptimizer", "GDOptimizer", "MomentumOptimizer", "M3Optimizer", "newton_schulz", "gd_step",
    "MonetaOptimizer", "YaadOptimizer", "MemoraOptimizer", "moneta_step", "yaad_step", "memora_step",
    "lq_link", "lq_link_inverse", "to_simplex_",
    # parallel / closed forms, TTT
    "titans_chunked", "ChunkedResult", "segment_products", "momentum_closed_form", "forgetting_closed_form",
    "TTTLinear", "TTTResult", "ttt_linear_online", "ttt_linear_minibatch", "ttt_linear_dual", "ttt_minibatch",
    # data-dependent gates, registry
    "DataDependentGates", "TITANS_GATES", "MIRAS_GATES", "YAAD_GATES", "apply_gates",
    "VARIANTS", "VariantSpec", "INNER_OPTIMIZERS", "get_variant",
]
