"""Tool-call output split into text and calls by the grammar's structure (`pd_integrations.constraints`): random
schemas, random arguments full of `}`, `</tool_call>`, quotes, escapes and Unicode, checked to be output the
tool-call grammar accepts, must come back as exactly those arguments, parsed whole or streamed in random pieces,
through the engine-level splitter, LangChain's chunks and pd-serve's deltas.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import xgrammar as xgr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessageChunk

from pd_integrations.constraints import (
    CALL_FOOTER,
    CUT_OFF,
    HEADER_CUT_OFF,
    Grammars,
    ToolCallStream,
    ToolSpec,
    call_header,
    parse_tool_calls,
)
from pd_integrations.langchain import tools as langchain_tools
from pd_integrations.serve.openai_schema import Output, merged_message

EXAMPLES = int(os.environ.get("PD_PARSE_EXAMPLES", "2000"))

# A character-level vocabulary: compiling against it takes milliseconds, and `accept_string` checks text, whatever
# the tokens.
_VOCAB = [chr(i) for i in range(32, 127)] + ["\n", "</s>"]
_GRAMMARS = Grammars(xgr.GrammarCompiler(xgr.TokenizerInfo(_VOCAB, stop_token_ids=[len(_VOCAB) - 1])))

# Strings that a text search would take for the end of a call, or that a JSON scanner must not be fooled by.
_TRAPS = [
    "}",
    "}}",
    "</tool_call>",
    "}</tool_call>",
    "}\n</tool_call>",
    '"',
    "\\",
    '\\"',
    "{",
    "]",
    "[",
    "<tool_call>",
    '{"name":',
    "\n",
    "é",
    "日本",
    "🙂",
    "\u2028",
    "\x00",
    "'",
]
_strings = st.lists(st.one_of(st.sampled_from(_TRAPS), st.text(max_size=6)), max_size=6).map("".join)
_names = st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=6)


def _schema_and_value(depth: int = 0):
    """A strategy of (JSON schema, a value valid under it)."""
    leaves = [
        _strings.map(lambda s: ({"type": "string"}, s)),
        st.integers(-(10**6), 10**6).map(lambda n: ({"type": "integer"}, n)),
        st.booleans().map(lambda b: ({"type": "boolean"}, b)),
        # Enum alternatives are literals in the grammar, which writes control characters escaped.
        st.lists(_strings.filter(str.isprintable), min_size=1, max_size=3, unique=True).flatmap(
            lambda options: st.sampled_from(options).map(lambda s: ({"type": "string", "enum": options}, s))
        ),
        st.lists(_strings, max_size=3).map(lambda items: ({"type": "array", "items": {"type": "string"}}, items)),
    ]
    if depth < 2:
        leaves.append(_object(depth + 1))
    return st.one_of(leaves)


def _object(depth: int = 0):
    """A strategy of (object schema, a value valid under it) with every property required."""
    fields = st.dictionaries(_names, st.deferred(lambda: _schema_and_value(depth)), max_size=4)
    return fields.map(
        lambda props: (
            {"type": "object", "properties": {k: s for k, (s, _) in props.items()}, "required": list(props)},
            {k: v for k, (_, v) in props.items()},
        )
    )


@st.composite
def _calls(draw):
    """(tool name, schema, arguments, output text as the grammar would have the model write it)."""
    name = draw(st.sampled_from(["person", "magic_function", "tool.v2", "get_weather"]))
    schema, arguments = draw(_object())
    compact = draw(st.booleans())
    # \u escapes too, except under an enum: its alternatives are literal strings in the grammar.
    escaped = '"enum"' not in json.dumps(schema) and draw(st.booleans())
    body = json.dumps(arguments, ensure_ascii=escaped, separators=(",", ":") if compact else (", ", ": "))
    prefix = draw(st.sampled_from(["", "Let me check. ", "a < b and {x} "]))
    return name, schema, arguments, prefix + call_header(name) + body + CALL_FOOTER


def _accepted(name: str, schema: dict, text: str) -> bool:
    """Whether the "auto" tool-call grammar of one tool with `schema` accepts `text` whole."""
    matcher = xgr.GrammarMatcher(_GRAMMARS.tool_calls([ToolSpec(name, schema)], required=False).compiled)
    return matcher.accept_string(text) and matcher.is_completed()


def _pieces(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(points, points[1:])]


def _streamed(pieces: list[str]) -> tuple[str, list[tuple[str, str]], ToolCallStream]:
    """The text and (name, arguments JSON) of each call that the engine-level splitter streams."""
    stream, text, calls = ToolCallStream(), "", {}
    for piece in [p for delta in pieces for p in stream.feed(delta)] + stream.close():
        if isinstance(piece, str):
            text += piece
        elif piece.id is not None:
            calls[piece.index] = [piece.name, piece.arguments]
        else:
            calls[piece.index][1] += piece.arguments
    return text, [tuple(call) for call in calls.values()], stream


_PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_PROPERTY
@given(call=_calls(), cuts=st.lists(st.integers(0, 10**4), max_size=12))
def test_every_call_the_grammar_allows_round_trips(call, cuts):
    name, schema, arguments, text = call
    assert _accepted(name, schema, text), "the test must only feed output the grammar produces"
    prefix = text[: text.index("<tool_call>")]
    parsed = parse_tool_calls(text)
    assert (parsed.text, [(n, a) for _, n, a in parsed.calls], parsed.invalid) == (
        prefix.strip(),
        [(name, arguments)],
        [],
    )
    assert parsed.ends_with_call
    streamed_text, streamed_calls, stream = _streamed(_pieces(text, cuts))
    assert streamed_text == prefix and [(n, json.loads(a)) for n, a in streamed_calls] == [(name, arguments)]
    assert stream.ends_with_call and not stream.errors


@settings(
    max_examples=max(1, EXAMPLES // 10),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(call=_calls(), cuts=st.lists(st.integers(0, 10**4), max_size=8))
def test_langchain_chunks_and_server_deltas_merge_to_the_call(call, cuts):
    name, _, arguments, text = call
    splitter, merged = langchain_tools.ToolCallStream(), AIMessageChunk(content="")
    output, deltas = Output(with_tools=True), []
    for piece in _pieces(text, cuts):
        deltas += output.feed(piece)
        for chunk in splitter.feed(piece):
            merged += (
                AIMessageChunk(content=chunk)
                if isinstance(chunk, str)
                else AIMessageChunk(content="", tool_call_chunks=[chunk])
            )
    deltas += output.close(SimpleNamespace(finish_reason="stop"))
    assert splitter.close("stop") == []
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(name, arguments)]
    message = merged_message(deltas)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        (name, arguments)
    ]


# The case: a string value that holds the closing tag, which a text search ends the call at.
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
PERSON_OUTPUT = call_header("Person") + '{"name": "}}</tool_call>  # 31", "age": 31}' + CALL_FOOTER


def test_a_closing_tag_inside_a_string_stays_in_the_string():
    assert _accepted("Person", PERSON, PERSON_OUTPUT)
    parsed = parse_tool_calls(PERSON_OUTPUT)
    assert [(n, a) for _, n, a in parsed.calls] == [("Person", {"name": "}}</tool_call>  # 31", "age": 31})]
    assert parsed.text == "" and parsed.invalid == []
    for size in range(1, 8):
        _, calls, _ = _streamed(_pieces(PERSON_OUTPUT, list(range(0, len(PERSON_OUTPUT), size))))
        assert [(n, json.loads(a)) for n, a in calls] == [("Person", {"name": "}}</tool_call>  # 31", "age": 31})]


@pytest.mark.parametrize("end", range(len(call_header("Person")), PERSON_OUTPUT.index(', "age"') + 8))
def test_a_call_cut_inside_its_arguments_is_invalid_and_carries_no_wrapper_text(end):
    parsed = parse_tool_calls(PERSON_OUTPUT[:end])
    assert parsed.calls == [] and not parsed.ends_with_call
    ((_, name, arguments, error),) = parsed.invalid
    assert name == "Person" and error == CUT_OFF
    assert arguments == PERSON_OUTPUT[len(call_header("Person")) : end].strip()  # the arguments so far, nothing else
    assert parsed.text == ""


@pytest.mark.parametrize("end", range(1, len(call_header("Person").rstrip())))
def test_a_call_cut_inside_its_header_is_a_nameless_invalid_call_with_no_text(end):
    parsed = parse_tool_calls("Sure. " + PERSON_OUTPUT[:end])
    if end < len("<tool_call>"):  # not yet a call: the held-back start of the tag ends as text
        assert parsed.text == "Sure. " + PERSON_OUTPUT[:end]
        return
    assert parsed.text == "Sure." and parsed.calls == []
    assert [(name, arguments, error) for _, name, arguments, error in parsed.invalid] == [(None, "", HEADER_CUT_OFF)]


@pytest.mark.parametrize("wrapper_left", range(len(CALL_FOOTER) + 1))
def test_a_call_cut_only_in_its_closing_wrapper_is_complete(wrapper_left):
    text = PERSON_OUTPUT[: len(PERSON_OUTPUT) - wrapper_left]
    parsed = parse_tool_calls(text)
    assert [n for _, n, _ in parsed.calls] == ["Person"] and parsed.invalid == [] and parsed.text == ""
    assert parsed.ends_with_call


def test_tool_call_text_that_is_no_call_stays_text():
    # Chat templates' instructions mention the tags; only a call's header starts a call.
    text = 'Use <tool_call></tool_call> tags: <tool_call>\n{"name": <function-name>}'
    assert parse_tool_calls(text).text == text and parse_tool_calls(text).invalid == []


@pytest.mark.parametrize("end", range(1, len("<tool_call>")))
def test_output_cut_off_in_the_opening_tag_is_a_cut_off_call_not_text(end):
    # In "auto" mode the grammar makes `<tool_call>` the start of a call: cut off inside it, it is no text.
    text = "Sure. " + PERSON_OUTPUT[:end]
    cut = parse_tool_calls(text, cut_off=True)
    assert cut.text == "Sure." and [i[1:] for i in cut.invalid] == [(None, "", HEADER_CUT_OFF)]
    assert parse_tool_calls(text).text == text  # ended on its own (EOS), the text is text
