"""What `ChatPromptDistill` and `PromptDistillLLM` share: constructor settings, per-call options, the engine behind
them and the statistics they report. The adapters themselves only translate LangChain's inputs and outputs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

from langchain_core.language_models import LangSmithParams
from pydantic import Field, PrivateAttr, SecretStr, model_validator

from ..adapter_settings import CONFIG_SHORTCUTS, sampling_settings
from ..call_options import CallOptions
from ..config import PromptDistillConfig
from ..engine import GenerationResult, GenerationStream, PromptDistillEngine
from ..inputs import SAMPLING_SETTINGS
from ..loading import DEFAULT_MODEL, check_load_settings

PROVIDER = "promptdistill"
# The sampling settings, by their LangChain names (`max_tokens` is `SamplingParams.max_new_tokens`; logprobs are
# not reported in LangChain's messages, so not offered).
SAMPLING_SETTINGS = {
    "max_tokens" if name == "max_new_tokens" else name: name for name in SAMPLING_SETTINGS if name != "logprobs"
}
# Options a single call may pass (`invoke(..., pd_query=...)` or `.bind(...)`); the sampling ones and the
# `PromptDistillConfig` fields (`method`, `budgets`, ...) override the constructor's values for that call. Stop
# strings come as LangChain's own `stop` argument.
SAMPLING_OPTIONS = tuple(name for name in SAMPLING_SETTINGS if name != "stop")
CALL_OPTIONS = ("pd_query", "pd_documents", "model", *SAMPLING_OPTIONS, "max_new_tokens", *CONFIG_SHORTCUTS)


class PromptDistillSettings(sampling_settings(SAMPLING_SETTINGS)):
    """Settings of a PromptDistill-backed LangChain model. Weights load on the first call, once per process and
    load settings (`model`, `device`, `dtype`, `quantization`), so constructing models is cheap.

    Mixed in before `BaseChatModel`/`BaseLLM`, whose `_get_ls_params` it extends.

    Arguments: LangChain's own fields, the settings below, every `PromptDistillConfig` field as a shortcut, and the
    other frameworks' names `max_new_tokens` (for `max_tokens`) and `model_name` (for `model`); giving both names of
    one setting, or any other argument, to the constructor or a call, is a `TypeError` naming the closest valid name.
    """

    ALIASES = {"max_new_tokens": "max_tokens", "model_name": "model"}
    CALL_OPTIONS = CALL_OPTIONS
    CALL_HINT = "a per-call option: invoke(..., {name}=...) or .bind({name}=...)"
    # LangChain's own flag choosing between `_generate` and `_stream`; it may reach both and means nothing to us.
    ROUTING_FLAGS = ("stream",)

    model: str = Field(DEFAULT_MODEL, min_length=1)
    """The embedded default, a local directory or a Hugging Face hub id (see `pd_integrations.load_model`)."""
    # The sampling settings (`temperature`, `max_tokens`, `top_p`, `top_k`, `seed`, `stop`, the penalties and
    # `logit_bias`) come from `SamplingParams` through `sampling_settings`; a call's own `stop` replaces `stop`.
    timeout: float | None = Field(None, gt=0)
    """Seconds a call may run before it raises `TimeoutError`; checked as text arrives (prefill and a decode step
    are not interrupted)."""
    max_retries: int = Field(2, ge=0)
    """Accepted for compatibility with API-backed models; local generation has no transient failures to retry."""
    api_key: SecretStr | None = Field(None, exclude=True)
    """Accepted (and unused) for compatibility with API-backed models and langchain-tests: a local model needs no
    key."""
    streaming: bool = False
    """Generate token by token even for `invoke`, so `on_llm_new_token` callbacks fire."""
    device: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None
    """None, "4bit" or "8bit" (bitsandbytes)."""

    _distill_config: PromptDistillConfig | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check_settings(self) -> PromptDistillSettings:
        # Errors here name the parameter; settings that depend on the model (layer ranges) are checked on first use.
        self._distill_config = self.distill_config()
        check_load_settings(self.device, self.dtype, self.quantization)
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
        return self._engine(self.model, self._distill_config).tokenizer(text, add_special_tokens=False)["input_ids"]

    def _stops(self, stop: list[str] | None) -> list[str] | None:
        return list(stop or self.stop) or None

    def _engine(self, model: str, config: PromptDistillConfig | None) -> PromptDistillEngine:
        # Cheap after the first call: the weights load once per process and load settings (`Runtime.load`).
        return PromptDistillEngine.from_pretrained(
            model, config, device=self.device, dtype=self.dtype, quantization=self.quantization
        )

    def _prepare_call(
        self, stop: list[str] | None, kwargs: dict[str, Any], template: dict[str, Any] | None = None
    ) -> Call:
        """Resolve one call's options (see `DistillSettings.resolve_call`; `template` holds what a `DistillPrompt`
        tagged onto the messages) and its model: `model=` runs another one, loaded on first use."""
        model = kwargs.get("model", self.model)
        options = self.resolve_call(kwargs, template=template, stop=stop)
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        return Call(self._engine(model, options.config), model, options, self.timeout)


@dataclasses.dataclass(frozen=True)
class Call:
    """One call's engine, model name, resolved options and timeout."""

    engine: PromptDistillEngine
    model_name: str
    options: CallOptions
    timeout: float | None

    def stream(self, constraint: Any = None, **prompt: Any) -> GenerationStream:
        """Generate from `prompt=` text or `messages=` (and `tools=`, `tool_format=`) under `constraint`; iterate
        for text deltas, then read `.result`.

        Raises `ValueError`/`TypeError` for bad input before any model work.
        """
        stream = self.options.stream(self.engine, self.options.prompt(**prompt), constraint)
        return GenerationStream(_within_timeout(stream, self.timeout))

    def response_metadata(self, result: GenerationResult) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_provider": PROVIDER,
            "finish_reason": result.finish_reason,
            "promptdistill": result.stats(),
        }


def _within_timeout(stream: GenerationStream, timeout: float | None) -> Iterator[str]:
    deadline = None if timeout is None else time.monotonic() + timeout
    for delta in stream:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"generation took longer than timeout={timeout} s")
        yield delta
    return stream.result


def usage_metadata(result: GenerationResult) -> dict[str, int]:
    """LangChain `UsageMetadata`: `GenerationResult.usage` under LangChain's names."""
    usage = result.usage()
    return {
        "input_tokens": usage["prompt_tokens"],
        "output_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
    }
