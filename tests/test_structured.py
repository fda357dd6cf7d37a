"""Grammar-constrained decoding (`pd_integrations.constraints`) and the adapters built on it: structured output and
tool calling in LangChain and LlamaIndex.

Most tests run a tiny *random* model: it never writes JSON by chance, so output that parses and validates shows
the grammar at work. Schemas use enums, booleans and patterned strings so that output is complete in a few tokens.
A few tests run the default model on short prompts for what only a trained model can show (the right tool
arguments, the right extracted values).
"""

from __future__ import annotations

import re
from typing import Literal

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from llama_index.core import Document as LlamaDocument
from llama_index.core import SummaryIndex
from llama_index.core.llms import ChatMessage
from llama_index.core.prompts import PromptTemplate
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.constraints import CUT_OFF, Grammars, ToolSpec, parse_tool_calls
from pd_integrations.langchain import ChatPromptDistill
from pd_integrations.langchain.chat_models import to_engine_messages
from pd_integrations.langchain.tools import ToolCallStream
from pd_integrations.llama_index import PromptDistillLLM
from pd_integrations.prompt import render
from pd_integrations.tools import builtin_messages

from .conftest import tiny_model


class Ticket(BaseModel):
    """A support ticket."""

    priority: Literal["low", "medium", "high"]
    code: str = Field(pattern=r"^[A-Z]{3}-[0-9]{2}$", description="the ticket code")
    urgent: bool


TICKET_SCHEMA = Ticket.model_json_schema()


class TicketDict(TypedDict):
    """A support ticket."""

    priority: Literal["low", "medium", "high"]
    urgent: bool


@tool
def set_alarm(hour: Literal["six", "seven", "eight"], loud: bool) -> str:
    """Sets an alarm."""
    return f"alarm at {hour}"


@tool
def magic_function(input: int) -> int:
    """Applies a magic function to an input."""
    return input + 2


@pytest.fixture(scope="module")
def tiny_engine(tokenizer):
    return PromptDistillEngine(tiny_model("llama"), tokenizer, PromptDistillConfig(method="full"))


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    # A call's fixed text alone (`<tool_call>`, name, "arguments") is ~30 tokens of this tokenizer.
    return ChatPromptDistill(model=tiny_model_dir, method="full", max_tokens=120)


# ---------------------------------------------------------------- the constraint itself


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_random_model_output_follows_the_json_schema(tiny_engine, seed):
    grammar = Grammars.of(tiny_engine).json_schema(TICKET_SCHEMA)
    sampling = {} if seed is None else {"temperature": 1.0, "seed": seed}
    result = tiny_engine.generate("Ticket:", max_new_tokens=48, constraint=grammar.constraint(), **sampling)
    assert result.finish_reason == "stop"
    Ticket.model_validate_json(result.text)  # raises unless the output is a valid Ticket


def test_unconstrained_random_model_writes_no_json(tiny_engine):
    # The control for the test above: the same model and prompt, without the constraint.
    result = tiny_engine.generate("Ticket:", max_new_tokens=48)
    with pytest.raises(ValueError):
        Ticket.model_validate_json(result.text)


def test_batched_rows_each_follow_their_own_grammar(tiny_engine):
    # One prefill and decode batch; row 0 under the Ticket schema, row 1 under a regex, row 2 unconstrained.
    grammars = Grammars.of(tiny_engine)
    results = tiny_engine.generate_batch(
        ["Ticket:", "Code:", "Ticket:"],
        max_new_tokens=48,
        constraints=[
            grammars.json_schema(TICKET_SCHEMA).constraint(),
            grammars.regex(r"[0-9]{3}-[a-z]{2}").constraint(),
            None,
        ],
    )
    Ticket.model_validate_json(results[0].text)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", results[1].text) and results[1].finish_reason == "stop"
    assert results[2].text == tiny_engine.generate("Ticket:", max_new_tokens=48).text
    assert (
        results[0].text
        == tiny_engine.generate(
            "Ticket:", max_new_tokens=48, constraint=grammars.json_schema(TICKET_SCHEMA).constraint()
        ).text
    )


def test_regex_constraint_matches_in_full(tiny_engine):
    grammar = Grammars.of(tiny_engine).regex(r"[0-9]{3}-[a-z]{2}")
    result = tiny_engine.generate("Code:", max_new_tokens=16, temperature=1.0, seed=3, constraint=grammar.constraint())
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", result.text), result.text
    assert result.finish_reason == "stop"


def test_each_generation_gets_its_own_matcher(tiny_engine):
    # One compiled grammar, two constraints: the second starts from the grammar's beginning, not the first's end.
    grammar = Grammars.of(tiny_engine).json_schema(TICKET_SCHEMA)
    first = tiny_engine.generate("A:", max_new_tokens=48, constraint=grammar.constraint())
    second = tiny_engine.generate("A:", max_new_tokens=48, constraint=grammar.constraint())
    assert first.text == second.text
    Ticket.model_validate_json(second.text)


@pytest.mark.parametrize("parallel", [False, True])
def test_required_tool_calls_parse_and_follow_their_tool_schema(tiny_engine, parallel):
    tools = [
        ToolSpec("set_alarm", set_alarm.tool_call_schema.model_json_schema()),
        ToolSpec("noop", {"type": "object", "properties": {}}),
    ]
    grammar = Grammars.of(tiny_engine).tool_calls(tools, required=True, parallel=parallel)
    result = tiny_engine.generate("Call:", max_new_tokens=120, temperature=1.0, seed=5, constraint=grammar.constraint())
    parsed = parse_tool_calls(result.text)
    assert result.finish_reason == "stop" and parsed.calls and not parsed.invalid and parsed.text == ""
    assert parallel or len(parsed.calls) == 1
    for _, name, args in parsed.calls:
        if name == "set_alarm":
            set_alarm.tool_call_schema.model_validate(args)
        else:
            assert (name, args) == ("noop", {})


def test_bad_schemas_and_patterns_raise_naming_them(tiny_engine):
    grammars = Grammars.of(tiny_engine)
    with pytest.raises(ValueError, match="schema cannot be compiled.*objekt"):
        grammars.json_schema({"type": "objekt"})
    with pytest.raises(ValueError, match="tool 'broken''s parameters cannot be compiled"):
        grammars.tool_calls(
            [ToolSpec("broken", {"type": "object", "properties": {"x": {"type": "nope"}}})], required=True
        )
    with pytest.raises(ValueError, match="regex must be a non-empty str"):
        grammars.regex("")
    with pytest.raises(ValueError, match="regex '\\[a-' cannot be compiled"):
        grammars.regex("[a-")


# ---------------------------------------------------------------- tool-call text: parsing and streaming

CALL_OUTPUT = (
    'Let me check.<tool_call>\n{"name": "set_alarm", "arguments": {"hour": "six", "loud": true}}\n'
    '</tool_call>\n<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'
)


def test_parse_tool_calls_splits_text_calls_and_cut_off_calls():
    parsed = parse_tool_calls(CALL_OUTPUT)
    assert parsed.text == "Let me check."
    assert [(name, args) for _, name, args in parsed.calls] == [
        ("set_alarm", {"hour": "six", "loud": True}),
        ("noop", {}),
    ]
    cut = parse_tool_calls('Hi <tool_call>\n{"name": "set_alarm", "arguments": {"hour": "si')
    assert cut.text == "Hi" and cut.calls == []
    assert [invalid[1:] for invalid in cut.invalid] == [("set_alarm", '{"hour": "si', CUT_OFF)]


def test_streamed_tool_calls_merge_to_the_parsed_calls_at_every_split():
    expected = parse_tool_calls(CALL_OUTPUT)
    for size in range(1, 12):  # deltas of every size from one character up
        splitter, merged = ToolCallStream(), AIMessageChunk(content="")
        pieces = [CALL_OUTPUT[i : i + size] for i in range(0, len(CALL_OUTPUT), size)]
        for piece in [p for delta in pieces for p in splitter.feed(delta)] + splitter.close("stop"):
            merged += (
                AIMessageChunk(content=piece)
                if isinstance(piece, str)
                else AIMessageChunk(content="", tool_call_chunks=[piece])
            )
        assert merged.content == "Let me check.", size
        assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(n, a) for _, n, a in expected.calls], size
        assert all(c["id"] for c in merged.tool_calls)


def test_streamed_call_cut_off_keeps_its_name_and_partial_arguments():
    splitter = ToolCallStream()
    pieces = splitter.feed('<tool_call>\n{"name": "set_alarm", "arguments": {"hour": "si') + splitter.close("length")
    merged = sum((AIMessageChunk(content="", tool_call_chunks=[p]) for p in pieces), AIMessageChunk(content=""))
    assert merged.tool_call_chunks[0]["name"] == "set_alarm"
    assert merged.tool_call_chunks[0]["args"].startswith('{"hour": "si')


# ---------------------------------------------------------------- LangChain


def test_tools_and_tool_results_render_in_the_builtin_format(tiny_engine):
    # The default model's template has no tools support: the Hermes text is written into plain messages.
    tools = [
        {
            "type": "function",
            "function": {
                "name": "set_alarm",
                "description": "Sets an alarm.",
                "parameters": set_alarm.tool_call_schema.model_json_schema(),
            },
        }
    ]
    call = AIMessage(
        content="", tool_calls=[{"name": "set_alarm", "args": {"hour": "six", "loud": True}, "id": "call_1"}]
    )
    messages = to_engine_messages(
        [
            SystemMessage("Be brief."),
            HumanMessage("Wake me at six."),
            call,
            ToolMessage("alarm at six", tool_call_id="call_1"),
        ]
    )
    assert messages[2]["tool_calls"][0]["function"] == {"name": "set_alarm", "arguments": {"hour": "six", "loud": True}}
    assert messages[3] == {"role": "tool", "content": "alarm at six", "tool_call_id": "call_1"}
    plain = builtin_messages(messages, tools)
    assert [m["role"] for m in plain] == ["system", "user", "assistant", "user"]
    assert plain[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "set_alarm"' in plain[0]["content"]
    assert parse_tool_calls(plain[2]["content"]).calls[0][1:] == ("set_alarm", {"hour": "six", "loud": True})
    assert plain[3]["content"] == "<tool_response>\nalarm at six\n</tool_response>"
    rendered = render(tiny_engine.tokenizer, None, messages, None, tools)
    assert rendered.tool_format == "builtin"
    assert rendered.text == tiny_engine.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant\n<tool_call>" in rendered.text and "<tool_response>" in rendered.text


def test_bind_tools_with_a_forced_choice_returns_valid_tool_calls(chat):
    result = chat.bind_tools([set_alarm, magic_function], tool_choice="set_alarm").invoke("Wake me up.")
    assert result.content == "" and len(result.tool_calls) == 1
    call = result.tool_calls[0]
    assert call["name"] == "set_alarm" and call["id"].startswith("call_") and call["type"] == "tool_call"
    set_alarm.tool_call_schema.model_validate(call["args"])


def test_streamed_tool_calls_equal_the_invoked_ones(chat):
    bound = chat.bind_tools([set_alarm], tool_choice="any")
    invoked = bound.invoke("Wake me up.")
    chunks = list(bound.stream("Wake me up."))
    assert any(chunk.tool_call_chunks for chunk in chunks)
    merged = sum(chunks[1:], chunks[0])
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(c["name"], c["args"]) for c in invoked.tool_calls]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
@pytest.mark.parametrize("schema", [Ticket, TicketDict, TICKET_SCHEMA], ids=["pydantic", "typeddict", "json_schema"])
def test_with_structured_output_parses_every_time(chat, method, schema):
    out = chat.with_structured_output(schema, method=method).invoke("File a ticket.")
    if schema is Ticket:
        assert isinstance(out, Ticket)
    elif schema is TicketDict:
        assert set(out) == {"priority", "urgent"} and isinstance(out["urgent"], bool)
    else:
        Ticket.model_validate(out)


def test_json_mode_returns_a_json_object():
    # json_mode allows any object, so a random model writes keys until max_tokens: the default model, asked.
    llm = ChatPromptDistill(max_tokens=40)
    out = llm.with_structured_output(method="json_mode").invoke('Reply with the JSON object {"answer": "yes"}.')
    assert isinstance(out, dict)


def test_structured_output_cut_off_at_max_tokens_raises_saying_so(chat):
    short = chat.model_copy(update={"max_tokens": 3})
    with pytest.raises(OutputParserException, match=r"cut off at max_tokens \(finish_reason='length'\)"):
        short.with_structured_output(Ticket).invoke("File a ticket.")
    with pytest.raises(OutputParserException, match="cut off at max_tokens"):
        list(short.with_structured_output(Ticket).stream("File a ticket."))
    with pytest.raises(OutputParserException, match="cut off at max_tokens"):
        short.with_structured_output(Ticket, method="function_calling").invoke("File a ticket.")
    raw = short.with_structured_output(Ticket, include_raw=True).invoke("File a ticket.")
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], OutputParserException)
    assert raw["raw"].response_metadata["finish_reason"] == "length"


def test_include_raw_returns_the_message_and_the_object(chat):
    out = chat.with_structured_output(Ticket, method="function_calling", include_raw=True).invoke("File a ticket.")
    assert isinstance(out["parsed"], Ticket) and out["parsing_error"] is None
    assert out["raw"].tool_calls[0]["name"] == "Ticket"


def test_bad_tool_choice_and_tools_raise_before_any_model_work(chat, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(PromptDistillEngine, "stream", no_generation)
    with pytest.raises(ValueError, match="tool_choice must be one of .*'set_alarm'.*got 'set_alarms'"):
        chat.bind_tools([set_alarm], tool_choice="set_alarms")
    bad = {
        "type": "function",
        "function": {"name": "bad", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}},
    }
    with pytest.raises(ValueError, match=r"tools\[0\] \(tool 'bad'\) parameters cannot be compiled"):
        chat.bind_tools([bad]).invoke("hi")
    with pytest.raises(ValueError, match=r"tools\[0\] \(tool 'flat'\) has parameters that are not a JSON object"):
        chat.bind_tools([{"type": "function", "function": {"name": "flat", "parameters": {"type": "string"}}}])
    with pytest.raises(ValueError, match="method must be one of 'json_schema', 'function_calling', 'json_mode'"):
        chat.with_structured_output(Ticket, method="grammar")
    with pytest.raises(ValueError, match="response_format must be"):
        chat.invoke("hi", response_format={"type": "xml"})


def test_tool_choice_none_renders_no_tools_and_constrains_nothing(chat):
    result = chat.bind_tools([set_alarm], tool_choice="none").invoke("Wake me up.", max_tokens=4)
    assert "# Tools" not in result.response_metadata["promptdistill"]["prompt_text"]
    assert result.tool_calls == [] and result.response_metadata["finish_reason"] == "length"


def test_default_model_calls_the_tool_with_the_asked_arguments():
    llm = ChatPromptDistill(max_tokens=40).bind_tools([magic_function], tool_choice="any")
    result = llm.invoke("What is the value of magic_function(3)? Use the tool.")
    assert [(c["name"], c["args"]) for c in result.tool_calls] == [("magic_function", {"input": 3})]


# ---------------------------------------------------------------- LlamaIndex


@pytest.fixture(scope="module")
def llama_llm(tiny_model_dir):
    return PromptDistillLLM(model=tiny_model_dir, method="full", max_new_tokens=48)


def test_structured_predict_returns_the_object(llama_llm):
    ticket = llama_llm.structured_predict(Ticket, PromptTemplate("File a ticket about {topic}."), topic="printers")
    assert isinstance(ticket, Ticket)


async def test_astructured_predict_equals_structured_predict(llama_llm):
    prompt = PromptTemplate("File a ticket about {topic}.")
    assert await llama_llm.astructured_predict(Ticket, prompt, topic="mail") == llama_llm.structured_predict(
        Ticket, prompt, topic="mail"
    )


def test_stream_structured_predict_grows_to_the_object(llama_llm):
    prompt = PromptTemplate("File a ticket about {topic}.")
    items = list(llama_llm.stream_structured_predict(Ticket, prompt, topic="mail"))
    assert items[-1] == llama_llm.structured_predict(Ticket, prompt, topic="mail")
    assert len(items) > 1 and all(not isinstance(item, Ticket) for item in items[:-1])


async def test_astream_structured_predict_ends_with_the_object(llama_llm):
    prompt = PromptTemplate("File a ticket about {topic}.")
    items = [item async for item in await llama_llm.astream_structured_predict(Ticket, prompt, topic="mail")]
    assert isinstance(items[-1], Ticket)


def test_as_structured_llm_returns_the_object_as_json(llama_llm):
    response = llama_llm.as_structured_llm(Ticket).chat([ChatMessage(role="user", content="File a ticket.")])
    assert isinstance(response.raw, Ticket)
    assert Ticket.model_validate_json(response.message.content) == response.raw


def test_structured_predict_cut_off_raises_saying_so(llama_llm):
    with pytest.raises(ValueError, match=r"Ticket output was cut off at max_new_tokens .*finish_reason='length'"):
        llama_llm.structured_predict(Ticket, PromptTemplate("File a ticket."), llm_kwargs={"max_new_tokens": 3})


def test_structured_predict_rejects_an_uncompilable_schema_naming_it(llama_llm):
    class Bad(BaseModel):
        model_config = ConfigDict(json_schema_extra={"properties": {"x": {"type": "nope"}}})
        x: str

    with pytest.raises(ValueError, match="output_cls Bad cannot be compiled"):
        llama_llm.structured_predict(Bad, PromptTemplate("x"))


def test_query_engine_with_output_cls_returns_the_object_and_prunes_only_nodes(llama_llm):
    index = SummaryIndex.from_documents(
        [LlamaDocument(text="Printer 4 is jammed again."), LlamaDocument(text="The mail server is down.")]
    )
    response = index.as_query_engine(llm=llama_llm, output_cls=Ticket).query("Which ticket should we file?")
    assert isinstance(response.response, Ticket)


def test_without_xgrammar_plain_calls_work_and_structured_ones_say_what_to_install(chat, monkeypatch):
    monkeypatch.setattr("pd_integrations.constraints.xgr", None)
    assert chat.invoke("Hi", max_tokens=2).response_metadata["finish_reason"] == "length"
    with pytest.raises(ImportError, match=r"pd-integrations\[structured\]"):
        chat.with_structured_output(Ticket).invoke("File a ticket.")
