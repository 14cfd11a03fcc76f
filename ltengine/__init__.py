"""ltengine: LightTransfer-Test inference for long-context LLMs (lazy layers get a sink + window KV cache)."""
from .config import LazyConfig, SamplingParams
from .engine import Engine, GenerationOutput, GenerationStats

__all__ = ["Engine", "LazyConfig", "SamplingParams", "GenerationOutput", "GenerationStats"]
__version__ = "0.1.0"
