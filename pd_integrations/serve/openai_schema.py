"""OpenAI's wire format, as far as pd-serve speaks it: request models (validated by FastAPI) and the response,
chunk and error bodies.

Requests ignore fields they do not know, as OpenAI-compatible servers do, because every client sends a few of its
own; fields whose meaning the server cannot honour are refused by `ChatCompletionRequest.unsupported` instead of
being dropped silently. Value ranges (temperature, top_p, ...) are the engine's to check: it names the parameter.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..results import GenerationResult

# The statistics each response reports under "promptdistill"; the kept character spans and the rendered prompt
# are left out because they grow with the prompt.
REPORTED_STATS = ("prompt_tokens", "kept_tokens", "kept_ratio", "prefill_seconds", "selection_layers", "method",
                  "context_source", "protected_tokens", "prunable_tokens", "kept_prunable_tokens",
                  "document_retention")


class PromptDistillOptions(BaseModel):
    """The request's `promptdistill` field (sent with the openai client's `extra_body=`): what seeds selection,
    which texts are the retrieved documents, and the per-request settings of `PromptDistillConfig` (unset ones
    come from the model's profile)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting would otherwise be ignored silently

    query: str | None = None
    documents: list[str] | None = None
    method: str | None = None
    selection_layers: list[int] | None = None
    budgets: list[int | float] | int | float | None = None
    span: str | None = None

    def config_fields(self) -> dict:
        """The fields given that belong to `PromptDistillConfig`."""
        return self.model_dump(exclude={"query", "documents"}, exclude_none=True)


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_engine_message(self) -> dict:
        """{"role", "content"} for the chat template: text parts joined, OpenAI's "developer" role as "system"."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class GenerationRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    promptdistill: PromptDistillOptions | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first field set to something this server cannot do, else None: such a field
        is refused rather than ignored, since the client asked for it."""
        if self.n != 1:
            return "n", f"n must be 1 (one choice per request), got {self.n}"
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        return None

    @property
    def max_tokens_param(self) -> str:
        """The request field that set the engine's `max_new_tokens`, to name in an error."""
        return "max_tokens"

    def sampling(self) -> dict:
        """The engine's sampling and stopping arguments; unset fields keep the engine's defaults (greedy)."""
        given = {"max_new_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                 "seed": self.seed, "stop": self.stop}
        return {name: value for name, value in given.items() if value is not None}

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tool calls are not supported"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format", "only response_format {\"type\": \"text\"} is supported"
        return super().unsupported()

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def sampling(self) -> dict:
        sampling = super().sampling()
        if self.max_completion_tokens is not None:  # OpenAI's newer name wins, as in its API
            sampling["max_new_tokens"] = self.max_completion_tokens
        return sampling

    def engine_input(self) -> dict:
        return {"messages": [message.as_engine_message() for message in self.messages]}


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt", f"prompt must be one string (one completion per request), got {len(self.prompt)}"
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()

    def engine_input(self) -> dict:
        return {"prompt": self.prompt if isinstance(self.prompt, str) else self.prompt[0]}


# ---------------------------------------------------------------- responses


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def reported_stats(result: GenerationResult) -> dict:
    stats = result.stats()
    return {name: stats[name] for name in REPORTED_STATS if name in stats}


def usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.output_tokens,
            "total_tokens": result.prompt_tokens + result.output_tokens}


class ResponseIds:
    """The id, creation time and model name that every body of one response repeats."""

    def __init__(self, kind: Literal["chat", "text"], model: str):
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    def _body(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    def completion(self, result: GenerationResult) -> dict:
        """The whole response of a non-streaming request."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": result.finish_reason, "logprobs": None}
            body = self._body("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
            body = self._body("text_completion", [choice])
        return {**body, "usage": usage(result), "promptdistill": reported_stats(result)}

    def chunk(self, text: str | None = None, *, first: bool = False, result: GenerationResult | None = None,
              with_usage: bool = False) -> dict:
        """One streamed chunk: a text delta, or (with `result`) the final one with the finish reason and the
        PromptDistill statistics. With `with_usage`, every chunk carries `"usage": null`, as OpenAI's do."""
        finish_reason = None if result is None else result.finish_reason
        if self.kind == "chat":
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            body = self._body("chat.completion.chunk", [choice])
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
            body = self._body("text_completion", [choice])
        if result is not None:
            body["promptdistill"] = reported_stats(result)
        if with_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, result: GenerationResult) -> dict:
        """The last chunk of a stream that asked for `stream_options: {"include_usage": true}`."""
        object_name = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._body(object_name, []), "usage": usage(result)}
