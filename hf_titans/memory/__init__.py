"""The memory maths: no transformers imports."""

from .core import NeuralMemory
from .titans import TitansOptimizer

__all__ = ["NeuralMemory", "TitansOptimizer"]
