"""Prefill methods, one small class each, behind one interface (`PrefillMethod.prefill`).

Adding a method is adding its module and its line in `registry.METHOD_PATHS`, the one list of methods.
"""

from ..config import PromptDistillConfig
from ..layout import PromptLayout
from .base import FullAttention, Prefill, PrefillMethod, PrefillSequence, PrefillState
from .gemfilter import GemFilter
from .promptdistill import PromptDistill, Stage
from .random import RandomSelection
from .recorder import QueryAttentionRecorder
from .registry import METHODS, method_class

METHOD_CLASSES: dict[str, type[PrefillMethod]] = {name: method_class(name) for name in METHODS}


def method_for(config: PromptDistillConfig, layouts: list[PromptLayout]) -> PrefillMethod:
    """The prefill method `config.method` names, set up for a batch of sequences with `layouts` (fractional budgets
    resolve against each)."""
    return method_class(config.method).from_config(config, layouts)


__all__ = [
    "FullAttention",
    "GemFilter",
    "METHODS",
    "METHOD_CLASSES",
    "Prefill",
    "PrefillMethod",
    "PrefillSequence",
    "PrefillState",
    "PromptDistill",
    "QueryAttentionRecorder",
    "RandomSelection",
    "Stage",
    "method_class",
    "method_for",
]
