"""Prefill methods, one small class each, behind one interface (`PrefillMethod.prefill`).

Adding a method is adding a class here and its name to `config.METHODS`.
"""

from ..config import PromptDistillConfig
from ..layout import RowLayout
from .base import FullAttention, Prefill, PrefillMethod, PrefillRow, PrefillState
from .gemfilter import GemFilter
from .promptdistill import PromptDistill, Stage
from .recorder import QueryAttentionRecorder

METHOD_CLASSES: dict[str, type[PrefillMethod]] = {
    "full": FullAttention,
    "promptdistill": PromptDistill,
    "gemfilter": GemFilter,
}


def method_for(config: PromptDistillConfig, layouts: list[RowLayout]) -> PrefillMethod:
    """The prefill method `config.method` names, set up for a batch of rows with `layouts` (fractional budgets
    resolve against each)."""
    cls = METHOD_CLASSES[config.method]
    return cls.from_config(config, layouts) if cls.prunes else cls()


__all__ = [
    "FullAttention",
    "GemFilter",
    "METHOD_CLASSES",
    "Prefill",
    "PrefillMethod",
    "PrefillRow",
    "PrefillState",
    "PromptDistill",
    "QueryAttentionRecorder",
    "Stage",
    "method_for",
]
