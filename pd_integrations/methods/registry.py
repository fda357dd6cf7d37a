"""The one list of prefill methods: `config.method` names a key of `METHOD_PATHS`, and config validation,
resolution, the adapters, the server and the benchmarks take the names from here.

Adding a method is one module with its `PrefillMethod` class (see `base.PrefillMethod` for its hooks) and its line
in `METHOD_PATHS`. Classes are named by import path and loaded on first use, so that `config` can validate names
and ask a method for its rules without importing the method modules, which import `config`.
"""

from __future__ import annotations

import functools
import importlib

METHOD_PATHS = {
    "promptdistill": "pd_integrations.methods.promptdistill:PromptDistill",
    "gemfilter": "pd_integrations.methods.gemfilter:GemFilter",
    "full": "pd_integrations.methods.base:FullAttention",
    "random": "pd_integrations.methods.random:RandomSelection",
}
METHODS = tuple(METHOD_PATHS)


def method_class(name):
    """The method class registered as `name` (a `PrefillMethod` subclass).

    Raises:
        ValueError: `name` is not a registered method; the message lists them.
    """
    if not isinstance(name, str) or name not in METHOD_PATHS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {name!r}")
    return _load(name)


@functools.cache
def _load(name: str):
    module, attribute = METHOD_PATHS[name].split(":")
    return getattr(importlib.import_module(module), attribute)
