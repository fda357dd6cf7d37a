"""Prefill methods, one small class each, behind one interface (`PrefillMethod.prefill`).

Adding a method is adding its class and its line in `registry.METHOD_CLASSES`, the one list of methods.
"""

from .base import FullAttention, Prefill, PrefillMethod, PrefillRow, PrefillState
from .gemfilter import GemFilter
from .promptdistill import PromptDistill, Stage
from .random import RandomSelection
from .recorder import QueryAttentionRecorder
from .registry import METHOD_CLASSES, METHODS, method_class, method_for

__all__ = [
    "FullAttention",
    "GemFilter",
    "METHODS",
    "METHOD_CLASSES",
    "Prefill",
    "PrefillMethod",
    "PrefillRow",
    "PrefillState",
    "PromptDistill",
    "QueryAttentionRecorder",
    "RandomSelection",
    "Stage",
    "method_class",
    "method_for",
]
