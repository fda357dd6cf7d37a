"""OpenAI's wire format, as far as pd-serve speaks it: request models (validated by FastAPI) and the response,
chunk and error bodies.

Requests ignore fields they do not know, as OpenAI-compatible servers do, because every client sends a few of its
own; OpenAI fields whose meaning the server cannot honour (`REFUSED_FIELDS`, `logprobs`, ...) and this package's
names sent where they do not belong (`MISPLACED_FIELDS`) are refused by `GenerationRequest.unsupported` instead of
being dropped silently. OpenAI's own ranges (temperature 0-2, n,
top_logprobs) are checked here; the engine checks the rest and names the parameter. See docs/openai-compat.md.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..adapter_settings import ConfigFields, sampling_fields
from ..call_options import OutputOptions
from ..config import PromptDistillConfig
from ..constraints import tool_finish_reason
from ..inputs import SAMPLING_SETTINGS, PromptInput
from ..results import GenerationResult
from ..tools import CallDelta, ToolCallStream

# The statistics each response reports under "promptdistill"; the kept character spans and the rendered prompt
# are left out because they grow with the prompt.
REPORTED_STATS = (
    "prompt_tokens",
    "kept_tokens",
    "kept_ratio",
    "prefill_seconds",
    "selection_layers",
    "method",
    "context_source",
    "protected_tokens",
    "prunable_tokens",
    "kept_prunable_tokens",
    "document_retention",
    "tool_format",
)


class PromptDistillOptions(ConfigFields):
    """The request's `promptdistill` field (sent with the openai client's `extra_body=`): what seeds selection,
    which texts are the retrieved documents, and any `PromptDistillConfig` field for this request (derived from
    the dataclass by `ConfigFields`, each checked as the config checks it; unset ones come from the model's
    profile)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting would otherwise be ignored silently

    query: str | None = None
    documents: list[str] | None = None

    def config(self) -> PromptDistillConfig | None:
        """The request's config, None when it sets no `PromptDistillConfig` field; raises `ValueError` naming a
        field for settings that do not go together (`selection_layers` and `budgets` of different lengths)."""
        fields = self.config_values()
        return PromptDistillConfig(**fields) if fields else None


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    name: str
    arguments: str  # a JSON object, as a string


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result: the call it answers

    def invalid(self) -> tuple[str, str] | None:
        """(field within the message, message) for the first field the engine cannot take, else None."""
        if self.content is None and not self.tool_calls:
            return "content", "content is required (it may be null only on an assistant message with tool_calls)"
        for j, call in enumerate(self.tool_calls or ()):
            if not isinstance(_json_object(call.function.arguments), dict):
                return (
                    f"tool_calls[{j}].function.arguments",
                    f"tool_calls[{j}].function.arguments must be a JSON "
                    f"object as a string, got {call.function.arguments!r:.100}",
                )
        return None

    def as_engine_message(self) -> dict:
        """The engine's chat message: text parts joined, OpenAI's "developer" role as "system", earlier calls with
        their arguments parsed (chat templates serialise them), a tool's result with its call's id."""
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)},
                }
                for call in self.tool_calls
            ]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        return message


def _json_object(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


# OpenAI request fields this server does not implement: set to anything but null, a 400 names them. (Fields that
# change nothing a local server does, such as `user`, `store`, `metadata` and `service_tier`, are accepted.)
REFUSED_FIELDS = (
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "functions",
    "function_call",
    "reasoning_effort",
    "best_of",
    "verbosity",
)
MAX_CHOICES = 16  # n per prompt; each choice is a batch row
# The sampling fields a request may set, by their OpenAI names: every `SamplingParams` setting, declared from the
# dataclass; unset ones keep its defaults (greedy). `max_tokens` is `max_new_tokens`; `top_k` and
# `repetition_penalty` are vLLM's extra fields, sent with `extra_body=`; `logprobs` is OpenAI's own shape, declared
# below.
SAMPLING_FIELDS = {
    "max_tokens": "max_new_tokens",
    **{name: name for name in SAMPLING_SETTINGS if name not in ("max_new_tokens", "logprobs")},
}
# Names a request may not use at its top level, with where they belong: `SamplingParams`' names this API spells
# otherwise, and the `promptdistill` options (OpenAI-compatible servers ignore unknown fields, which would drop
# them silently).
MISPLACED_FIELDS = {
    "max_new_tokens": "send max_tokens (OpenAI's name)",
    "constraint": "send response_format or tools, which constrain the output",
    **{
        name: f'send it inside the promptdistill field ({{"promptdistill": {{"{name}": ...}}}}, extra_body= in the '
        "openai client)"
        for name in PromptDistillOptions.model_fields
    },
}
_SamplingFields = create_model("SamplingFields", **sampling_fields(SAMPLING_FIELDS, optional=True))


class GenerationRequest(_SamplingFields):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")  # kept to refuse `REFUSED_FIELDS`; other unknown fields are ignored

    model: str
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    promptdistill: PromptDistillOptions | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first field set to something this server cannot do, else None: such a field
        is refused rather than ignored, since the client asked for it."""
        for name in REFUSED_FIELDS:
            if (self.model_extra or {}).get(name) not in (None, False, [], ["text"]):
                return name, f"{name} is not supported by this server"
        for name, where in MISPLACED_FIELDS.items():
            if name in (self.model_extra or {}):
                return name, f"{name} is not a request field here: {where}"
        if self.logprobs and self.stream:
            return "logprobs", "logprobs are not supported with stream: true (only in whole responses)"
        return None

    def invalid(self) -> tuple[str, str] | None:
        """(param, message) for the first field outside OpenAI's range, or whose value the engine cannot take and
        would not name, else None."""
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            return "temperature", f"temperature must be in [0, 2], got {self.temperature}"
        if self.top_p is not None and not 0 < self.top_p <= 1:
            return "top_p", f"top_p must be in (0, 1], got {self.top_p}"
        if self.top_k is not None and self.top_k < -1:
            return "top_k", f"top_k must be -1 or 0 (off) or an int >= 1, got {self.top_k}"
        if not 1 <= self.n <= MAX_CHOICES:
            return "n", f"n must be in [1, {MAX_CHOICES}], got {self.n}"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        return None

    @property
    def sequences(self) -> int:
        """How many generations the request asks for: `n` per prompt."""
        return self.n

    def output_options(self) -> OutputOptions:
        """What the output must be: none, free text."""
        return OutputOptions()

    def output(self) -> Output:
        """How the response reports what the model generates."""
        return Output(with_tools=False)

    @property
    def max_tokens_param(self) -> str:
        """The request field that set the engine's `max_new_tokens`, to name in an error."""
        return "max_tokens"

    def sampling(self) -> dict:
        """The `SamplingParams` fields the request sets (unset ones keep its defaults)."""
        given = {name: getattr(self, own) for own, name in SAMPLING_FIELDS.items()}
        if given["top_k"] == -1:  # vLLM's other spelling of off
            given["top_k"] = 0
        return {name: value for name, value in {**given, "logprobs": self.top_tokens}.items() if value is not None}

    def selection(self) -> dict:
        """The `PromptInput` fields of the `promptdistill` options: what seeds selection, what is pruned."""
        options = self.promptdistill
        return {} if options is None else {"query": options.query, "documents": options.documents}

    @property
    def top_tokens(self) -> int | None:
        """The engine's `logprobs`: None (off) or how many top alternatives per token (completions: `logprobs`,
        an int)."""
        return None if self.logprobs is None or self.logprobs is False else int(self.logprobs)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    # Checked by `OutputOptions.grammar` (pd_integrations.tools.output_grammar), whose errors name the field.
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # unset: one call per turn (OpenAI: several; small models repeat one)
    response_format: dict | None = None

    top_logprobs: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()

    @property
    def top_tokens(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def invalid(self) -> tuple[str, str] | None:
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            return "logprobs", f"logprobs must be a boolean in chat completions, got {self.logprobs!r}"
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            return "top_logprobs", f"top_logprobs must be in [0, 20], got {self.top_logprobs}"
        for i, message in enumerate(self.messages):
            if (refused := message.invalid()) is not None:
                return f"messages[{i}].{refused[0]}", f"messages[{i}].{refused[1]}"
        return super().invalid()

    def output_options(self) -> OutputOptions:
        return OutputOptions(self.tools, self.tool_choice, self.parallel_tool_calls, self.response_format)

    def output(self) -> Output:
        return Output(with_tools=bool(self.output_options().offered_tools))

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def sampling(self) -> dict:
        sampling = super().sampling()
        if self.max_completion_tokens is not None:  # OpenAI's newer name wins, as in its API
            sampling["max_new_tokens"] = self.max_completion_tokens
        return sampling

    def prompt_inputs(self, tool_format: str = "auto") -> list[PromptInput]:
        """The engine's sequences, one per choice; `tool_format` is how the server renders tools."""
        messages = [message.as_engine_message() for message in self.messages]
        tools = self.output_options().offered_tools
        return [
            PromptInput(messages=messages, tools=tools, tool_format=tool_format, **self.selection())
        ] * self.sequences


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None

    def invalid(self) -> tuple[str, str] | None:
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= 5):
            return "logprobs", f"logprobs must be an int in [0, 5] in completions, got {self.logprobs!r}"
        return super().invalid()

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @property
    def sequences(self) -> int:
        return self.n * len(self.prompts)

    def prompt_inputs(self, tool_format: str = "auto") -> list[PromptInput]:
        """The engine's sequences: prompt i's choices are sequences i*n .. i*n+n-1, as OpenAI numbers them (no tools, so
        `tool_format` does not apply)."""
        return [PromptInput(prompt, **self.selection()) for prompt in self.prompts for _ in range(self.n)]


# ---------------------------------------------------------------- responses


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def reported_stats(result: GenerationResult) -> dict:
    stats = result.stats()
    return {name: stats[name] for name in REPORTED_STATS if name in stats}


class Output:
    """What the model generates as OpenAI reports it: `delta`s of the text and, with tools offered, of the tool
    calls split out of the generated `<tool_call>` blocks (`pd_integrations.tools.ToolCallStream`): a call's id,
    type and name first, then fragments of its arguments' JSON, as OpenAI streams them. A non-streaming response
    is its deltas merged, as a client merges a stream."""

    def __init__(self, with_tools: bool):
        self._calls = ToolCallStream() if with_tools else None

    def feed(self, text: str) -> list[dict]:
        if self._calls is None:
            return [{"content": text}] if text else []
        return _deltas(self._calls.feed(text))

    def close(self, result: GenerationResult) -> list[dict]:
        """The deltas held back until the output ended in `result`."""
        return [] if self._calls is None else _deltas(self._calls.close(cut_off=result.finish_reason == "length"))

    def finish_reason(self, result: GenerationResult) -> str:
        """ "tool_calls" when the output ends with a complete call (see `tool_finish_reason`); else the engine's
        ("length" for a call cut off inside its arguments, whose partial arguments were sent)."""
        if self._calls is None:
            return result.finish_reason
        return tool_finish_reason(result.finish_reason, self._calls.calls, self._calls.ends_with_call)


def _deltas(pieces: list[str | CallDelta]) -> list[dict]:
    # A call cut off before its name was complete is no call, and its wrapper text is nobody's content.
    return [_delta(piece) for piece in pieces if isinstance(piece, str) or piece.name is not None or piece.id is None]


def _delta(piece: str | CallDelta) -> dict:
    if isinstance(piece, str):
        return {"content": piece}
    if piece.id is not None:
        return {
            "tool_calls": [
                {
                    "index": piece.index,
                    "id": piece.id,
                    "type": "function",
                    "function": {"name": piece.name, "arguments": piece.arguments},
                }
            ]
        }
    return {"tool_calls": [{"index": piece.index, "function": {"arguments": piece.arguments}}]}


def merged_message(deltas: Iterable[dict]) -> dict:
    """The assistant message that chat `deltas` add up to: content null when there are only tool calls."""
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", ()):
            if "id" in call:
                calls[call["index"]] = {"id": call["id"], "type": "function", "function": dict(call["function"])}
            else:
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    message = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        message["tool_calls"] = list(calls.values())
    return message


def _chat_logprob(texts: dict[int, str], token: int, logprob: float) -> dict:
    return {"token": texts[token], "logprob": logprob, "bytes": list(texts[token].encode())}


Choice = tuple[GenerationResult, list[dict], str]  # a row's result, its `Output`'s deltas and its finish reason


class ResponseIds:
    """The id, creation time, model name and system fingerprint that every body of one response repeats; `n`
    is the request's choices per prompt (a response's rows are prompt-major)."""

    def __init__(self, kind: Literal["chat", "text"], model: str, fingerprint: str, n: int = 1, tokenizer=None):
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model, self.fingerprint, self.n, self.tokenizer = model, fingerprint, n, tokenizer

    def _body(self, object_name: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }

    def completion(self, choices: list[Choice]) -> dict:
        """The whole response of a non-streaming request, from each row's result, deltas and finish reason."""
        if self.kind == "chat":
            body = self._body(
                "chat.completion",
                [
                    {
                        "index": i,
                        "message": merged_message(deltas),
                        "finish_reason": finish,
                        "logprobs": self._logprobs(result),
                    }
                    for i, (result, deltas, finish) in enumerate(choices)
                ],
            )
        else:
            body = self._body(
                "text_completion",
                [
                    {"index": i, "text": result.text, "finish_reason": finish, "logprobs": self._logprobs(result)}
                    for i, (result, _, finish) in enumerate(choices)
                ],
            )
        results = [result for result, _, _ in choices]
        return {**body, "usage": self.usage(results), "promptdistill": self.stats(results)}

    def _logprobs(self, result: GenerationResult) -> dict | None:
        """OpenAI's `logprobs` of a choice, in the chat or the completions shape, from the result's
        `token_logprobs` (special tokens such as the end of sequence left out, as OpenAI leaves them out)."""
        if result.token_logprobs is None:
            return None
        special = set(self.tokenizer.all_special_ids)
        tokens = [entry for entry in result.token_logprobs if entry.token not in special]
        texts = {
            token: self.tokenizer.decode([token])
            for entry in tokens
            for token in (entry.token, *(top for top, _ in entry.top))
        }
        if self.kind == "chat":
            return {
                "content": [
                    {
                        **_chat_logprob(texts, entry.token, entry.logprob),
                        "top_logprobs": [_chat_logprob(texts, *top) for top in entry.top],
                    }
                    for entry in tokens
                ],
                "refusal": None,
            }
        offsets = itertools.accumulate((len(texts[entry.token]) for entry in tokens), initial=0)
        return {
            "tokens": [texts[entry.token] for entry in tokens],
            "token_logprobs": [entry.logprob for entry in tokens],
            "top_logprobs": [{texts[token]: logprob for token, logprob in entry.top} for entry in tokens],
            "text_offset": list(offsets)[:-1],
        }

    def stats(self, results: list[GenerationResult]) -> dict | list[dict]:
        """The PromptDistill statistics: of the prompt, or one entry per prompt of a list of prompts."""
        stats = [reported_stats(result) for result in results[:: self.n]]
        return stats[0] if len(stats) == 1 else stats

    def usage(self, results: list[GenerationResult]) -> dict:
        """OpenAI's usage: the rows' `GenerationResult.usage` summed, each prompt counted once whatever its `n`."""
        usages = [result.usage() for result in results]
        prompt = sum(usage["prompt_tokens"] for usage in usages[:: self.n])
        completion = sum(usage["completion_tokens"] for usage in usages)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk(
        self,
        delta: dict | None = None,
        *,
        index: int = 0,
        first: bool = False,
        result: GenerationResult | None = None,
        finish_reason: str | None = None,
        with_usage: bool = False,
    ) -> dict:
        """One streamed chunk of choice `index`: a delta (an `Output`'s; the role with the `first`), or (with
        `result`) the one with its finish reason and PromptDistill statistics. With `with_usage`, every chunk
        carries `"usage": null`, as OpenAI's do."""
        delta = delta or {}
        if self.kind == "chat":
            if first:
                delta = {"role": "assistant", **delta}
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            body = self._body("chat.completion.chunk", [choice])
        else:
            choice = {
                "index": index,
                "text": delta.get("content", ""),
                "finish_reason": finish_reason,
                "logprobs": None,
            }
            body = self._body("text_completion", [choice])
        if result is not None:
            body["promptdistill"] = reported_stats(result)
        if with_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, results: list[GenerationResult]) -> dict:
        """The last chunk of a stream that asked for `stream_options: {"include_usage": true}`."""
        object_name = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._body(object_name, []), "usage": self.usage(results)}
