"""One loaded model per process and load settings, shared by every adapter instance.

LangChain and LlamaIndex construct model objects freely (the LangChain standard tests build hundreds), so weights
load lazily on first use and are cached here, keyed by everything that changes what gets loaded.
"""

from __future__ import annotations

import threading

from .config import PromptDistillConfig
from .engine import PromptDistillEngine
from .loading import DEFAULT_MODEL

_engines: dict[tuple, PromptDistillEngine] = {}
_lock = threading.Lock()


def shared_engine(model: str = DEFAULT_MODEL, config: PromptDistillConfig | None = None, *, device: str = "auto",
                  dtype: str = "auto", quantization: str | None = None) -> PromptDistillEngine:
    """An engine over the process-wide copy of `model` loaded with these settings, using `config`.

    The first call for a set of load settings loads the weights (see `load_model` for what it raises); later calls
    reuse them, and every engine over one copy shares its lock.
    """
    key = (model, device, str(dtype), quantization)
    with _lock:
        if key not in _engines:
            _engines[key] = PromptDistillEngine.from_pretrained(model, device=device, dtype=dtype,
                                                                quantization=quantization)
    base = _engines[key]
    return base if config is None else base.with_config(config)
