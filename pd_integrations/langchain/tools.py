"""Tool calling and structured output for `ChatPromptDistill`: LangChain's tool and schema objects as grammars,
tool calls rendered into and parsed out of the `<tool_call>` text format, and parsers that refuse cut-off output.

Rendering: every model gets the Hermes/Qwen2.5 format as text, the same text Qwen2.5's own template produces
from `tools=`: the tools' signatures in the system message, each earlier call as a `<tool_call>` block in its
assistant turn, each result as a `<tool_response>` block in a user turn. The engine renders `messages` without
`tools=`, so templates that take tools (and templates that have none, like the default SmolLM2's) all go through
this one documented format; the grammar guarantees the call's syntax whatever the model was trained on.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, BaseMessage, ToolCallChunk, ToolMessage
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import Generation
from langchain_core.utils.function_calling import convert_to_openai_tool

from ..constraints import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    Grammar,
    Grammars,
    ToolSpec,
    new_tool_call_id,
    parse_tool_calls,
)

# tool_choice values besides a tool's name: "auto" lets the model choose between text and calls, "none" hides
# the tools, "any"/"required" (and True, LangChain's "the one bound tool") force a call.
TOOL_CHOICES = ("auto", "none", "any", "required")
RESPONSE_FORMATS = ('{"type": "json_object"}', '{"type": "json_schema", "json_schema": {"schema": {...}}}')
# The options bind_tools and with_structured_output bind, taken from a call's kwargs before the others.
OUTPUT_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")

_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{signatures}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def openai_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """`tools` (BaseTools, functions, Pydantic models, TypedDicts, OpenAI tool dicts) as OpenAI tool dicts.
    Raises `ValueError` naming the tool that cannot be converted or whose parameters are not an object schema."""
    converted = []
    for index, tool in enumerate(tools):
        name = getattr(tool, "name", None) or getattr(tool, "__name__", None) or f"tools[{index}]"
        try:
            openai_tool = convert_to_openai_tool(tool)
        except Exception as error:  # noqa: BLE001 - convert_to_openai_tool raises whatever its input's type does
            raise ValueError(f"tool {name!r} cannot be converted to a tool schema: {error}") from None
        parameters = openai_tool["function"].get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ValueError(f"tool {openai_tool['function']['name']!r} has parameters that are not a JSON object "
                             f"schema: {parameters!r}")
        converted.append(openai_tool)
    return converted


def check_tool_choice(tool_choice: Any, names: Sequence[str]) -> str:
    """`tool_choice` as "auto", "none", "required" or a bound tool's name. Accepts None ("auto"), "any", True (the
    one bound tool), a name, and `{"type": "function", "function": {"name": ...}}`; raises `ValueError` naming
    the value and the allowed ones."""
    if tool_choice is None:
        return "auto"
    if tool_choice is True and len(names) == 1:
        return names[0]
    if isinstance(tool_choice, dict):
        tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if tool_choice == "any":
        return "required"
    if isinstance(tool_choice, str) and (tool_choice in TOOL_CHOICES or tool_choice in names):
        return tool_choice
    raise ValueError(f"tool_choice must be one of {', '.join(map(repr, TOOL_CHOICES))}, True (with one tool), or "
                     f"a bound tool's name ({', '.join(map(repr, names))}), got {tool_choice!r}")


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The tools' signatures and the call format, as Qwen2.5's template writes them into the system message."""
    return _TOOLS_PROMPT.format(signatures="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))


def render_tool_calls(message: AIMessage) -> str:
    """An AI message's text followed by its tool calls, each as a `<tool_call>` block."""
    blocks = [f'{TOOL_CALL_BEGIN}\n{json.dumps({"name": call["name"], "arguments": call["args"]}, ensure_ascii=False)}'
              f"\n{TOOL_CALL_END}" for call in message.tool_calls]
    return "\n".join(filter(None, [message.text, *blocks]))


def render_tool_response(message: ToolMessage) -> str:
    error = "Error: " if message.status == "error" else ""
    return f"<tool_response>\n{error}{message.text}\n</tool_response>"


def output_grammar(engine, options: dict[str, Any]) -> Grammar | None:
    """The grammar for `engine`'s model that a call's bound output options ask for (see `OUTPUT_OPTIONS`), or None
    for free text. Raises `ValueError` naming a bad option, schema or tool before any model work."""
    response_format, tools = options.get("response_format"), options.get("tools")
    if response_format is not None and tools:
        raise ValueError("pass either tools (bind_tools) or response_format, not both")
    if response_format is not None:
        return _response_format_grammar(Grammars.of(engine), response_format)
    if not tools:
        return None
    names = [tool["function"]["name"] for tool in tools]
    choice = check_tool_choice(options.get("tool_choice"), names)
    if choice == "none":
        return None
    chosen = [tool for tool in tools if choice in ("auto", "required") or tool["function"]["name"] == choice]
    specs = [ToolSpec(tool["function"]["name"], tool["function"].get("parameters")
                      or {"type": "object", "properties": {}}) for tool in chosen]
    return Grammars.of(engine).tool_calls(specs, required=choice != "auto",
                                          parallel=bool(options.get("parallel_tool_calls")))


def _response_format_grammar(grammars: Grammars, response_format: Any) -> Grammar:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return grammars.json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            name = spec.get("name")
            return grammars.json_schema(schema, what=f"response_format schema {name!r}" if name else
                                        "response_format schema")
    raise ValueError(f"response_format must be {' or '.join(RESPONSE_FORMATS)}, got {response_format!r}")


def message_fields(text: str) -> dict[str, Any]:
    """`AIMessage` fields of output generated with tools bound: the text outside calls as `content`, the calls as
    `tool_calls`, calls that don't parse (cut off at max_tokens) as `invalid_tool_calls`."""
    parsed = parse_tool_calls(text)
    return {"content": parsed.text,
            "tool_calls": [tool_call(name=name, args=args, id=id_) for id_, name, args in parsed.calls],
            "invalid_tool_calls": [invalid_tool_call(args=raw, id=id_, error=error)
                                   for id_, raw, error in parsed.invalid]}


class ToolCallStream:
    """Splits streamed output into text deltas and `ToolCallChunk`s, as LangChain streams calls: a call's first
    chunk (name, id, index) as soon as its header is complete, then its arguments' JSON in fragments. Text that
    may be the start of `<tool_call>`, and arguments that may be the end of the call, are held back until known."""

    def __init__(self):
        self._buffer = ""
        self._state = "text"  # "text", "header" (inside <tool_call>, before the arguments) or "arguments"
        self._index = -1
        self._after_call = False

    def feed(self, delta: str) -> list[str | ToolCallChunk]:
        self._buffer += delta
        out: list[str | ToolCallChunk] = []
        while self._step(out):
            pass
        return [piece for piece in out if piece]

    def close(self) -> list[str | ToolCallChunk]:
        """What is left once the output has ended: held-back text, or a call cut off at max_tokens (its partial
        arguments; LangChain parses partial JSON, and finish_reason "length" says the call is incomplete)."""
        rest, self._buffer = self._buffer, ""
        if self._state == "text":
            return [rest] if rest else []
        if self._state == "header":  # no complete name: LangChain makes it an invalid tool call
            return [tool_call_chunk(name=None, args=rest.strip(), id=new_tool_call_id(), index=self._index + 1)]
        return [tool_call_chunk(args=rest, index=self._index)] if rest else []

    def _step(self, out: list) -> bool:
        """Consume what the buffer allows in the current state; whether the state changed (step again)."""
        if self._state == "text":
            if self._after_call:  # the newline that separates calls is not text
                self._buffer = self._buffer.lstrip("\n")
                self._after_call = not self._buffer
            start = self._buffer.find(TOOL_CALL_BEGIN)
            if start >= 0:
                out.append(self._buffer[:start])
                self._buffer, self._state = self._buffer[start + len(TOOL_CALL_BEGIN):], "header"
                return True
            held = next((k for k in range(min(len(TOOL_CALL_BEGIN) - 1, len(self._buffer)), 0, -1)
                         if self._buffer.endswith(TOOL_CALL_BEGIN[:k])), 0)
            out.append(self._buffer[: len(self._buffer) - held])
            self._buffer = self._buffer[len(self._buffer) - held:]
            return False
        if self._state == "header":
            header = _CALL_HEADER.match(self._buffer)
            if header is None:
                return False
            self._index += 1
            out.append(tool_call_chunk(name=json.loads(header.group(1)), args="", id=new_tool_call_id(),
                                       index=self._index))
            self._buffer, self._state = self._buffer[header.end():], "arguments"
            return True
        end = _CALL_END.search(self._buffer)
        if end is not None:
            out.append(tool_call_chunk(args=self._buffer[: end.start()], index=self._index))
            self._buffer, self._state, self._after_call = self._buffer[end.end():], "text", True
            return True
        cut = max(0, len(self._buffer) - _CALL_END_LENGTH)
        out.append(tool_call_chunk(args=self._buffer[:cut], index=self._index) if cut else "")
        self._buffer = self._buffer[cut:]
        return False


# What the tool-call grammar writes around a call's arguments (see `Grammars.tool_calls`).
_CALL_HEADER = re.compile(r'\s*\{"name":\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments":\s*')
_CALL_END = re.compile(r"\s*\}\s*" + re.escape(TOOL_CALL_END))
_CALL_END_LENGTH = len("}\n" + TOOL_CALL_END) + 2  # and the whitespace the grammar allows around them


class _RefusesCutOffOutput:
    """Mixed into LangChain's output parsers: output that ended at max_tokens (finish_reason "length") cannot be
    complete under a grammar, so parsing it, or the end of its stream, raises rather than returning a partial
    object, None or nothing."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        message = getattr(result[0], "message", None) if result else None
        if not partial and message is not None:
            _raise_if_cut_off(message.response_metadata, result[0].text)
        return super().parse_result(result, partial=partial)

    def _transform(self, input: Iterator[str | BaseMessage]) -> Iterator[Any]:
        metadata: dict[str, Any] = {}
        yield from super()._transform(_recording_metadata(input, metadata))
        _raise_if_cut_off(metadata, "")

    async def _atransform(self, input: AsyncIterator[str | BaseMessage]) -> AsyncIterator[Any]:
        metadata: dict[str, Any] = {}

        async def recording() -> AsyncIterator[str | BaseMessage]:
            async for chunk in input:
                if isinstance(chunk, BaseMessage):
                    metadata.update(chunk.response_metadata)
                yield chunk

        async for parsed in super()._atransform(recording()):
            yield parsed
        _raise_if_cut_off(metadata, "")


def _recording_metadata(chunks: Iterator[str | BaseMessage], metadata: dict[str, Any]) -> Iterator:
    for chunk in chunks:
        if isinstance(chunk, BaseMessage):
            metadata.update(chunk.response_metadata)
        yield chunk


def _raise_if_cut_off(metadata: dict[str, Any], text: str) -> None:
    if metadata.get("finish_reason") == "length":
        raise OutputParserException(
            "the structured output was cut off at max_tokens (finish_reason='length') before the schema was "
            "complete; raise max_tokens", llm_output=text)


class CompleteJsonParser(_RefusesCutOffOutput, JsonOutputParser):
    """`JsonOutputParser` that refuses output cut off at max_tokens."""


class CompletePydanticParser(_RefusesCutOffOutput, PydanticOutputParser):
    """`PydanticOutputParser` that refuses output cut off at max_tokens."""


class CompleteJsonToolParser(_RefusesCutOffOutput, JsonOutputKeyToolsParser):
    """`JsonOutputKeyToolsParser` that refuses output cut off at max_tokens."""


class CompletePydanticToolsParser(_RefusesCutOffOutput, PydanticToolsParser):
    """`PydanticToolsParser` that refuses output cut off at max_tokens."""
