"""ltengine: LightTransfer-Test inference for long-context LLMs (arXiv 2410.13846)."""
from .config import EngineConfig, LazyConfig, SamplingParams
from .engine import Engine
from .sequence import GenerationOutput, GenerationStats, RequestOutput, SequenceStatus, TextStream

__all__ = ["Engine", "EngineConfig", "GenerationOutput", "GenerationStats", "LazyConfig", "RequestOutput",
           "SamplingParams", "SequenceStatus", "TextStream"]
__version__ = "0.1.0"
