"""`ChatPromptDistill`: a LangChain chat model whose prefill prunes retrieved context inside the model."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from ..call_options import OutputOptions
from ..tools import check_tool_choice
from ._common import PromptDistillSettings, usage_metadata
from .prompts import tagged_inputs
from .tools import (
    CompleteJsonParser,
    CompleteJsonToolParser,
    CompletePydanticParser,
    CompletePydanticToolsParser,
    ToolCallStream,
    message_fields,
    openai_tools,
)

STRUCTURED_OUTPUT_METHODS = ("json_schema", "function_calling", "json_mode")


class ChatPromptDistill(PromptDistillSettings, BaseChatModel):
    """A Hugging Face chat model run through PromptDistill: the question's attention prunes the retrieved context
    during prefill, so time to first token and KV cache shrink on long RAG prompts. See docs/design.md.

    Args:
        model: embedded default model, local directory or hub id; `device`, `dtype`, `quantization` load it.
        config: a `PromptDistillConfig`; each of its fields is also an argument of its own, overriding it.
        temperature, max_tokens, top_p, top_k, seed, stop: sampling defaults, each overridable per call.
        tool_format: how tools reach the model: "auto", "template" or "builtin".

    Raises:
        TypeError: an unknown argument, to the constructor or a call, naming the closest valid name.
    """

    tool_format: Literal["auto", "template", "builtin"] = "auto"
    """How bound tools, tool calls and `ToolMessage`s reach the model: "template" renders them through the model's
    chat template (`tools=`; templates that write the Hermes `<tool_call>` format, such as Qwen2.5's), "builtin"
    writes that format as text for any template, "auto" uses the template when it can (see
    `pd_integrations.tools`). "template" with a template that has no tools support raises `ValueError`."""

    @property
    def _llm_type(self) -> str:
        return "promptdistill-chat"

    # ---------------------------------------------------------------- tools and structured output

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind `tools` (BaseTools, functions, Pydantic models, TypedDicts or OpenAI tool dicts): their signatures
        reach the model through its chat template or the built-in format (`tool_format`) and calls come back in
        `AIMessage.tool_calls` (`tool_call_chunks` when streaming).

        `tool_choice`: "auto" (default) lets the model answer in text or call a tool, every call constrained to a
        valid call of a bound tool; "any"/"required" (or True with one tool) forces a call of one of them; a
        tool's name forces a call of that tool; "none" hides the tools. `parallel_tool_calls`: allow several
        calls per turn (off: the output ends after the first call). Raises `ValueError` naming a tool that cannot
        be converted or an unknown `tool_choice`; a schema the grammar compiler cannot handle raises
        `ValueError` naming its tool on the first call, before any model work.
        """
        formatted = openai_tools(tools)
        choice = check_tool_choice(tool_choice, [tool["function"]["name"] for tool in formatted])
        return super().bind(tools=formatted, tool_choice=choice, parallel_tool_calls=parallel_tool_calls, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """A runnable returning `schema` (a Pydantic class, a TypedDict, a JSON schema or an OpenAI tool dict) as
        a Pydantic object (Pydantic classes) or a dict, generated under a grammar so that it always parses.

        `method`: "json_schema" (default) constrains the reply to the schema; "function_calling" forces a call of
        a tool with the schema's parameters; "json_mode" constrains the reply to a JSON object of any shape (the
        prompt must describe the keys; `schema` then only validates). `include_raw=True` returns
        `{"raw": AIMessage, "parsed": ..., "parsing_error": ...}` instead of raising. Output cut off at
        `max_tokens` raises `OutputParserException` saying so. `strict` is accepted for compatibility: the grammar
        always enforces the schema strictly.
        """
        if kwargs:
            raise ValueError(f"with_structured_output got unexpected arguments {sorted(kwargs)}")
        if method not in STRUCTURED_OUTPUT_METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, STRUCTURED_OUTPUT_METHODS))}, got {method!r}")
        if schema is None and method != "json_mode":
            raise ValueError(f"schema is required for method={method!r} (only json_mode takes none)")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        # What LangChain's tracing records of the call (BaseChatModel takes it out of the call's options).
        traced = (
            {"ls_structured_output_format": {"kwargs": {"method": method}, "schema": schema}}
            if schema is not None
            else {}
        )
        if method == "function_calling":
            llm, parser = self._forced_tool_call(schema, is_pydantic, traced)
        else:
            llm = self.bind(response_format=_response_format(schema, method), **traced)
            parser = CompletePydanticParser(pydantic_object=schema) if is_pydantic else CompleteJsonParser()
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([unparsed], exception_key="parsing_error")

    def _forced_tool_call(self, schema: dict | type, is_pydantic: bool, traced: dict[str, Any]):
        """`with_structured_output`'s "function_calling": (this model forced to call a tool with `schema`'s
        parameters, the parser of that call's arguments)."""
        name = convert_to_openai_tool(schema)["function"]["name"]
        llm = self.bind_tools([schema], tool_choice=name, **traced)
        parser = (
            CompletePydanticToolsParser(tools=[schema], first_tool_only=True)
            if is_pydantic
            else CompleteJsonToolParser(key_name=name, first_tool_only=True)
        )
        return llm, parser

    # ---------------------------------------------------------------- generation

    def _start(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]):
        """Open one call's generation: its bound output options (tools, response_format) become the tools shown
        and the grammar that constrains decoding, the rest are `_prepare_call`'s options. Returns (call, stream,
        whether tools are offered and so the output is parsed for calls)."""
        output = OutputOptions.take(kwargs)
        call = self._prepare_call(stop, kwargs, tagged_inputs(messages))
        stream = call.stream(
            output.grammar(call.engine),
            messages=to_engine_messages(messages),
            tools=output.offered_tools,
            tool_format=self.tool_format,
        )
        return call, stream, bool(output.offered_tools)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call, stream, with_tools = self._start(messages, stop, kwargs)
        for _ in stream:
            pass
        result = stream.result
        metadata = call.response_metadata(result)
        fields = {"content": result.text}
        if with_tools:
            fields, metadata["finish_reason"] = message_fields(result.text, result.finish_reason)
        message = AIMessage(**fields, usage_metadata=usage_metadata(result), response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        call, stream, with_tools = self._start(messages, stop, kwargs)
        splitter = ToolCallStream() if with_tools else None
        for delta in stream:
            for piece in splitter.feed(delta) if splitter else [delta]:
                yield self._chunk(piece, run_manager)
        result = stream.result
        for piece in splitter.close(result.finish_reason) if splitter else []:
            yield self._chunk(piece, run_manager)
        metadata = call.response_metadata(result)
        if splitter:
            metadata["finish_reason"] = splitter.finish_reason(result.finish_reason)
        # Usage and metadata once, on the last chunk, so that summing the chunks counts them once.
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="", usage_metadata=usage_metadata(result), response_metadata=metadata, chunk_position="last"
            )
        )

    @staticmethod
    def _chunk(piece, run_manager: CallbackManagerForLLMRun | None) -> ChatGenerationChunk:
        """A text delta, or a tool call's chunk, as a `ChatGenerationChunk` (callbacks see text deltas)."""
        if not isinstance(piece, str):
            return ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[piece]))
        chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
        if run_manager:
            run_manager.on_llm_new_token(piece, chunk=chunk)
        return chunk


def _response_format(schema: dict | type | None, method: str) -> dict[str, Any]:
    """The OpenAI `response_format` of `with_structured_output`'s "json_schema" or "json_mode" `method`."""
    if method == "json_schema":
        json_schema = convert_to_json_schema(schema)
        return {
            "type": "json_schema",
            "json_schema": {"name": json_schema.get("title", "output"), "schema": json_schema},
        }
    return {"type": "json_object"}


_ROLES = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant", ToolMessage: "tool"}
# Content blocks a message may hold besides text: an AI message's tool calls (rendered from `tool_calls`).
_RENDERED_BLOCKS = {"text", "tool_call"}


def to_engine_messages(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as the engine's chat messages: consecutive same-role messages merged (many chat
    templates require alternating roles), an AI message's tool calls as `tool_calls`, a tool message as a "tool"
    message (its result prefixed "Error: " when it failed); how they are rendered is `pd_integrations.tools`'s.
    Names are dropped; other non-text content raises `ValueError`."""
    converted: list[dict[str, Any]] = []
    for message in messages:
        role = _role(message)
        if role is None:
            raise ValueError(
                f"ChatPromptDistill takes system, human, AI, tool and chat messages, got a {message.type!r} message"
            )
        # An AI message's calls are rendered from `tool_calls`; provider-specific blocks that repeat them
        # (Anthropic's "tool_use", seen as "non_standard") are not content.
        rendered = _RENDERED_BLOCKS | (
            {"non_standard"} if isinstance(message, AIMessage) and message.tool_calls else set()
        )
        other = [block["type"] for block in message.content_blocks if block["type"] not in rendered]
        if other:
            raise ValueError(
                f"ChatPromptDistill takes text content only, got {other[0]!r} content in a {message.type!r} message"
            )
        if isinstance(message, ToolMessage):
            error = "Error: " if message.status == "error" else ""
            converted.append({"role": "tool", "content": error + message.text, "tool_call_id": message.tool_call_id})
        elif isinstance(message, AIMessage) and message.tool_calls:
            converted.append(
                {
                    "role": "assistant",
                    "content": message.text,
                    "tool_calls": [
                        {
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["name"], "arguments": call["args"]},
                        }
                        for call in message.tool_calls
                    ],
                }
            )
        elif converted and converted[-1]["role"] == role and set(converted[-1]) == {"role", "content"}:
            converted[-1]["content"] = "\n\n".join(filter(None, [converted[-1]["content"], message.text]))
        else:
            converted.append({"role": role, "content": message.text})
    return converted


def _role(message: BaseMessage) -> str | None:
    if isinstance(message, ChatMessage):
        return message.role
    return next((role for cls, role in _ROLES.items() if isinstance(message, cls)), None)
