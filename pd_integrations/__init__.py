"""PromptDistill for Hugging Face decoder models, with LangChain and LlamaIndex adapters.

Retrieved context is pruned inside the model during prefill: at selection layers the question's attention picks the
context tokens that later layers see, so time to first token and KV cache shrink while answers stay grounded.
"""

from .arch import SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError
from .config import PromptDistillConfig
from .engine import BatchStream, GenerationResult, GenerationStream, Prefill, PromptDistillEngine
from .inputs import PromptInput, SamplingParams
from .loading import DEFAULT_MODEL, ModelNotAvailableError, load_model

__all__ = [
    "BatchStream",
    "DEFAULT_MODEL",
    "GenerationResult",
    "GenerationStream",
    "ModelNotAvailableError",
    "Prefill",
    "PromptDistillConfig",
    "PromptDistillEngine",
    "PromptInput",
    "SUPPORTED_MODEL_TYPES",
    "SamplingParams",
    "UnsupportedArchitectureError",
    "load_model",
]
