"""`ChatPromptDistill`: a LangChain chat model whose prefill prunes retrieved context inside the model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from ._common import PromptDistillSettings, usage_metadata
from .prompts import tagged_inputs


class ChatPromptDistill(PromptDistillSettings, BaseChatModel):
    """A Hugging Face chat model run through PromptDistill: at the selection layers the question's attention picks
    the context tokens that later layers see, so time to first token and KV cache shrink on long RAG prompts.

    Only retrieved context is pruned; the instructions, the question and earlier turns always reach every layer
    (see `pd_integrations.layout`). The model learns which text is the context and which the question, most
    precise first, from: a `DistillPrompt` wrapping the chain's prompt template (per input, no rebinding);
    `pd_query` and `pd_documents` (per call or via `.bind(...)`); else a rule that takes the body of the one long
    message as the context and a "Question: ..." or "...?" line (else the last short human message) as the
    question. `response_metadata["promptdistill"]["context_source"]` says which: "template", "documents",
    "heuristic" or "none". A question that precedes the context seeds selection as a transient probe.
    `pd_documents` (the retrieved `Document`s or texts, as inserted in the prompt) also keeps span units inside
    document boundaries, is needed by `span="document"` configs, and adds per-document `document_retention`.

    Per call, `model=` runs another model (loaded on first use and shared like the default), and `temperature`,
    `max_tokens`, `top_p` and `seed` override the constructor's values.

    Each `AIMessage` carries `usage_metadata` and `response_metadata` with `model_name`, `finish_reason` and
    `promptdistill` (prompt/kept tokens, kept ratio, prefill seconds, selection layers, kept character spans of
    the rendered `prompt_text`, method). `ainvoke`/`astream`/`abatch` run generation in worker threads; the engine
    serialises forward steps, so concurrent calls interleave safely.

    Example:
        ```python
        from langchain_core.output_parsers import StrOutputParser
        from langchain_core.prompts import ChatPromptTemplate
        from langchain_core.runnables import RunnablePassthrough
        from pd_integrations.langchain import ChatPromptDistill, DistillPrompt

        prompt = DistillPrompt(prompt=ChatPromptTemplate.from_messages(
            [("human", "Question: {question}\\nContext: {context}\\nAnswer:")]))
        llm = ChatPromptDistill(budgets=0.25, max_tokens=64)
        chain = {"context": retriever, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()
        chain.invoke("Who keeps the lighthouse?")
        ```
    """

    @property
    def _llm_type(self) -> str:
        return "promptdistill-chat"

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        call = self._prepare_call(stop, kwargs, tagged_inputs(messages))
        stream = call.stream(messages=to_engine_messages(messages))
        for _ in stream:
            pass
        result = stream.result
        message = AIMessage(content=result.text, usage_metadata=usage_metadata(result),
                            response_metadata=call.response_metadata(result))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        call = self._prepare_call(stop, kwargs, tagged_inputs(messages))
        stream = call.stream(messages=to_engine_messages(messages))
        for delta in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        result = stream.result
        # Usage and metadata once, on the last chunk, so that summing the chunks counts them once.
        yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage_metadata(result),
                                                         response_metadata=call.response_metadata(result),
                                                         chunk_position="last"))


_ROLES = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant"}


def to_engine_messages(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as chat-template messages, consecutive same-role messages merged (many chat templates
    require alternating roles). Names are dropped; non-text content raises `ValueError`."""
    converted: list[dict[str, str]] = []
    for message in messages:
        role = _role(message)
        if role is None:
            raise ValueError(f"ChatPromptDistill takes system, human, AI and chat messages, got a {message.type!r} "
                             f"message (tool calling is not supported)")
        other = [block["type"] for block in message.content_blocks if block["type"] != "text"]
        if other:
            raise ValueError(f"ChatPromptDistill takes text content only, got {other[0]!r} content in a "
                             f"{message.type!r} message")
        if converted and converted[-1]["role"] == role:
            converted[-1]["content"] += "\n\n" + message.text
        else:
            converted.append({"role": role, "content": message.text})
    return converted


def _role(message: BaseMessage) -> str | None:
    if isinstance(message, ChatMessage):
        return message.role
    return next((role for cls, role in _ROLES.items() if isinstance(message, cls)), None)
