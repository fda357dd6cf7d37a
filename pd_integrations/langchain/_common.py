"""What `ChatPromptDistill` and `PromptDistillLLM` share: constructor settings, per-call options, the engine behind
them and the statistics they report. The adapters themselves only translate LangChain's inputs and outputs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

from langchain_core.language_models import LangSmithParams
from pydantic import BaseModel, Field, PrivateAttr, model_validator

from ..config import PromptDistillConfig
from ..engine import GenerationResult, GenerationStream, PromptDistillEngine
from ..loading import DEFAULT_MODEL, check_load_settings
from ..shared import shared_engine

PROVIDER = "promptdistill"
# Options a single call may pass (`invoke(..., pd_query=...)` or `.bind(...)`); the sampling ones override the
# constructor's values for that call.
SAMPLING_OPTIONS = ("temperature", "max_tokens", "top_p", "seed")
CALL_OPTIONS = ("pd_query", "pd_documents", "model", *SAMPLING_OPTIONS)
# LangChain's own flag choosing between `_generate` and `_stream`; it may reach both and means nothing to us.
_ROUTING_FLAGS = ("stream",)
_CONFIG_SHORTCUTS = ("method", "selection_layers", "budgets")


class PromptDistillSettings(BaseModel):
    """Settings of a PromptDistill-backed LangChain model. Weights load on the first call, once per process and
    load settings (`model`, `device`, `dtype`, `quantization`), so constructing models is cheap.

    Mixed in before `BaseChatModel`/`BaseLLM`, whose `_get_ls_params` it extends.
    """

    model: str = Field(DEFAULT_MODEL, min_length=1)
    """The embedded default, a local directory or a Hugging Face hub id (see `pd_integrations.load_model`)."""
    config: PromptDistillConfig | None = None
    """PromptDistill settings; fields left unset come from the model's profile."""
    method: str | None = None
    """Shortcut for `config.method`: "promptdistill", "gemfilter" or "full"."""
    selection_layers: tuple[int, ...] | None = None
    """Shortcut for `config.selection_layers`."""
    budgets: tuple[int | float, ...] | int | float | None = None
    """Shortcut for `config.budgets`: retrieved-context tokens kept per stage (ints) or fractions of them; a single
    number is one stage."""
    temperature: float = Field(0.0, ge=0)
    """0 decodes greedily."""
    max_tokens: int = Field(256, ge=1)
    """Most tokens generated per call."""
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    """Seeds sampling (temperature > 0) for reproducible output."""
    stop: list[str] | None = None
    """Stop sequences, cut from the output; a call's own `stop` replaces them."""
    timeout: float | None = Field(None, gt=0)
    """Seconds a call may run before it raises `TimeoutError`; checked as text arrives (prefill and a decode step
    are not interrupted)."""
    max_retries: int = Field(2, ge=0)
    """Accepted for compatibility with API-backed models; local generation has no transient failures to retry."""
    streaming: bool = False
    """Generate token by token even for `invoke`, so `on_llm_new_token` callbacks fire."""
    device: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None
    """None, "4bit" or "8bit" (bitsandbytes)."""

    _distill_config: PromptDistillConfig | None = PrivateAttr(None)
    _engines: dict[str, PromptDistillEngine] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_settings(self) -> PromptDistillSettings:
        # Errors here name the parameter; settings that depend on the model (layer ranges) are checked on first use.
        shortcuts = {name: getattr(self, name) for name in _CONFIG_SHORTCUTS if getattr(self, name) is not None}
        if self.config is not None or shortcuts:
            self._distill_config = (self.config or PromptDistillConfig()).replace(**shortcuts)
        check_load_settings(self.device, self.dtype, self.quantization)
        if self.stop is not None and not all(self.stop):
            raise ValueError(f"stop entries must be non-empty strings, got {self.stop!r}")
        return self

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            # Unset (None) fields are filled from the model's profile.
            "promptdistill": dataclasses.asdict(self._distill_config or PromptDistillConfig()),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
            "device": self.device,
            "dtype": self.dtype,
            "quantization": self.quantization,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        # The base class reads the model name, temperature and max_tokens from the call's kwargs, then our fields.
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = PROVIDER
        stops = self._stops(stop)
        if stops:
            params["ls_stop"] = stops
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` under the model's tokenizer (loads the model on first use)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self._engine(self.model).tokenizer(text, add_special_tokens=False)["input_ids"]

    def _stops(self, stop: list[str] | None) -> list[str] | None:
        return stop or self.stop or None

    def _engine(self, model: str) -> PromptDistillEngine:
        # Two threads may both build one on first use; both are valid and share the process-wide weights.
        if model not in self._engines:
            self._engines[model] = shared_engine(model, self._distill_config, device=self.device, dtype=self.dtype,
                                                 quantization=self.quantization)
        return self._engines[model]

    def _prepare_call(self, stop: list[str] | None, kwargs: dict[str, Any],
                      template: dict[str, Any] | None = None) -> Call:
        """Resolve one call's options: the query channel (`pd_query`), the retrieved documents (`pd_documents`:
        `Document`s or texts), a model override and sampling overrides, each validated like the constructor's
        arguments. `template` holds the question and documents a `DistillPrompt` tagged onto the messages; a
        call's own `pd_query`/`pd_documents` win over them."""
        unknown = sorted(set(kwargs) - {*CALL_OPTIONS, *_ROUTING_FLAGS})
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {unknown}; "
                            f"the per-call options are {', '.join(CALL_OPTIONS)}")
        settings = self
        overrides = {name: kwargs[name] for name in SAMPLING_OPTIONS if name in kwargs}
        if overrides:
            settings = self.model_copy()
            for name, value in overrides.items():
                type(self).__pydantic_validator__.validate_assignment(settings, name, value)
        model = kwargs.get("model", self.model)
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        template = template or {}
        query = kwargs.get("pd_query", template.get("query"))
        if query is not None and (not isinstance(query, str) or not query.strip()):
            raise ValueError(f"pd_query must be a non-empty str, got {query!r}")
        documents = kwargs.get("pd_documents")
        from_template = documents is None and template.get("documents") is not None
        options = {"query": query, "documents": template.get("documents") if from_template else documents,
                   "max_new_tokens": settings.max_tokens, "temperature": settings.temperature,
                   "top_p": settings.top_p, "seed": settings.seed, "stop": self._stops(stop)}
        return Call(self._engine(model), model, options, self.timeout, from_template)


@dataclasses.dataclass(frozen=True)
class Call:
    """One call's engine, model name, `engine.stream` options, and whether its documents came from a prompt
    template (a `DistillPrompt`)."""

    engine: PromptDistillEngine
    model_name: str
    options: dict[str, Any]
    timeout: float | None
    from_template: bool = False

    def stream(self, **prompt: Any) -> GenerationStream:
        """Generate from `prompt=` text or `messages=`; iterate for text deltas, then read `.result`.

        Raises `ValueError`/`TypeError` for bad input before any model work.
        """
        stream = GenerationStream(_within_timeout(self.engine.stream(**prompt, **self.options), self.timeout))
        if self.from_template:
            stream = stream.map_result(lambda result: dataclasses.replace(result, context_source="template"))
        return stream

    def response_metadata(self, result: GenerationResult) -> dict[str, Any]:
        return {"model_name": self.model_name, "model_provider": PROVIDER, "finish_reason": result.finish_reason,
                "promptdistill": result.stats()}


def _within_timeout(stream: GenerationStream, timeout: float | None) -> Iterator[str]:
    deadline = None if timeout is None else time.monotonic() + timeout
    for delta in stream:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"generation took longer than timeout={timeout} s")
        yield delta
    return stream.result


def usage_metadata(result: GenerationResult) -> dict[str, int]:
    """LangChain `UsageMetadata`: every prompt token counts as input, pruned or not."""
    return {"input_tokens": result.prompt_tokens, "output_tokens": result.output_tokens,
            "total_tokens": result.prompt_tokens + result.output_tokens}
