"""Grammar-constrained decoding: output that follows a JSON schema, a regex or a tool-call format by construction.

`Grammars.of(engine)` compiles grammars for one model's tokenizer (compilers are cached per tokenizer, compiled
grammars by content); each `Grammar.constraint()` is a fresh `GrammarConstraint` for one generation, the
`pd_integrations.sampling.Constraint` that `engine.stream(..., constraint=...)` takes. At each decode step it
masks every token the grammar forbids next, so even a 135M model returns parseable JSON.

Library: xgrammar, chosen by measurement against outlines-core and lm-format-enforcer
(`python -m pd_integrations.bench.structured --compare-libraries`): the SmolLM2-135M tokenizer (49k tokens), CPU,
a 4-field JSON schema, the next-token mask computed and applied along a 35-token output, the libraries alternating
on a 2-core machine under a load average of ~10 (best / median ms per token):

- xgrammar 0.2.8: 0.9 / 24 ms (filling the bitmask itself takes ~0.01 ms; applying it to 49k logits the rest);
  compiles the schema in ~30 ms after a one-off 0.9 s tokenizer scan; full JSON Schema, regex, EBNF, and
  structural tags, which express tool calls ("free text, then a call whose arguments follow its tool's schema");
  CPU and CUDA kernels; works with transformers 5.
- outlines-core 0.2.14: 2.1 / 36 ms; a ~250 ms regex index per schema after a 3 s vocabulary scan; JSON schema
  and regex only, no tool-call structure.
- lm-format-enforcer 0.11.3: 24 / 67 ms (pure Python); its transformers integration does not import under
  transformers 5 (`transformers.tokenization_utils` is gone; the comparison aliases it).

Tool calls use the Hermes/Qwen text format, which many open models are trained on and which needs no special
tokens: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call. `ToolCallStream`
and `parse_tool_calls` split output into text and calls by that structure: a call's arguments end where their
JSON value ends, whatever their strings hold.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import regex
import torch

try:
    import xgrammar as xgr
except ImportError:  # the optional `structured` extra; `Grammars.of` says how to install it
    xgr = None

__all__ = [
    "CALL_FOOTER",
    "CUT_OFF",
    "CallDelta",
    "Grammar",
    "GrammarConstraint",
    "Grammars",
    "HEADER_CUT_OFF",
    "ParsedToolCalls",
    "ToolCallStream",
    "ToolSpec",
    "TOOL_CALL_BEGIN",
    "TOOL_CALL_END",
    "call_header",
    "new_tool_call_id",
    "parse_tool_calls",
    "tool_finish_reason",
]

TOOL_CALL_BEGIN = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# Small models left free to place whitespace in JSON can emit it until max_tokens runs out; one space or newline
# between tokens is all that readable JSON needs.
_MAX_WHITESPACE = 1


# The wrapper the tool-call grammar forces around a call's arguments. The header is written as models are trained
# to (and the built-in prompt shows): compacted to `<tool_call>{"name":"f","arguments":` it saves 4 tokens of
# SmolLM2's tokenizer but the default model then got 3 of 4 `magic_function(x)` arguments wrong (1 for 3 and 7),
# against 4 of 4 spaced. The footer is compact (`}</tool_call>`, 6 tokens against 7), and it costs nothing when
# max_tokens cuts it: a call is complete once its arguments' JSON is (see `ToolCallStream`).
CALL_FOOTER = "}" + TOOL_CALL_END


def call_header(name: str) -> str:
    """What the tool-call grammar writes before the arguments of a call of `name`."""
    return f'{TOOL_CALL_BEGIN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '


class GrammarConstraint:
    """The `sampling.Constraint` of one generation over a compiled grammar: its matcher holds the state, so each
    generation (each sequence of a batch) needs its own, from `Grammar.constraint()`."""

    def __init__(self, compiled: xgr.CompiledGrammar):
        self._matcher = xgr.GrammarMatcher(compiled)
        self._vocab_size = compiled.tokenizer_info.vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, self._vocab_size)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        scores = (
            scores.clone()
        )  # may be a view of the engine's logits (one sequence of a batch): mask a copy, never theirs
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bitmask = self._bitmask.to(scores.device, non_blocking=True)
        # The tokenizer info was built for the model's output width: ids past the tokenizer's vocabulary (an
        # embedding padded to a multiple of 64, say) have no text, and the bitmask forbids them.
        xgr.apply_token_bitmask_inplace(scores, bitmask, vocab_size=self._vocab_size)
        return scores

    def advance(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"token {token} is not allowed by the grammar; it was chosen from unmasked scores")

    def is_finished(self) -> bool:
        return self._matcher.is_terminated()


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar, reusable across generations; `what` describes it in error messages."""

    compiled: xgr.CompiledGrammar
    what: str

    def constraint(self) -> GrammarConstraint:
        """A fresh constraint for one generation."""
        return GrammarConstraint(self.compiled)


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call: its name and the JSON schema of its arguments (an object schema)."""

    name: str
    parameters: dict[str, Any]


class Grammars:
    """Compiles output grammars for one tokenizer and stop tokens; build it with `Grammars.of(engine)`.

    Each method raises `ValueError` naming the schema, pattern or tool the compiler cannot handle.
    """

    def __init__(self, compiler: xgr.GrammarCompiler):
        self._compiler = compiler

    @classmethod
    def of(cls, engine) -> Grammars:
        """The grammars of `engine`'s model: its tokenizer, output width and end-of-sequence tokens (a grammar's
        output ends with one of them, as the engine's decode loop does)."""
        if xgr is None:
            raise ImportError(
                "structured output and tool calling need xgrammar: pip install 'pd-integrations[structured]'"
            )
        width = engine.model.get_output_embeddings().weight.shape[0]
        return cls(_compiler(engine.tokenizer, width, tuple(engine.runtime.eos_ids)))

    def json_schema(self, schema: dict[str, Any] | str, *, what: str = "schema") -> Grammar:
        """Output that is one JSON value valid under `schema` (a JSON schema, as a dict or a JSON string)."""
        text = schema if isinstance(schema, str) else _dumps(schema, what)
        return Grammar(
            self._compile(
                what, lambda: self._compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
            ),
            what,
        )

    def json_object(self) -> Grammar:
        """Output that is one JSON object, of any shape (OpenAI's and LangChain's "JSON mode")."""
        return self.json_schema({"type": "object"}, what="JSON mode")

    def regex(self, pattern: str) -> Grammar:
        """Output that matches the regular expression `pattern` in full."""
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"regex must be a non-empty str, got {pattern!r}")
        return Grammar(
            self._compile(f"regex {pattern!r}", lambda: self._compiler.compile_regex(pattern)), f"regex {pattern!r}"
        )

    def tool_calls(
        self,
        tools: Sequence[ToolSpec],
        *,
        required: bool,
        parallel: bool = False,
        reply_schema: dict[str, Any] | None = None,
    ) -> Grammar:
        """Tool calls of `tools` in the `<tool_call>` format, each call's arguments valid under its tool's schema.

        `required`: the output is calls and nothing else; otherwise free text in which each `<tool_call>` the
        model starts must be a valid call ("auto"), or, with `reply_schema`, either calls or one JSON value valid
        under it (OpenAI's tools with `response_format`). `parallel`: more than one call per turn; off, the output
        ends after the first call (small models otherwise tend to repeat a call until max_tokens).
        """
        if not tools:
            raise ValueError("tools is empty: a tool-call grammar needs at least one tool")
        for tool in tools:
            # Each tool compiles on its own first, so that a bad schema's error names its tool.
            self.json_schema(tool.parameters, what=f"tool {tool.name!r}'s parameters")
        structure = _tool_call_structure(
            [_tool_tag(tool) for tool in tools], required=required, parallel=parallel, reply_schema=reply_schema
        )
        what = "tool calls of " + ", ".join(repr(tool.name) for tool in tools)
        return Grammar(
            self._compile(
                what, lambda: self._compiler.compile_structural_tag({"type": "structural_tag", "format": structure})
            ),
            what,
        )

    @staticmethod
    def _compile(what: str, compile_) -> xgr.CompiledGrammar:
        try:
            return compile_()
        except (RuntimeError, ValueError, TypeError) as error:  # xgrammar reports bad schemas as RuntimeError
            raise ValueError(f"{what} cannot be compiled into a grammar: {error}") from None


def _tool_tag(tool: ToolSpec) -> dict[str, Any]:
    """The structural tag of one call of `tool`: its header, arguments valid under its schema, the footer."""
    return {
        "type": "tag",
        "begin": call_header(tool.name),
        "content": {
            "type": "json_schema",
            "json_schema": tool.parameters,
            "max_whitespace_cnt": _MAX_WHITESPACE,
        },
        "end": CALL_FOOTER,
    }


def _tool_call_structure(
    tags: list[dict[str, Any]], *, required: bool, parallel: bool, reply_schema: dict[str, Any] | None
) -> dict[str, Any]:
    """The structural-tag format of `Grammars.tool_calls` (same arguments) for the tags of its tools."""
    calls = {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": "\n",
        "at_least_one": True,
        "stop_after_first": not parallel,
    }
    if required:
        return calls
    if reply_schema is not None:
        # Either calls or one reply under the schema (OpenAI's tools with response_format).
        return {
            "type": "or",
            "elements": [
                calls,
                {"type": "json_schema", "json_schema": reply_schema, "max_whitespace_cnt": _MAX_WHITESPACE},
            ],
        }
    # "auto": free text, each call the model starts with the trigger must then be a valid call.
    return {
        "type": "triggered_tags",
        "triggers": [TOOL_CALL_BEGIN],
        "tags": tags,
        "stop_after_first": not parallel,
    }


@functools.lru_cache(maxsize=8)
def _compiler(tokenizer, vocab_size: int, stop_ids: tuple[int, ...]) -> xgr.GrammarCompiler:
    # Building the tokenizer info walks the vocabulary (~1 s for 49k tokens): once per model; the compiler then
    # caches each compiled grammar by its content.
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
    return xgr.GrammarCompiler(info)


def _dumps(schema: Any, what: str) -> str:
    if not isinstance(schema, dict):
        raise ValueError(f"{what} must be a JSON schema (a dict), got {type(schema).__name__}")
    try:
        return json.dumps(schema)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} is not JSON-serialisable: {error}") from None


@dataclass(frozen=True)
class ParsedToolCalls:
    """Model output split into its text and its tool calls: `calls` as (id, name, arguments) for each complete
    call, `invalid` as (id, name or None, the arguments' text so far, error) for a call that is not (cut off at
    max_tokens, say); `ends_with_call` whether the output ends with a complete call (what follows its arguments
    is at most the wrapper)."""

    text: str
    calls: list[tuple[str, str, dict[str, Any]]]
    invalid: list[tuple[str, str | None, str, str]]
    ends_with_call: bool = False


def new_tool_call_id() -> str:
    """A fresh id for a tool call, in OpenAI's "call_..." shape (tool results refer to their call by it)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(output: str, *, cut_off: bool = False) -> ParsedToolCalls:
    """Split `output` into text and `<tool_call>` blocks (see `Grammars.tool_calls`): `ToolCallStream` over the
    whole text, so that parsed and streamed output agree by construction. `cut_off`: the output ended at
    max_tokens (see `ToolCallStream.close`)."""
    stream = ToolCallStream()
    pieces = stream.feed(output) + stream.close(cut_off=cut_off)
    text = "".join(piece for piece in pieces if isinstance(piece, str))
    calls: dict[int, list] = {}
    for piece in pieces:
        if isinstance(piece, CallDelta):
            if piece.id is not None:
                calls[piece.index] = [piece.id, piece.name, ""]
            calls[piece.index][2] += piece.arguments
    parsed, invalid = [], []
    for index, (call_id, name, arguments) in calls.items():
        error = stream.errors.get(index)
        if error is None:
            try:
                parsed.append((call_id, name, json.loads(arguments)))
                continue
            except ValueError as decode_error:  # json.JSONDecodeError; not from a grammar's output
                error = f"the arguments are not JSON: {decode_error}"
        invalid.append((call_id, name, arguments.strip(), error))
    return ParsedToolCalls(text.strip(), parsed, invalid, stream.ends_with_call)


def tool_finish_reason(finish_reason: str, calls: int, ends_with_call: bool) -> str:
    """OpenAI's finish reason of output parsed for tool calls: "tool_calls" when it holds `calls` and ends with a
    complete one, also when max_tokens cut only the wrapper after its arguments; else the engine's
    `finish_reason` ("length" for a call cut off inside its arguments)."""
    return "tool_calls" if calls and ends_with_call else finish_reason


@dataclass(frozen=True)
class CallDelta:
    """A piece of a streamed tool call, as OpenAI and LangChain stream them: the call's first delta has its `id`
    and `name` (and empty `arguments`), later ones only fragments of its `arguments` JSON. A call cut off before
    its name was complete comes as one delta with `id`, `name` None and empty `arguments`."""

    index: int
    id: str | None
    name: str | None
    arguments: str


# The errors of calls that did not complete: a grammar's output ends inside a call only at max_tokens or a stop string.
CUT_OFF = (
    "cut off: the output ended inside the tool call (max_tokens or a stop string) before its arguments were complete"
)
HEADER_CUT_OFF = (
    "cut off: the output ended inside the tool call (max_tokens or a stop string) before its name was complete"
)


class ToolCallStream:
    """Splits streamed output into text deltas and `CallDelta`s by the structure the tool-call grammar writes,
    never by searching for the closing tag: a call's first delta as soon as its header (`{"name": ...,
    "arguments":`) is complete, then its arguments' JSON in fragments up to the character where that JSON value
    ends (found by tracking strings, escapes and nesting, so `}</tool_call>` inside a string stays in the string),
    then the wrapper's `}` and `</tool_call>`, which are no one's text. Text that may be the start of
    `<tool_call>` is held back until known. `errors` maps the index of each call that did not complete to why."""

    def __init__(self):
        self._buffer = ""
        self._state = "text"  # "text", "header", "arguments", "close" (the wrapper's "}") or "end" (the end tag)
        self._index = -1
        self._after_call = False
        self._json = _JsonEnd()
        self.errors: dict[int, str] = {}

    @property
    def calls(self) -> int:
        """How many calls have started so far."""
        return self._index + 1

    @property
    def ends_with_call(self) -> bool:
        """Whether the output so far ends with a complete call: its arguments are complete and at most the
        wrapper and the newline that separates calls follow (every call before it complete too)."""
        wrapper = self._state in ("close", "end") or (self._state == "text" and self._after_call)
        return self.calls > 0 and not self.errors and wrapper

    def feed(self, delta: str) -> list[str | CallDelta]:
        """The text deltas and call deltas that `delta` completes."""
        self._buffer += delta
        out: list[str | CallDelta] = []
        while self._step(out):
            pass
        return [piece for piece in out if piece]

    def close(self, *, cut_off: bool = False) -> list[str | CallDelta]:
        """What is left once the output has ended: held-back text, or the record of a call cut off (at
        max_tokens): a nameless call for one cut off in its header, an error in `errors` for either. `cut_off`:
        the output ended at max_tokens, so held-back text that begins `<tool_call>` was a call's start, not text."""
        rest, self._buffer = self._buffer, ""
        if self._state == "text" and not (cut_off and rest):
            return [rest] if rest else []
        if self._state in ("text", "header"):
            self._index += 1
            self.errors[self._index] = HEADER_CUT_OFF
            return [CallDelta(self._index, new_tool_call_id(), None, "")]
        if self._state == "arguments":
            self.errors[self._index] = CUT_OFF
        return []  # in "close" or "end" the arguments were complete; the rest is the wrapper

    def _step(self, out: list) -> bool:
        """Consume what the buffer allows in the current state; whether the state changed (step again)."""
        return getattr(self, "_in_" + self._state)(out)

    def _in_text(self, out: list) -> bool:
        if self._after_call:  # the newline that separates calls is not text
            self._buffer = self._buffer.lstrip("\n")
            self._after_call = not self._buffer
        start = self._buffer.find(TOOL_CALL_BEGIN)
        if start >= 0:
            out.append(self._buffer[:start])
            self._buffer, self._state = self._buffer[start + len(TOOL_CALL_BEGIN) :], "header"
            return True
        held = _prefix_held(self._buffer, TOOL_CALL_BEGIN)
        out.append(self._buffer[: len(self._buffer) - held])
        self._buffer = self._buffer[len(self._buffer) - held :]
        return False

    def _in_header(self, out: list) -> bool:
        header = _CALL_HEADER.match(self._buffer, partial=True)
        if header is None:  # `<tool_call>` in text that is no call (a template's instructions): it is text
            out.append(TOOL_CALL_BEGIN)
            self._state = "text"
            return True
        if header.partial:
            return False
        self._index += 1
        out.append(CallDelta(self._index, new_tool_call_id(), json.loads(header.group(1)), ""))
        self._buffer, self._state, self._json = self._buffer[header.end() :], "arguments", _JsonEnd()
        return True

    def _in_arguments(self, out: list) -> bool:
        if not self._json.started:  # the space the grammar allows before the arguments is not part of them
            self._buffer = self._buffer.lstrip()
        try:
            end = self._json.scan(self._buffer)
        except ValueError as error:  # not from a grammar's output: the call is broken, the rest is text
            self.errors[self._index] = str(error)
            self._state, self._after_call = "text", True
            return True
        arguments, self._buffer = self._buffer[:end], self._buffer[end:]
        if arguments:
            out.append(CallDelta(self._index, None, None, arguments))
        if self._json.done:
            self._state = "close"
            return True
        return False

    def _in_close(self, out: list) -> bool:
        self._buffer = self._buffer.lstrip()
        if not self._buffer:
            return False
        if self._buffer[0] == "}":
            self._buffer = self._buffer[1:]
            self._state = "end"
        else:  # not from a grammar's output: the call is complete, what follows is text
            self._state, self._after_call = "text", True
        return True

    def _in_end(self, out: list) -> bool:
        self._buffer = self._buffer.lstrip()
        if len(self._buffer) < len(TOOL_CALL_END) and TOOL_CALL_END.startswith(self._buffer):
            return False  # the end tag, still arriving (or nothing yet)
        if self._buffer.startswith(TOOL_CALL_END):
            self._buffer = self._buffer[len(TOOL_CALL_END) :]
        self._state, self._after_call = "text", True
        return True


class _JsonEnd:
    """Finds where one JSON object ends in text that arrives in pieces, by the JSON grammar's own state: inside a
    string or not, after a backslash or not, and how deep the nesting is."""

    def __init__(self):
        self.depth, self.in_string, self.escaped, self.started, self.done = 0, False, False, False, False

    def scan(self, text: str) -> int:
        """How much of `text` belongs to the object: all of it, or up to and including its closing brace (then
        `done`). Raises `ValueError` when the text is not an object."""
        for i, char in enumerate(text):
            if not self.started:
                if char.isspace():
                    continue
                if char != "{":
                    raise ValueError(f"the arguments are not a JSON object: they start with {char!r}")
                self.started = True
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


def _prefix_held(text: str, tag: str) -> int:
    """The length of the longest end of `text` that may still grow into `tag`."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


# The header the tool-call grammar writes before a call's arguments (see `Grammars.tool_calls`), in its compact form
# or spaced as chat templates and `tool_call_block` write it. `regex` (a transformers dependency) for its partial
# matches: a header still arriving is told apart from text that can never become one.
_CALL_HEADER = regex.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:')
