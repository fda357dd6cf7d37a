"""`PromptDistillLLM`: a LlamaIndex `CustomLLM` over the shared PromptDistill engine.

Query engines render a prompt template (context plus question) and call `predict`/`stream`; this class takes the
template's `query_str` from there and hands it to the engine as the question that seeds selection, so retrieved
context is pruned by what the user asked rather than by whatever ends the prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import BaseModel, Field, ValidationError, model_validator
from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.llms.utils import parse_partial_json
from llama_index.core.program.utils import FlexibleModel, create_flexible_model
from llama_index.core.prompts import BasePromptTemplate, ChatPromptTemplate

from ..adapter_settings import CONFIG_SHORTCUTS, sampling_settings
from ..call_options import CallOptions
from ..config import PromptDistillConfig
from ..constraints import Grammars
from ..engine import GenerationResult, GenerationStream, PromptDistillEngine
from ..inputs import SAMPLING_SETTINGS as SAMPLING_FIELDS
from ..loading import DEFAULT_MODEL, check_load_settings

# The question and retrieved context of the prompt template being predicted in this thread or task. `predict`
# sets them around the base class's `predict`, which calls `complete`/`chat` in the same context; a context
# variable (not an attribute) keeps concurrent calls on one instance apart.
_template_inputs: ContextVar[dict | None] = ContextVar("pd_integrations_template_inputs", default=None)
# Template variables that hold retrieved context: text-QA and tree-summarize use context_str, refine context_msg.
CONTEXT_VARIABLES = ("context_str", "context_msg")
# LlamaIndex joins retrieved nodes' texts with a blank line.
NODE_SEPARATOR = "\n\n"

# The sampling settings, by `SamplingParams`' names: every one but `logprobs`, which LlamaIndex's LLM interface has
# no setting for (only its OpenAI client's own) and this class does not report; passing it is an unknown argument.
SAMPLING_SETTINGS = {name: name for name in SAMPLING_FIELDS if name != "logprobs"}
# Per-call keyword arguments of complete/chat and their streaming and async forms (`pd_query` and `pd_documents`
# as in the LangChain classes); the others, `PromptDistillConfig` fields included, override this instance's
# settings for that call.
CALL_OPTIONS = ("pd_query", "pd_documents", *SAMPLING_SETTINGS, "max_tokens", *CONFIG_SHORTCUTS)
# What LlamaIndex's own text-completion program appends to a prompt: the constraint forces the keys and types, the
# schema's descriptions tell the model what each value means.
SCHEMA_INSTRUCTION = (
    "\n\nHere's a JSON schema to follow:\n{schema}\n\nOutput a valid JSON object but do not repeat the schema."
)
Model = TypeVar("Model", bound=BaseModel)


class PromptDistillLLM(sampling_settings(SAMPLING_SETTINGS), CustomLLM):
    """A local Hugging Face model that prunes the retrieved context inside itself during prefill. See
    docs/design.md.

    Args:
        model: embedded default model, local directory or hub id; `device`, `dtype`, `quantization` load it.
        config: a `PromptDistillConfig`; each of its fields is also an argument of its own, overriding it.
        max_new_tokens, temperature, top_p, top_k, seed, stop, frequency_penalty, presence_penalty,
            repetition_penalty, logit_bias: sampling defaults (`SamplingParams`' fields), each overridable per call.
        use_chat_template: render prompts and messages through the tokenizer's chat template (default True).

    Raises:
        TypeError: an unknown argument, to the constructor or a call, naming the closest valid name.
    """

    ALIASES = {"max_tokens": "max_new_tokens", "model_name": "model"}
    CALL_OPTIONS = CALL_OPTIONS
    CALL_HINT = "a per-call option: complete/chat(..., {name}=...)"
    # `to_dict()` writes the class name; constructing from that dict must work.
    EXTRA_ARGUMENTS = ("class_name",)

    model: str = Field(default=DEFAULT_MODEL, description="Embedded default model, local directory or hub id.")
    # `max_new_tokens` (max_tokens, the LangChain/OpenAI name, is accepted too) and the other sampling settings come
    # from `SamplingParams` through `sampling_settings`.
    context_window: int | None = Field(
        default=None,
        gt=0,
        description="Tokens LlamaIndex may pack into a prompt; default the model's raw (pre-pruning) window.",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps.")
    dtype: str = Field(default="auto", description="auto, float32, bfloat16 or float16.")
    quantization: str | None = Field(default=None, description="None, 4bit or 8bit (bitsandbytes).")
    is_chat_model: bool = Field(
        default=False, description="Let LlamaIndex send chat messages (chat prompt templates) instead of text."
    )
    use_chat_template: bool = Field(
        default=True, description="Render prompts through the tokenizer's chat template (see the class docstring)."
    )

    @model_validator(mode="after")
    def _check_settings(self) -> PromptDistillLLM:
        # Errors surface at construction, naming the parameter; the fit to the model (layer ranges) is checked
        # when the weights load.
        self.distill_config()
        check_load_settings(self.device, self.dtype, self.quantization)
        return self

    @classmethod
    def class_name(cls) -> str:
        return "PromptDistillLLM"

    @property
    def engine(self) -> PromptDistillEngine:
        """The engine over the shared weights with this instance's settings (loads the weights on first use)."""
        return self._engine(self.distill_config())

    def _engine(self, config: PromptDistillConfig | None) -> PromptDistillEngine:
        # Cheap after the first call: the weights load once per process and load settings (`Runtime.load`).
        return PromptDistillEngine.from_pretrained(
            self.model, config, device=self.device, dtype=self.dtype, quantization=self.quantization
        )

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window or self.engine.arch.max_positions,
            num_output=self.max_new_tokens,
            model_name=self.model,
            # A chat prompt template being predicted goes to `chat`, whose messages the chat template renders
            # (LlamaIndex would flatten them into "system: ... user: ..." text for a completion model).
            is_chat_model=self.is_chat_model
            or (self.use_chat_template and (_template_inputs.get() or {}).get("chat", False)),
        )

    # ---------------------------------------------------------------- the query channel

    def predict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        with _query_of(prompt, prompt_args):
            return super().predict(prompt, **prompt_args)

    def stream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> Iterator[str]:
        # The base class opens the generation (and so reads the query) before it returns the token stream.
        with _query_of(prompt, prompt_args):
            return super().stream(prompt, **prompt_args)

    async def apredict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        with _query_of(prompt, prompt_args):
            return await super().apredict(prompt, **prompt_args)

    async def astream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> AsyncIterator[str]:
        with _query_of(prompt, prompt_args):
            return await super().astream(prompt, **prompt_args)

    # ---------------------------------------------------------------- completion

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _completion_response(*self._generate(self._completion_input(prompt, formatted), self._options(kwargs)))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        stream = self._open(self._completion_input(prompt, formatted), self._options(kwargs))
        return (_completion_response(*chunk) for chunk in _chunks(stream))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        model_input, options = self._completion_input(prompt, formatted), self._options(kwargs)
        return _completion_response(*await asyncio.to_thread(self._generate, model_input, options))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        stream = await self._aopen(self._completion_input(prompt, formatted), self._options(kwargs))
        return _amap(_completion_response, _chunks(stream))

    # ---------------------------------------------------------------- chat

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _chat_response(*self._generate(self._chat_input(messages), self._options(kwargs)))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        stream = self._open(self._chat_input(messages), self._options(kwargs))
        return (_chat_response(*chunk) for chunk in _chunks(stream))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        model_input, options = self._chat_input(messages), self._options(kwargs)
        return _chat_response(*await asyncio.to_thread(self._generate, model_input, options))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        stream = await self._aopen(self._chat_input(messages), self._options(kwargs))
        return _amap(_chat_response, _chunks(stream))

    # ---------------------------------------------------------------- structured output

    def structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """An `output_cls` object generated under a grammar compiled from its JSON schema, so the reply parses
        every time (`as_structured_llm` and query engines with `output_cls=` come here). The prompt is rendered as
        `predict` renders it, with the schema appended as LlamaIndex's text-completion program does; its
        `query_str` and context seed and bound pruning as in `predict`. `llm_kwargs` are per-call options.
        Raises `ValueError` for a schema the grammar compiler cannot handle (before any model work) and for output
        cut off at `max_new_tokens` (finish_reason "length")."""
        stream = self._recorded(self._open_structured(output_cls, prompt, llm_kwargs, prompt_args))
        for _ in stream:
            pass
        return _structured_object(output_cls, stream.result)

    async def astructured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """`structured_predict` in a worker thread."""
        return await asyncio.to_thread(self.structured_predict, output_cls, prompt, llm_kwargs, **prompt_args)

    def stream_structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Iterator[Model | FlexibleModel]:
        """`structured_predict` as it is generated: a partial object (a `FlexibleModel` of the fields so far) per
        text delta that adds to it, then the complete `output_cls` object."""
        return _structured_objects(
            output_cls, self._recorded(self._open_structured(output_cls, prompt, llm_kwargs, prompt_args))
        )

    async def astream_structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> AsyncIterator[Model | FlexibleModel]:
        """`stream_structured_predict`, each step in a worker thread."""
        stream = self._recorded(
            await asyncio.to_thread(self._open_structured, output_cls, prompt, llm_kwargs, prompt_args)
        )

        async def objects() -> AsyncIterator[Model | FlexibleModel]:
            iterator, end = _structured_objects(output_cls, stream), object()
            while (item := await asyncio.to_thread(next, iterator, end)) is not end:
                yield item

        return objects()

    def _open_structured(
        self,
        output_cls: type[BaseModel],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None,
        prompt_args: dict,
    ) -> GenerationStream:
        schema = output_cls.model_json_schema()
        grammar = Grammars.of(self.engine).json_schema(schema, what=f"output_cls {output_cls.__name__}")
        instruction = SCHEMA_INSTRUCTION.format(schema=json.dumps(schema))
        with _query_of(prompt, prompt_args):
            call = self._options(llm_kwargs or {})
            if self.metadata.is_chat_model:
                messages = prompt.format_messages(llm=self, **prompt_args)
                last = messages[-1]
                messages[-1] = ChatMessage(role=last.role, content=(last.content or "") + instruction)
                model_input = self._chat_input(messages)
            else:
                model_input = self._completion_input(prompt.format(llm=self, **prompt_args) + instruction, False)
        return self._open(model_input, call, grammar)

    def _recorded(self, stream: GenerationStream) -> GenerationStream:
        """`stream` reported to the callback manager as an LLM event that ends with its response, as `complete`
        reports itself, so that `PromptDistillStatsHandler` and `TokenCountingHandler` see structured calls too
        (they do not go through `complete`/`chat`)."""
        event_id = self.callback_manager.on_event_start(CBEventType.LLM, payload={})

        def report(result: GenerationResult) -> GenerationResult:
            response = _completion_response(result.text, None, result)
            self.callback_manager.on_event_end(
                CBEventType.LLM,
                event_id=event_id,
                payload={EventPayload.PROMPT: result.prompt_text or "", EventPayload.COMPLETION: response},
            )
            return result

        return stream.map_result(report)

    # ---------------------------------------------------------------- helpers

    def _options(self, kwargs: dict) -> CallOptions:
        """This instance's settings overridden by per-call `kwargs`, the query from `pd_query` or else from the
        template being predicted (see `DistillSettings.resolve_call`). Raises `TypeError` for unknown arguments,
        `ValueError` for bad values."""
        return self.resolve_call(kwargs, template=_template_inputs.get())

    def _completion_input(self, prompt: str, formatted: bool) -> dict:
        if not formatted:
            prompt = self._extend_prompt(self.completion_to_prompt(prompt))
        if self.use_chat_template:
            return {"messages": [{"role": MessageRole.USER.value, "content": prompt}]}
        return {"prompt": prompt}

    def _chat_input(self, messages: Sequence[ChatMessage]) -> dict:
        if self.use_chat_template:
            return {"messages": [{"role": m.role.value, "content": m.content or ""} for m in messages]}
        return {"prompt": self.messages_to_prompt(messages)}

    def _open(self, model_input: dict, call: CallOptions, constraint: Any = None) -> GenerationStream:
        """Start a generation; arguments are checked (and weights loaded) now, tokens come as it is iterated."""
        return call.stream(self._engine(call.config), call.prompt(**model_input), constraint)

    async def _aopen(self, model_input: dict, call: CallOptions) -> GenerationStream:
        return await asyncio.to_thread(self._open, model_input, call)

    def _generate(self, model_input: dict, call: CallOptions) -> tuple[str, None, GenerationResult]:
        """(text, no delta, result) of a whole generation."""
        stream = self._open(model_input, call)
        for _ in stream:
            pass
        return stream.result.text, None, stream.result


def _structured_object(output_cls: type[Model], result: GenerationResult) -> Model:
    """`output_cls` parsed from a generation's text; `ValueError` when the output was cut off."""
    if result.finish_reason == "length":
        raise ValueError(
            f"the {output_cls.__name__} output was cut off at max_new_tokens ({result.output_tokens} "
            f"tokens, finish_reason='length') before the schema was complete; raise max_new_tokens"
        )
    try:
        return output_cls.model_validate_json(result.text)
    except ValidationError as error:  # the grammar rules this out, short of schema features it cannot enforce
        raise ValueError(f"the output does not validate as {output_cls.__name__}: {error}") from None


def _structured_objects(output_cls: type[Model], stream: GenerationStream) -> Iterator[Model | FlexibleModel]:
    partial_cls, text, last = create_flexible_model(output_cls), "", None
    for delta in stream:
        text += delta
        try:
            fields = parse_partial_json(text)
            partial = partial_cls.model_validate(fields)
        except ValueError:  # not yet an object's opening, or a value not yet of its type (ValidationError)
            continue
        if fields != last:
            last = fields
            yield partial
    yield _structured_object(output_cls, stream.result)


@contextlib.contextmanager
def _query_of(prompt: BasePromptTemplate, prompt_args: dict) -> Iterator[None]:
    """Make the template's `query_str` the question that seeds selection, and its retrieved context (split into
    the nodes' texts) the only prunable text, while the block runs. A call argument overrides a partially
    formatted one."""
    values = {**prompt.kwargs, **prompt_args}
    query = values.get("query_str")
    context = next((values[name] for name in CONTEXT_VARIABLES if isinstance(values.get(name), str)), "")
    documents = [piece for piece in context.split(NODE_SEPARATOR) if piece.strip()]
    token = _template_inputs.set(
        {
            "query": query if isinstance(query, str) and query.strip() else None,
            "documents": documents or None,
            "chat": isinstance(prompt, ChatPromptTemplate),
        }
    )
    try:
        yield
    finally:
        _template_inputs.reset(token)


def _chunks(stream: GenerationStream) -> Iterator[tuple[str, str, GenerationResult | None]]:
    """(cumulative text, delta, None) per text delta, then (text, "", result) once the generation has ended."""
    text = ""
    for delta in stream:
        text += delta
        yield text, delta, None
    yield text, "", stream.result


async def _amap(convert, chunks: Iterator) -> AsyncIterator:
    """`convert(*chunk)` for each chunk, each step of the blocking iterator run in a worker thread."""
    end = object()
    while (chunk := await asyncio.to_thread(next, chunks, end)) is not end:
        yield convert(*chunk)


def _result_fields(result: GenerationResult | None) -> dict:
    if result is None:
        return {}
    return {
        "raw": {"usage": result.usage(), "finish_reason": result.finish_reason},
        "additional_kwargs": {"promptdistill": result.stats()},
    }


def _completion_response(text: str, delta: str | None, result: GenerationResult | None) -> CompletionResponse:
    return CompletionResponse(text=text, delta=delta, **_result_fields(result))


def _chat_response(text: str, delta: str | None, result: GenerationResult | None) -> ChatResponse:
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta, **_result_fields(result)
    )
