"""hf_titans: a neural long-term memory that learns at test time, beside any frozen Hugging Face causal LM."""

from .base_model import load_base_model
from .config import MemoryConfig
from .engine import HybridTitansEngine, TeachReport
from .memory import NeuralMemory

__version__ = "0.1.0"

__all__ = ["HybridTitansEngine", "MemoryConfig", "NeuralMemory", "TeachReport", "load_base_model", "__version__"]
