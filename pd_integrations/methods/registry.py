"""The one list of prefill methods: `config.method` names a key of `METHOD_CLASSES`, and config validation,
resolution, the adapters, the server and the benchmarks take the names from here.

Adding a method is one class (a `PrefillMethod` with its `name`, see `base.PrefillMethod` for its hooks), imported
here, and its line in `METHOD_CLASSES`.
"""

from __future__ import annotations

from ..config import PromptDistillConfig
from ..layout import RowLayout
from .base import FullAttention, PrefillMethod
from .gemfilter import GemFilter
from .promptdistill import PromptDistill
from .random import RandomSelection

METHOD_CLASSES: dict[str, type[PrefillMethod]] = {
    cls.name: cls
    for cls in (
        PromptDistill,
        GemFilter,
        FullAttention,
        RandomSelection,
    )
}
METHODS = tuple(METHOD_CLASSES)


def method_class(name) -> type[PrefillMethod]:
    """The method class registered as `name`.

    Raises:
        ValueError: `name` is not a registered method; the message lists them.
    """
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {name!r}")
    return METHOD_CLASSES[name]


def method_for(config: PromptDistillConfig, layouts: list[RowLayout]) -> PrefillMethod:
    """The prefill method `config.method` names, set up for a batch of rows with `layouts` (fractional budgets
    resolve against each)."""
    return method_class(config.method).from_config(config, layouts)
