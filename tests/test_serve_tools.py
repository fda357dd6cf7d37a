"""pd-serve's structured output and tool calls in OpenAI's format, over the openai client: `response_format`
(json_schema, json_object), `tools` with every `tool_choice`, streamed `delta.tool_calls` that add up to the
non-streaming answer, earlier calls and tool results sent back in the conversation, output cut off at max_tokens,
a server without xgrammar, and a model whose own chat template renders the tools.

The servers run tiny *random* models with full attention: such a model never writes JSON or a call by chance, so
output that parses and follows its schema shows the grammar at work, in a fraction of a second per request.
tests/test_serve.py runs the default model (the right arguments) and every refusal."""

from __future__ import annotations

import json

import openai
import pytest
import transformers

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.loading import default_model_path
from pd_integrations.prompt import render
from pd_integrations.serve import ServerSettings, create_app
from pd_integrations.serve.openai_schema import ChatCompletionRequest

from .conftest import SERVED_MODEL, tiny_model
from .conversations import alarm_call_turn
from .serving import running
from .test_tool_templates import QWEN25_TEMPLATE

MODEL = SERVED_MODEL
TICKET = {
    "type": "object",
    "properties": {
        "priority": {"enum": ["low", "medium", "high"]},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "urgent": {"type": "boolean"},
    },
    "required": ["priority", "code", "urgent"],
    "additionalProperties": False,
}
ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "description": "Sets an alarm.",
        "parameters": {
            "type": "object",
            "properties": {"hour": {"enum": ["six", "seven", "eight"]}, "loud": {"type": "boolean"}},
            "required": ["hour", "loud"],
            "additionalProperties": False,
        },
    },
}
NOOP = {"type": "function", "function": {"name": "noop", "description": "Does nothing."}}
WAKE = [{"role": "user", "content": "Wake me at six."}]
# An earlier turn's call and its result, as OpenAI clients send them back.
EARLIER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "set_alarm", "arguments": '{"hour": "six", "loud": true}'},
}
ROUND_TRIP = [
    *WAKE,
    {"role": "assistant", "content": None, "tool_calls": [EARLIER_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "alarm set for six"},
    {"role": "user", "content": "Thanks."},
]


def check_alarm(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"hour", "loud"}
    assert args["hour"] in ("six", "seven", "eight") and isinstance(args["loud"], bool)


@pytest.fixture(scope="module")
def client(tiny_url):
    return openai.OpenAI(base_url=f"{tiny_url}/v1", api_key="unused", max_retries=0)


def create(client, **fields):
    return client.chat.completions.create(**{"model": MODEL, "messages": WAKE, "max_tokens": 120, **fields})


def test_json_schema_response_format_parses_and_follows_the_schema(client):
    response = create(
        client,
        response_format={"type": "json_schema", "json_schema": {"name": "ticket", "schema": TICKET, "strict": True}},
        temperature=1.0,
        seed=3,
    )
    ticket = json.loads(response.choices[0].message.content)
    assert set(ticket) == {"priority", "code", "urgent"} and ticket["priority"] in ("low", "medium", "high")
    assert response.choices[0].finish_reason == "stop"


def test_json_object_response_format_constrains_to_an_object(client):
    choice = create(client, response_format={"type": "json_object"}, max_tokens=24).choices[0]
    # A random model writes keys until max_tokens, but it writes an object; text format is free text.
    assert choice.message.content.startswith("{") and choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    assert not create(client, response_format={"type": "text"}, max_tokens=4).choices[0].message.content.startswith("{")


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "set_alarm"}}], ids=["required", "named"]
)
def test_forced_tool_choice_returns_a_valid_call_in_openai_format(client, tool_choice):
    response = create(client, tools=[ALARM, NOOP], tool_choice=tool_choice, temperature=1.0, seed=5)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls  # parallel_tool_calls unset: one call
    assert call.id.startswith("call_") and call.type == "function"
    if tool_choice != "required":
        assert call.function.name == "set_alarm"
    if call.function.name == "set_alarm":
        check_alarm(call.function.arguments)
    else:
        assert (call.function.name, json.loads(call.function.arguments)) == ("noop", {})


def test_auto_tool_choice_returns_text_or_a_valid_call(client):
    choice = create(client, tools=[ALARM], tool_choice="auto", max_tokens=40).choices[0]
    if choice.message.tool_calls:
        (call,) = choice.message.tool_calls
        assert call.function.name == "set_alarm"
        if choice.finish_reason == "tool_calls":
            check_alarm(call.function.arguments)
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_tool_choice_none_hides_the_tools(client):
    plain = create(client, max_tokens=4)
    hidden = create(client, tools=[ALARM], tool_choice="none", max_tokens=4)
    assert hidden.usage.prompt_tokens == plain.usage.prompt_tokens
    assert hidden.choices[0].message.tool_calls is None
    assert create(client, tools=[ALARM], max_tokens=4).usage.prompt_tokens > plain.usage.prompt_tokens


def test_streamed_tool_calls_add_up_to_the_non_streaming_answer(client):
    fields = {"tools": [ALARM, NOOP], "tool_choice": "required", "temperature": 1.0, "seed": 11}
    whole = create(client, **fields).choices[0]
    chunks = list(create(client, **fields, stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert deltas[0].role == "assistant" and not any(delta.content for delta in deltas)
    calls: dict[int, dict] = {}
    for delta in deltas:
        for part in delta.tool_calls or []:
            if part.index not in calls:  # the first delta of a call: id, type and name, no arguments yet
                assert part.id.startswith("call_") and part.type == "function" and part.function.arguments == ""
                calls[part.index] = {"name": part.function.name, "arguments": ""}
            else:  # then only fragments of its arguments
                assert part.id is None and part.function.name is None
                calls[part.index]["arguments"] += part.function.arguments
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == [
        (c["name"], c["arguments"]) for _, c in sorted(calls.items())
    ]
    assert len(calls) >= 1 and sum(len(delta.tool_calls or []) for delta in deltas) > 2 * len(calls)
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "tool_calls"


def test_earlier_calls_and_tool_results_round_trip_into_the_prompt(client, tiny_engine):
    request = ChatCompletionRequest(model=MODEL, messages=ROUND_TRIP, tools=[ALARM])
    (row,) = request.prompt_inputs()  # one row: n is 1
    messages = row.messages
    assert messages[1] == alarm_call_turn()
    assert messages[2] == {"role": "tool", "content": "alarm set for six", "tool_call_id": "call_1"}
    rendered = render(tiny_engine.tokenizer, None, messages, None, [ALARM])
    call = '<tool_call>\n{"name": "set_alarm", "arguments": {"hour": "six", "loud": true}}\n</tool_call>'
    assert call in rendered.text
    assert "<tool_response>\nalarm set for six\n</tool_response>" in rendered.text
    response = create(client, messages=ROUND_TRIP, tools=[ALARM], max_tokens=2)
    assert response.usage.prompt_tokens == len(rendered.input_ids)
    assert response.promptdistill["tool_format"] == "builtin"


def test_output_cut_off_at_max_tokens_ends_with_length_as_generated(client):
    schema = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": TICKET}}
    choice = create(client, response_format=schema, max_tokens=3).choices[0]
    assert choice.finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(choice.message.content)
    for max_tokens in (6, 30):  # cut inside the call's header, then inside its arguments
        choice = create(client, tools=[ALARM], tool_choice="required", max_tokens=max_tokens).choices[0]
        assert choice.finish_reason == "length"
        if choice.message.tool_calls is None:  # cut in the header: no call, and its wrapper is nobody's text
            assert choice.message.content == ""
        else:
            (call,) = choice.message.tool_calls
            with pytest.raises(ValueError):
                json.loads(call.function.arguments)


def test_without_xgrammar_structured_requests_say_what_to_install(client, monkeypatch):
    monkeypatch.setattr("pd_integrations.constraints.xgr", None)
    for fields, param in (
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [ALARM]}, "tools"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            create(client, **fields)
        error = refused.value.body
        assert error["param"] == param and "pd-integrations[structured]" in error["message"]
    assert create(client, max_tokens=2).choices[0].message.content  # plain requests still work


@pytest.fixture(scope="module")
def qwen_engine():
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.chat_template = QWEN25_TEMPLATE
    return PromptDistillEngine(tiny_model("qwen2"), tokenizer, PromptDistillConfig(method="full"), model_name=MODEL)


def test_a_template_with_tools_support_renders_the_requests_tools(qwen_engine, tiny_engine):
    with running(create_app(qwen_engine, ServerSettings(model=MODEL, tool_format="template"))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        response = create(
            client,
            messages=ROUND_TRIP,
            tools=[ALARM],
            tool_choice={"type": "function", "function": {"name": "set_alarm"}},
        )
    assert response.promptdistill["tool_format"] == "template"
    (row,) = ChatCompletionRequest(model=MODEL, messages=ROUND_TRIP).prompt_inputs()
    messages = row.messages
    expected = qwen_engine.tokenizer.apply_chat_template(
        messages, tools=[ALARM], tokenize=False, add_generation_prompt=True
    )
    assert response.usage.prompt_tokens == len(qwen_engine.tokenizer(expected, add_special_tokens=False).input_ids)
    check_alarm(response.choices[0].message.tool_calls[0].function.arguments)
    with pytest.raises(ValueError, match="chat template does not support tools"):
        create_app(tiny_engine, ServerSettings(model=MODEL, tool_format="template"))
