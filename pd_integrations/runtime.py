"""The loaded model a process shares: weights, tokenizer, architecture, EOS ids, device, profile and forward lock.

LangChain and LlamaIndex construct model objects freely (the LangChain standard tests build hundreds), so weights
load lazily and once per process and load settings (`Runtime.load`). Every engine, adapter and server over one
runtime shares its scheduler (`pd_integrations.scheduler`), which batches concurrent generations, and its lock,
which serialises forwards (the scheduler's steps, calibration passes) so they never oversubscribe the device. An
engine is a runtime plus a resolved config.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .arch import Architecture
from .config import Profile, find_profile
from .loading import DEFAULT_MODEL, load_model


@dataclass(eq=False)
class Runtime:
    """A loaded model and what every call on it shares. Build one with `Runtime.load` (cached per process) or
    `Runtime.wrap` (around a model and tokenizer you loaded). Raises `UnsupportedArchitectureError` for an
    unknown model family."""

    model: torch.nn.Module
    tokenizer: object
    model_name: str
    arch: Architecture = field(init=False)
    eos_ids: list[int] = field(init=False)
    lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    scheduler: object = field(init=False, default=None, repr=False)  # a `Scheduler`, made by `Scheduler.of`

    def __post_init__(self):
        self.arch = Architecture(self.model)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @classmethod
    def wrap(cls, model, tokenizer, model_name: str | None = None) -> Runtime:
        """A runtime around an already loaded model and tokenizer (not cached: the caller owns them)."""
        return cls(model, tokenizer, model_name or model.config.name_or_path or model.config.model_type)

    @classmethod
    def load(
        cls, model: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto", quantization: str | None = None
    ) -> Runtime:
        """The process-wide runtime of `model` with these load settings, loading it on first use (see `load_model`
        for what that raises)."""
        key = (model, device, str(dtype), quantization)
        with _loading:
            if key not in _loaded:
                loaded, tokenizer = load_model(model, device=device, dtype=dtype, quantization=quantization)
                _loaded[key] = cls(loaded, tokenizer, model)
            return _loaded[key]

    @property
    def device(self) -> torch.device:
        return self.arch.decoder.embed_tokens.weight.device

    @cached_property
    def profile(self) -> Profile | None:
        """The model's calibrated profile, read once (see `find_profile`, which raises for a bad one)."""
        return find_profile(self.model_name, self.arch.num_layers)


_loaded: dict[tuple, Runtime] = {}
_loading = threading.Lock()
