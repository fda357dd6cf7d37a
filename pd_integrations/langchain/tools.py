"""Tool calling and structured output for `ChatPromptDistill`: LangChain's tool and schema objects as OpenAI tool
dicts, tool calls parsed into `AIMessage` fields and streamed as `ToolCallChunk`s, and parsers that refuse cut-off
output. Checking options, building grammars and rendering tools into the prompt are `pd_integrations.tools`'s,
shared with pd-serve.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import BaseMessage, ToolCallChunk
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import Generation
from langchain_core.utils.function_calling import convert_to_openai_tool

from .. import tools as core
from ..constraints import parse_tool_calls, tool_finish_reason


def openai_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """`tools` (BaseTools, functions, Pydantic models, TypedDicts, OpenAI tool dicts) as OpenAI tool dicts.
    Raises `ValueError` naming the tool that cannot be converted or whose parameters are not an object schema."""
    converted = []
    for index, tool in enumerate(tools):
        name = getattr(tool, "name", None) or getattr(tool, "__name__", None) or f"tools[{index}]"
        try:
            converted.append(convert_to_openai_tool(tool))
        except Exception as error:  # noqa: BLE001 - convert_to_openai_tool raises whatever its input's type does
            raise ValueError(f"tools[{index}] (tool {name!r}) cannot be converted to a tool schema: {error}") from None
    return core.check_tools(converted)


def message_fields(text: str, finish_reason: str) -> tuple[dict[str, Any], str]:
    """`AIMessage` fields of output generated with tools bound: the text outside calls as `content`, the calls as
    `tool_calls`, calls cut off (at max_tokens) as `invalid_tool_calls` with their name and arguments so far;
    and the finish reason ("tool_calls" when the output ends with a complete call, see
    `pd_integrations.constraints.tool_finish_reason`)."""
    parsed = parse_tool_calls(text, cut_off=finish_reason == "length")
    fields = {
        "content": parsed.text,
        "tool_calls": [tool_call(name=name, args=args, id=id_) for id_, name, args in parsed.calls],
        "invalid_tool_calls": [
            invalid_tool_call(name=name, args=raw, id=id_, error=error) for id_, name, raw, error in parsed.invalid
        ],
    }
    return fields, tool_finish_reason(finish_reason, len(parsed.calls), parsed.ends_with_call)


class ToolCallStream:
    """Streamed output as text deltas and `ToolCallChunk`s (`pd_integrations.tools.ToolCallStream`'s deltas in
    LangChain's shape): a call's first chunk (name, id, index), then its arguments' JSON in fragments. A call cut
    off before its name was complete is a chunk without a name or arguments, which LangChain makes an invalid
    tool call; one cut off inside its arguments merges to their partial JSON, which LangChain parses leniently,
    so the last chunk's finish reason ("length") is what says it was cut off."""

    def __init__(self):
        self._calls = core.ToolCallStream()

    def feed(self, delta: str) -> list[str | ToolCallChunk]:
        return [_chunk(piece) for piece in self._calls.feed(delta)]

    def close(self, finish_reason: str) -> list[str | ToolCallChunk]:
        """The chunks held back until the output ended with `finish_reason`."""
        return [_chunk(piece) for piece in self._calls.close(cut_off=finish_reason == "length")]

    def finish_reason(self, finish_reason: str) -> str:
        """The finish reason once the output has ended (see `message_fields`)."""
        return tool_finish_reason(finish_reason, self._calls.calls, self._calls.ends_with_call)


def _chunk(piece: str | core.CallDelta) -> str | ToolCallChunk:
    if isinstance(piece, str):
        return piece
    return tool_call_chunk(name=piece.name, args=piece.arguments, id=piece.id, index=piece.index)


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
            "complete; raise max_tokens",
            llm_output=text,
        )


class CompleteJsonParser(_RefusesCutOffOutput, JsonOutputParser):
    """`JsonOutputParser` that refuses output cut off at max_tokens."""


class CompletePydanticParser(_RefusesCutOffOutput, PydanticOutputParser):
    """`PydanticOutputParser` that refuses output cut off at max_tokens."""


class CompleteJsonToolParser(_RefusesCutOffOutput, JsonOutputKeyToolsParser):
    """`JsonOutputKeyToolsParser` that refuses output cut off at max_tokens."""


class CompletePydanticToolsParser(_RefusesCutOffOutput, PydanticToolsParser):
    """`PydanticToolsParser` that refuses output cut off at max_tokens."""
