"""What is protected without the caller asking: tool results are not taken for retrieved context (unless named in
`documents=`), a LlamaIndex chat prompt template reaches the model through its chat template rather than as
"user: ..." text, and `device="cuda"` without CUDA says which torch is installed and how to get a CUDA one."""

from __future__ import annotations

import pytest
import torch
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.prompts import ChatPromptTemplate

from pd_integrations import PromptDistillEngine
from pd_integrations.inputs import call_inputs
from pd_integrations.langchain import ChatPromptDistill
from pd_integrations.llama_index import PromptDistillLLM as LlamaIndexLLM
from pd_integrations.loading import DeviceUnavailableError, resolve_device
from pd_integrations.prompt import render

from . import conversations
from .test_layout import PASSAGES, QUESTION, engine_for
from .test_tool_templates import TOOLS, qwen_tokenizer, tiny_qwen  # noqa: F401 (fixtures)

RESULT = "\n\n".join(PASSAGES[:6])  # a tool result far longer than context_min_tokens


def tool_conversation(question: str) -> list[dict]:
    return conversations.tool_conversation(question, RESULT)


def prunable_text(rendered, layout) -> str:
    return "".join(rendered.text[a:b] for (a, b), p in zip(rendered.offsets, layout.prunable.tolist()) if p)


@pytest.mark.parametrize("tool_format", ["template", "builtin"])
def test_a_long_tool_result_is_not_taken_for_context(qwen_tokenizer, tiny_qwen, tool_format):
    engine = engine_for(tiny_qwen, qwen_tokenizer)
    messages = tool_conversation(QUESTION)
    rendered = render(qwen_tokenizer, None, messages, None, TOOLS, tool_format)
    assert len(rendered.tool_result_ranges) == 1 and RESULT in rendered.text
    layout = engine.prefill(messages=messages, tools=TOOLS, tool_format=tool_format).sequences[0].layout
    assert layout.context_source == "none" and not bool(layout.prunable.any())
    # Named as a document, the result is the retrieved context.
    named = (
        engine.prefill(messages=messages, tools=TOOLS, tool_format=tool_format, documents=[RESULT]).sequences[0].layout
    )
    assert named.context_source == "documents" and named.num_prunable > 200
    assert prunable_text(rendered, named).split() == [w for w in prunable_text(rendered, named).split() if w in RESULT]


@pytest.mark.parametrize("tool_format", ["template", "builtin"])
def test_retrieved_context_beside_a_tool_result_is_still_pruned(qwen_tokenizer, tiny_qwen, tool_format):
    context = "\n\n".join(PASSAGES[6:])
    messages = tool_conversation(f"Context:\n{context}\n\nQuestion: {QUESTION}")
    rendered = render(qwen_tokenizer, None, messages, None, TOOLS, tool_format)
    layout = (
        engine_for(tiny_qwen, qwen_tokenizer)
        .prefill(messages=messages, tools=TOOLS, tool_format=tool_format)
        .sequences[0]
        .layout
    )
    assert layout.context_source == "heuristic" and layout.num_prunable > 100
    ((start, end),) = rendered.tool_result_ranges
    starts = rendered.word_starts()
    assert not bool(layout.prunable[(starts >= start) & (starts < end)].any())


def test_chat_prompt_templates_are_rendered_by_the_chat_template(tiny_model_dir, monkeypatch):
    """A LlamaIndex `ChatPromptTemplate` (the condense_plus_context chat engine's, a chat engine's history) is sent
    as chat messages, not flattened into one user turn of "system: ... user: ... assistant: " text."""
    seen = []
    original = PromptDistillEngine.stream

    def recording_stream(self, prompt=None, *, sampling=None, **arguments):
        seen.append(call_inputs("stream", prompt, sampling, arguments)[0].messages)
        return original(self, prompt, sampling=sampling, **arguments)

    monkeypatch.setattr(PromptDistillEngine, "stream", recording_stream)
    template = ChatPromptTemplate(
        [
            ChatMessage(role=MessageRole.SYSTEM, content="Context: {context_str}"),
            ChatMessage(role=MessageRole.USER, content="Who keeps the lighthouse?"),
            ChatMessage(role=MessageRole.ASSISTANT, content="Ada."),
            ChatMessage(role=MessageRole.USER, content="{query_str}"),
        ]
    )
    llm = LlamaIndexLLM(model=tiny_model_dir, max_new_tokens=2)
    llm.predict(template, context_str="Ada keeps it.", query_str="Where does she live?")
    assert seen[-1] == [
        {"role": "system", "content": "Context: Ada keeps it."},
        {"role": "user", "content": "Who keeps the lighthouse?"},
        {"role": "assistant", "content": "Ada."},
        {"role": "user", "content": "Where does she live?"},
    ]
    assert not llm.metadata.is_chat_model  # only for the call
    list(llm.stream(template, context_str="Ada keeps it.", query_str="Where?"))
    assert seen[-1][-1] == {"role": "user", "content": "Where?"}
    LlamaIndexLLM(model=tiny_model_dir, max_new_tokens=2, use_chat_template=False).predict(
        template, context_str="Ada keeps it.", query_str="Where?"
    )
    assert seen[-1] is None  # raw text through messages_to_prompt, as asked


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_names_the_torch_build_and_the_fix():
    for make in (
        lambda: resolve_device("cuda"),
        lambda: ChatPromptDistill(device="cuda"),
        lambda: LlamaIndexLLM(device="cuda:0"),
    ):
        with pytest.raises(DeviceUnavailableError) as error:
            make()
        message = str(error.value)
        assert f"torch {torch.__version__}" in message and "download.pytorch.org/whl/" in message
        assert "device='cuda" in message and "ValidationError" not in type(error.value).__name__
