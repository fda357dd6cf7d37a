"""OpenAI's wire format, as far as pd-serve speaks it: request models (validated by FastAPI) and the response,
chunk and error bodies.

Requests ignore fields they do not know, as OpenAI-compatible servers do, because every client sends a few of its
own; fields whose meaning the server cannot honour are refused by `ChatCompletionRequest.unsupported` instead of
being dropped silently. Value ranges (temperature, top_p, ...) are the engine's to check: it names the parameter.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..constraints import tool_finish_reason
from ..results import GenerationResult
from ..tools import CallDelta, ToolCallStream

# The statistics each response reports under "promptdistill"; the kept character spans and the rendered prompt
# are left out because they grow with the prompt.
REPORTED_STATS = ("prompt_tokens", "kept_tokens", "kept_ratio", "prefill_seconds", "selection_layers", "method",
                  "context_source", "protected_tokens", "prunable_tokens", "kept_prunable_tokens",
                  "document_retention", "tool_format")


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
                return (f"tool_calls[{j}].function.arguments", f"tool_calls[{j}].function.arguments must be a JSON "
                        f"object as a string, got {call.function.arguments!r:.100}")
        return None

    def as_engine_message(self) -> dict:
        """The engine's chat message: text parts joined, OpenAI's "developer" role as "system", earlier calls with
        their arguments parsed (chat templates serialise them), a tool's result with its call's id."""
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": json.loads(call.function.arguments)}}
                for call in self.tool_calls]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        return message


def _json_object(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


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

    def invalid(self) -> tuple[str, str] | None:
        """(param, message) for the first field whose value the engine cannot take and would not name, else
        None."""
        return None

    def output_options(self) -> dict:
        """The arguments of `pd_integrations.tools.output_grammar`: none, free text."""
        return {}

    def output(self) -> Output:
        """How the response reports what the model generates."""
        return Output(with_tools=False)

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
    # Checked by pd_integrations.tools.output_grammar, whose errors name the field.
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # unset: one call per turn (OpenAI: several; small models repeat one)
    response_format: dict | None = None

    def invalid(self) -> tuple[str, str] | None:
        for i, message in enumerate(self.messages):
            if (refused := message.invalid()) is not None:
                return f"messages[{i}].{refused[0]}", f"messages[{i}].{refused[1]}"
        return super().invalid()

    @property
    def calls_tools(self) -> bool:
        """Whether tools are offered to the model (given, and tool_choice is not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def output_options(self) -> dict:
        return {"tools": self.tools, "tool_choice": self.tool_choice, "parallel_tool_calls": self.parallel_tool_calls,
                "response_format": self.response_format}

    def output(self) -> Output:
        return Output(with_tools=self.calls_tools)

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def sampling(self) -> dict:
        sampling = super().sampling()
        if self.max_completion_tokens is not None:  # OpenAI's newer name wins, as in its API
            sampling["max_new_tokens"] = self.max_completion_tokens
        return sampling

    def engine_input(self) -> dict:
        return {"messages": [message.as_engine_message() for message in self.messages],
                "tools": self.tools if self.calls_tools else None}


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

    def close(self) -> list[dict]:
        """The deltas held back until the output ended."""
        return [] if self._calls is None else _deltas(self._calls.close())

    def finish_reason(self, result: GenerationResult) -> str:
        """"tool_calls" when the output ends with a complete call (see `tool_finish_reason`); else the engine's
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
        return {"tool_calls": [{"index": piece.index, "id": piece.id, "type": "function",
                                "function": {"name": piece.name, "arguments": piece.arguments}}]}
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

    def completion(self, result: GenerationResult, deltas: list[dict], finish_reason: str) -> dict:
        """The whole response of a non-streaming request, from its `Output`'s deltas and finish reason."""
        if self.kind == "chat":
            choice = {"index": 0, "message": merged_message(deltas), "finish_reason": finish_reason,
                      "logprobs": None}
            body = self._body("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": finish_reason, "logprobs": None}
            body = self._body("text_completion", [choice])
        return {**body, "usage": usage(result), "promptdistill": reported_stats(result)}

    def chunk(self, delta: dict | None = None, *, first: bool = False, result: GenerationResult | None = None,
              finish_reason: str | None = None, with_usage: bool = False) -> dict:
        """One streamed chunk: a delta (an `Output`'s), or (with `result`) the final one with the finish reason
        and the PromptDistill statistics. With `with_usage`, every chunk carries `"usage": null`, as OpenAI's
        do."""
        delta = delta or {}
        if self.kind == "chat":
            if first:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            body = self._body("chat.completion.chunk", [choice])
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish_reason, "logprobs": None}
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
