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
tokens: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

try:
    import xgrammar as xgr
except ImportError:  # the optional `structured` extra; `Grammars.of` says how to install it
    xgr = None

__all__ = ["Grammar", "GrammarConstraint", "Grammars", "ParsedToolCalls", "ToolSpec", "TOOL_CALL_BEGIN",
           "TOOL_CALL_END", "new_tool_call_id", "parse_tool_calls"]

TOOL_CALL_BEGIN = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# Small models left free to place whitespace in JSON can emit it until max_tokens runs out; one space or newline
# between tokens is all that readable JSON needs.
_MAX_WHITESPACE = 1


class GrammarConstraint:
    """The `sampling.Constraint` of one generation over a compiled grammar: its matcher holds the state, so each
    generation (each batch row) needs its own, from `Grammar.constraint()`."""

    def __init__(self, compiled: xgr.CompiledGrammar):
        self._matcher = xgr.GrammarMatcher(compiled)
        self._vocab_size = compiled.tokenizer_info.vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, self._vocab_size)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()  # may be a view of the engine's logits (a batch row): mask a copy, never theirs
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
            raise ImportError("structured output and tool calling need xgrammar: pip install "
                              "'pd-integrations[structured]'")
        width = engine.model.get_output_embeddings().weight.shape[0]
        return cls(_compiler(engine.tokenizer, width, tuple(engine.runtime.eos_ids)))

    def json_schema(self, schema: dict[str, Any] | str, *, what: str = "schema") -> Grammar:
        """Output that is one JSON value valid under `schema` (a JSON schema, as a dict or a JSON string)."""
        text = schema if isinstance(schema, str) else _dumps(schema, what)
        return Grammar(self._compile(what, lambda: self._compiler.compile_json_schema(
            text, any_whitespace=False, strict_mode=True)), what)

    def json_object(self) -> Grammar:
        """Output that is one JSON object, of any shape (OpenAI's and LangChain's "JSON mode")."""
        return self.json_schema({"type": "object"}, what="JSON mode")

    def regex(self, pattern: str) -> Grammar:
        """Output that matches the regular expression `pattern` in full."""
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"regex must be a non-empty str, got {pattern!r}")
        return Grammar(self._compile(f"regex {pattern!r}", lambda: self._compiler.compile_regex(pattern)),
                       f"regex {pattern!r}")

    def tool_calls(self, tools: Sequence[ToolSpec], *, required: bool, parallel: bool = False) -> Grammar:
        """Tool calls of `tools` in the `<tool_call>` format, each call's arguments valid under its tool's schema.

        `required`: the output is calls and nothing else; otherwise free text in which each `<tool_call>` the
        model starts must be a valid call ("auto"). `parallel`: more than one call per turn; off, the output ends
        after the first call (small models otherwise tend to repeat a call until max_tokens).
        """
        if not tools:
            raise ValueError("tools is empty: a tool-call grammar needs at least one tool")
        tags = []
        for tool in tools:
            # Each tool compiles on its own first, so that a bad schema's error names its tool.
            self.json_schema(tool.parameters, what=f"tool {tool.name!r}'s parameters")
            tags.append({"type": "tag", "begin": f'{TOOL_CALL_BEGIN}\n{{"name": {json.dumps(tool.name)}, '
                                                 f'"arguments": ',
                         "content": {"type": "json_schema", "json_schema": tool.parameters,
                                     "max_whitespace_cnt": _MAX_WHITESPACE},
                         "end": f"}}\n{TOOL_CALL_END}"})
        if required:
            structure = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
                         "stop_after_first": not parallel}
        else:
            structure = {"type": "triggered_tags", "triggers": [TOOL_CALL_BEGIN], "tags": tags,
                         "stop_after_first": not parallel}
        what = "tool calls of " + ", ".join(repr(tool.name) for tool in tools)
        return Grammar(self._compile(what, lambda: self._compiler.compile_structural_tag(
            {"type": "structural_tag", "format": structure})), what)

    @staticmethod
    def _compile(what: str, compile_) -> xgr.CompiledGrammar:
        try:
            return compile_()
        except (RuntimeError, ValueError, TypeError) as error:  # xgrammar reports bad schemas as RuntimeError
            raise ValueError(f"{what} cannot be compiled into a grammar: {error}") from None


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
    """Model output split into its text and its tool calls: `calls` as (id, name, arguments) for each complete,
    parseable call, `invalid` as (id, raw text, error) for a call that is not (cut off at max_tokens, say)."""

    text: str
    calls: list[tuple[str, str, dict[str, Any]]]
    invalid: list[tuple[str, str, str]]


def new_tool_call_id() -> str:
    """A fresh id for a tool call, in OpenAI's "call_..." shape (tool results refer to their call by it)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(output: str) -> ParsedToolCalls:
    """Split `output` into text and `<tool_call>` blocks (see `Grammars.tool_calls`)."""
    text, calls, invalid = [], [], []
    rest = output
    while (start := rest.find(TOOL_CALL_BEGIN)) >= 0:
        text.append(rest[:start])
        rest = rest[start + len(TOOL_CALL_BEGIN):]
        end = rest.find(TOOL_CALL_END)
        body, rest = (rest, "") if end < 0 else (rest[:end], rest[end + len(TOOL_CALL_END):])
        call_id = new_tool_call_id()
        try:
            call = json.loads(body)
            if end < 0:
                raise ValueError(f"no closing {TOOL_CALL_END}")
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                    and isinstance(call.get("arguments", {}), dict)):
                raise ValueError('a call is {"name": str, "arguments": object}')
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            invalid.append((call_id, body.strip(), f"unparseable tool call: {error}"))
            continue
        calls.append((call_id, call["name"], call.get("arguments", {})))
    text.append(rest)
    return ParsedToolCalls("".join(text).strip(), calls, invalid)
