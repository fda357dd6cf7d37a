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

from ..adapter_settings import CONFIG_SHORTCUTS, DistillSettings, unexpected
from ..config import PromptDistillConfig
from ..engine import GenerationResult, GenerationStream, PromptDistillEngine
from ..loading import DEFAULT_MODEL, check_load_settings

PROVIDER = "promptdistill"
# Options a single call may pass (`invoke(..., pd_query=...)` or `.bind(...)`); the sampling ones and the
# `PromptDistillConfig` fields (`method`, `budgets`, ...) override the constructor's values for that call.
SAMPLING_OPTIONS = (
    "temperature",
    "max_tokens",
    "top_p",
    "top_k",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logit_bias",
)
CALL_OPTIONS = ("pd_query", "pd_documents", "model", *SAMPLING_OPTIONS, "max_new_tokens", *CONFIG_SHORTCUTS)
# LangChain's own flag choosing between `_generate` and `_stream`; it may reach both and means nothing to us.
_ROUTING_FLAGS = ("stream",)


class PromptDistillSettings(DistillSettings):
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

    model: str = Field(DEFAULT_MODEL, min_length=1)
    """The embedded default, a local directory or a Hugging Face hub id (see `pd_integrations.load_model`)."""
    temperature: float = Field(0.0, ge=0)
    """0 decodes greedily."""
    max_tokens: int = Field(256, ge=1)
    """Most tokens generated per call; `max_new_tokens` (the transformers/LlamaIndex name) is accepted too."""
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    """Sample from the `top_k` most likely tokens only (0 = off)."""
    seed: int | None = None
    """Seeds sampling (temperature > 0) for reproducible output."""
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    """OpenAI's penalties on tokens already in the output (see `pd_integrations.sampling.Penalties`)."""
    repetition_penalty: float = Field(1.0, gt=0)
    """transformers' repetition penalty over prompt and output (1 = off)."""
    logit_bias: dict[int, float] | None = None
    """Token id -> a number in [-100, 100] added to its logit."""
    stop: list[str] | None = None
    """Stop sequences, cut from the output; a call's own `stop` replaces them."""
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
        return self._engine(self.model, self._distill_config).tokenizer(text, add_special_tokens=False)["input_ids"]

    def _penalties(self) -> dict[str, Any]:
        return {
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": self.logit_bias,
        }

    def _stops(self, stop: list[str] | None) -> list[str] | None:
        return stop or self.stop or None

    def _engine(self, model: str, config: PromptDistillConfig | None) -> PromptDistillEngine:
        # Cheap after the first call: the weights load once per process and load settings (`Runtime.load`).
        return PromptDistillEngine.from_pretrained(
            model, config, device=self.device, dtype=self.dtype, quantization=self.quantization
        )

    def _prepare_call(
        self, stop: list[str] | None, kwargs: dict[str, Any], template: dict[str, Any] | None = None
    ) -> Call:
        """Resolve one call's options: the query channel (`pd_query`), the retrieved documents (`pd_documents`:
        `Document`s or texts), a model override, sampling overrides and `PromptDistillConfig` fields (`method`,
        `budgets`, ...), each validated like the constructor's arguments. `template` holds the question and
        documents a `DistillPrompt` tagged onto the messages; a call's own `pd_query`/`pd_documents` win."""
        kwargs = self._checked_call_options(kwargs)
        settings = self
        overrides = {name: kwargs[name] for name in SAMPLING_OPTIONS if name in kwargs}
        if overrides:
            settings = self.model_copy(update=overrides)
        model = kwargs.get("model", self.model)
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        template = template or {}
        query = kwargs.get("pd_query", template.get("query"))
        if query is not None and (not isinstance(query, str) or not query.strip()):
            raise ValueError(f"pd_query must be a non-empty str, got {query!r}")
        # The engine takes `Document`s as they are (`prompt.document_texts`).
        documents = kwargs.get("pd_documents")
        from_template = documents is None and template.get("documents") is not None
        options = {
            "query": query,
            "documents": template.get("documents") if from_template else documents,
            "max_new_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
            "seed": settings.seed,
            "stop": self._stops(stop),
            **settings._penalties(),
        }
        config = self.call_config({name: kwargs[name] for name in CONFIG_SHORTCUTS if name in kwargs})
        return Call(self._engine(model, config), model, options, self.timeout, from_template)

    def _checked_call_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` with `max_new_tokens` as `max_tokens`; `TypeError` for an unknown option (naming the closest,
        or pointing a constructor setting to the constructor) or for both names of the output length."""
        owner = type(self).__name__
        unknown = [name for name in kwargs if name not in {*CALL_OPTIONS, *_ROUTING_FLAGS}]
        if unknown:
            hints = {
                name: f"set it when constructing the model: {owner}({name}=...)"
                for name in unknown
                if name in type(self).model_fields
            }
            raise unexpected(f"{owner} call", unknown, CALL_OPTIONS, hints)
        if "max_new_tokens" in kwargs:
            if "max_tokens" in kwargs:
                raise TypeError(f"{owner} call got both max_tokens= and max_new_tokens= (the same setting); pass one")
            kwargs = {**kwargs, "max_tokens": kwargs["max_new_tokens"]}
        return kwargs


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
    """LangChain `UsageMetadata`: every prompt token counts as input, pruned or not."""
    return {
        "input_tokens": result.prompt_tokens,
        "output_tokens": result.output_tokens,
        "total_tokens": result.prompt_tokens + result.output_tokens,
    }
