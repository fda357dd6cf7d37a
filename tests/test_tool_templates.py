"""Tools through the model's own chat template (`tool_format`): a tiny random Qwen2 with Qwen2.5-Instruct's chat
template renders `tools=`, tool calls and tool results itself; the default SmolLM2 template, which has no tools
support, gets the built-in Hermes text, and refuses "template". Either way the tools' signatures are never pruned,
however long they are."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
import transformers
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.langchain import ChatPromptDistill
from pd_integrations.langchain.chat_models import to_engine_messages
from pd_integrations.langchain.tools import openai_tools
from pd_integrations.loading import default_model_path
from pd_integrations.prompt import render
from pd_integrations.tools import builtin_messages, template_supports_tools

from .conftest import TINY
from .conversations import tool_conversation
from .test_layout import PASSAGES, QUESTION, engine_for

# Qwen2.5-Instruct's chat template, verbatim (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct).
QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


@tool
def set_alarm(hour: Literal["six", "seven", "eight"], loud: bool) -> str:
    """Sets an alarm."""
    return f"alarm at {hour}"


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "set_alarm",
            "description": "Sets an alarm.",
            "parameters": set_alarm.tool_call_schema.model_json_schema(),
        },
    }
]
# Enough tools, described at length, that their signatures outweigh every message.
MANY_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": f"lookup_{k}",
            "description": f"Looks up record {k} in the archive of the {office} office, with its "
            f"owner, its retention period, its storage room and the forms that "
            f"must accompany any request to read, copy or destroy it.",
            "parameters": {"type": "object", "properties": {"record": {"type": "integer"}}},
        },
    }
    for k, office in enumerate(["Lisbon", "Nairobi", "Montreal", "Kyoto", "Tallinn", "Perth", "Quito", "Bergen"])
]
CONVERSATION = tool_conversation("Wake me at six.", "alarm at six", system="Be brief.")


@pytest.fixture(scope="module")
def qwen_tokenizer():
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path())  # ChatML tokens, like Qwen's
    tokenizer.chat_template = QWEN25_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny_qwen():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**{**TINY, "max_position_embeddings": 4096})
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tiny_qwen, qwen_tokenizer):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_qwen.save_pretrained(path)
    qwen_tokenizer.save_pretrained(path)
    return str(path)


def test_templates_with_hermes_tools_support_are_detected(qwen_tokenizer, tokenizer):
    assert template_supports_tools(qwen_tokenizer)
    assert not template_supports_tools(tokenizer)  # SmolLM2's template ignores tools= and tool calls


def test_template_format_renders_exactly_what_the_template_does_with_tools(qwen_tokenizer, tiny_qwen):
    expected = qwen_tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    for tool_format in ("auto", "template"):
        rendered = render(qwen_tokenizer, None, CONVERSATION, None, TOOLS, tool_format)
        assert (rendered.text, rendered.tool_format) == (expected, "template")
    engine = PromptDistillEngine(tiny_qwen, qwen_tokenizer, PromptDistillConfig(method="full"))
    result = engine.generate(messages=CONVERSATION, tools=TOOLS, max_new_tokens=1)
    assert result.prompt_text == expected and result.stats()["tool_format"] == "template"
    # Tool messages without tools (tool_choice "none" on a later turn) go through the template too.
    assert render(qwen_tokenizer, None, CONVERSATION, None).text == qwen_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )


def test_builtin_format_writes_the_hermes_text_for_any_template(qwen_tokenizer, tokenizer):
    for tok, tool_format in ((tokenizer, "auto"), (tokenizer, "builtin"), (qwen_tokenizer, "builtin")):
        rendered = render(tok, None, CONVERSATION, None, TOOLS, tool_format)
        assert rendered.tool_format == "builtin"
        assert rendered.text == tok.apply_chat_template(
            builtin_messages(CONVERSATION, TOOLS), tokenize=False, add_generation_prompt=True
        )


def test_template_format_without_tools_support_raises_naming_the_alternative(tokenizer, tiny_qwen):
    engine = PromptDistillEngine(tiny_qwen, tokenizer, PromptDistillConfig(method="full"))
    with pytest.raises(ValueError, match="chat template does not support tools.*tool_format='builtin'"):
        engine.generate(messages=CONVERSATION, tools=TOOLS, tool_format="template")
    with pytest.raises(ValueError, match="tool_format must be one of 'auto', 'template', 'builtin', got 'native'"):
        engine.generate(messages=CONVERSATION, tools=TOOLS, tool_format="native")
    with pytest.raises(ValueError, match="chat template does not support tools"):
        ChatPromptDistill(tool_format="template").bind_tools([set_alarm]).invoke("Wake me up.")


@pytest.mark.parametrize("tool_format", ["template", "builtin"])
@pytest.mark.parametrize("with_context", [False, True], ids=["question only", "rag"])
def test_the_tools_block_is_never_pruned(qwen_tokenizer, tiny_qwen, tool_format, with_context):
    passages = PASSAGES[:6]
    context = "\n\n".join(passages)
    question = f"Context:\n{context}\n\nQuestion: {QUESTION}" if with_context else QUESTION
    messages = [{"role": "system", "content": "Answer from the records."}, {"role": "user", "content": question}]
    rendered = render(qwen_tokenizer, None, messages, None, MANY_TOOLS, tool_format)
    block = rendered.text[slice(*rendered.tools_range)]
    assert "lookup_7" in block and len(qwen_tokenizer(block)["input_ids"]) > 512  # longer than any message
    engine = engine_for(tiny_qwen, qwen_tokenizer)
    layout = engine.prefill(messages=messages, tools=MANY_TOOLS, tool_format=tool_format).sequences[0].layout
    starts = rendered.word_starts()
    in_block = (starts >= rendered.tools_range[0]) & (starts < rendered.tools_range[1])
    assert not bool(layout.prunable[in_block].any())
    if with_context:  # the retrieved passages are still the context
        assert layout.context_source == "heuristic"
        assert all(
            rendered.text[a:b].strip() in context
            for (a, b), prunable in zip(rendered.offsets, layout.prunable.tolist())
            if prunable
        )
    else:
        assert layout.context_source == "none"


def test_chat_model_renders_tools_and_tool_messages_through_the_template(qwen_dir, qwen_tokenizer):
    chat = ChatPromptDistill(model=qwen_dir, method="full", max_tokens=120)
    history = [
        HumanMessage("Wake me at six."),
        AIMessage(
            content="", tool_calls=[{"name": "set_alarm", "args": {"hour": "six", "loud": True}, "id": "call_1"}]
        ),
        ToolMessage("alarm at six", tool_call_id="call_1"),
        HumanMessage("And at seven."),
    ]
    result = chat.bind_tools([set_alarm], tool_choice="set_alarm").invoke(history)
    stats = result.response_metadata["promptdistill"]
    assert stats["tool_format"] == "template"
    assert stats["prompt_text"] == qwen_tokenizer.apply_chat_template(
        to_engine_messages(history), tools=openai_tools([set_alarm]), tokenize=False, add_generation_prompt=True
    )
    (call,) = result.tool_calls
    assert call["name"] == "set_alarm"
    set_alarm.tool_call_schema.model_validate(call["args"])
