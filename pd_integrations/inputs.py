"""What one generation is asked: `PromptInput` (the prompt and what PromptDistill should know about it) and
`SamplingParams` (how its tokens are chosen and when it stops), each checked once when built; and `call_inputs` /
`batch_inputs`, the one place where an engine call's keyword arguments become them."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .layout import check_query
from .prompt import document_texts
from .sampling import (
    MAX_LOGIT_BIAS,
    MAX_PENALTY,
    MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS,
    MIN_TEMPERATURE,
    Constraint,
    Penalties,
    Sampler,
)
from .tools import check_tool_format

INPUT_KINDS = ("prompt", "messages", "input_ids")


@dataclass(frozen=True)
class PromptInput:
    """The prompt of one generation: exactly one of `prompt` (raw text), `messages` (chat messages, rendered by
    the model's chat template) or `input_ids`.

    `query` is the question that seeds selection and is never pruned; `documents` are the retrieved texts as they
    appear in the prompt (LangChain `Document`s and LlamaIndex nodes count as their text), the only text then
    pruned (see `pd_integrations.layout` for what is pruned without them). `tools` (OpenAI tool dicts) are
    rendered with `messages`, which may hold tool calls and results, in the chat template or the built-in format
    (`tool_format`: "auto", "template" or "builtin"; see `pd_integrations.tools`); their signatures are never
    pruned. Raises `ValueError`/`TypeError` naming the field; what needs the tokenizer (empty or unknown token
    ids, documents not in the prompt) is checked when the engine renders it.
    """

    prompt: str | None = None
    messages: Sequence[dict] | None = None
    input_ids: Any = None
    query: str | None = None
    documents: Sequence[str] | None = None
    tools: Sequence[dict] | None = None
    tool_format: str = "auto"

    def __post_init__(self) -> None:
        given = [name for name in INPUT_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of prompt, messages or input_ids, got {given or 'none'}")
        check_tool_format(self.tool_format)
        if self.tools and self.messages is None:
            raise ValueError("tools need messages: they are rendered by the chat template")
        check_query(self.query)
        if self.documents is not None:
            object.__setattr__(self, "documents", tuple(document_texts(self.documents)))


@runtime_checkable
class ConstraintFactory(Protocol):
    """What makes a fresh `Constraint` per generation (`pd_integrations.constraints.Grammar`), so that one
    `SamplingParams` serves many rows."""

    def constraint(self) -> Constraint:
        """A fresh constraint for one generation."""


def is_constraint_factory(value: object) -> bool:
    """Whether `value` makes constraints rather than being one: a `constraint()` method and no `mask` (a
    constraint that wraps another under a `constraint` attribute is still a constraint)."""
    return isinstance(value, ConstraintFactory) and not hasattr(value, "mask")


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class SamplingParams:
    """How a generation chooses its tokens and when it stops; each field is checked (and `stop`, `logit_bias`
    normalised) when built, raising `ValueError`/`TypeError` that names it and its allowed values.

    Generation ends at EOS, at a `stop` string (cut from the text) or after `max_new_tokens`. `constraint` (see
    `pd_integrations.sampling.Constraint`) restricts each next token to a grammar and ends generation when its
    output is complete; a `ConstraintFactory` (a compiled `Grammar`) gives each generation its own. The fields'
    `metadata["doc"]` say what each does; the adapters and pd-serve declare their settings from them.
    """

    max_new_tokens: int = field(default=256, metadata=_doc("Most tokens generated per call."))
    temperature: float = field(default=0.0, metadata=_doc("Sampling temperature; 0 decodes greedily."))
    top_p: float = field(default=1.0, metadata=_doc("Nucleus sampling mass when temperature > 0."))
    top_k: int = field(default=0, metadata=_doc("Sample from the top_k most likely tokens only (0 = off)."))
    seed: int | None = field(default=None, metadata=_doc("Seeds sampling (temperature > 0) for reproducible output."))
    stop: str | Sequence[str] = field(default=(), metadata=_doc("Stop strings, cut from the output."))
    frequency_penalty: float = field(
        default=0.0, metadata=_doc("OpenAI's penalty per earlier occurrence in the output, in [-2, 2].")
    )
    presence_penalty: float = field(
        default=0.0, metadata=_doc("OpenAI's penalty on tokens already in the output, in [-2, 2].")
    )
    repetition_penalty: float = field(
        default=1.0, metadata=_doc("transformers' repetition penalty over prompt and output (1 = off).")
    )
    logit_bias: dict[int, float] | None = field(
        default=None, metadata=_doc("Token id -> a number in [-100, 100] added to its logit.")
    )
    logprobs: int | None = field(
        default=None, metadata=_doc("None (off) or how many top alternatives per output token to record, 0-20.")
    )
    constraint: Constraint | ConstraintFactory | None = None

    def __post_init__(self) -> None:
        for name in SAMPLING_SETTINGS:
            object.__setattr__(self, name, check_sampling_field(name, getattr(self, name)))

    @property
    def stops(self) -> list[str]:
        return list(self.stop)

    def penalties(self, vocab_size: int) -> Penalties:
        """The `Penalties` to apply; raises `ValueError` for a `logit_bias` token id outside the vocabulary."""
        for token in self.logit_bias or {}:
            if token >= vocab_size:
                raise ValueError(f"logit_bias keys must be token ids in [0, {vocab_size}), got {token!r}")
        return Penalties(
            float(self.frequency_penalty),
            float(self.presence_penalty),
            float(self.repetition_penalty),
            dict(self.logit_bias or {}),
        )

    def sampler(self, tokenizer, eos_ids: list[int], device) -> Sampler:
        """One generation's sampler under these settings.

        Raises:
            ValueError: a `logit_bias` token id outside the tokenizer's vocabulary.
        """
        return Sampler.create(
            tokenizer,
            eos_ids,
            device,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stops=self.stops,
            constraint=self.new_constraint(),
            penalties=self.penalties(len(tokenizer)),
            logprobs=self.logprobs,
        )

    def new_constraint(self) -> Constraint | None:
        """The constraint of one generation: a fresh one from a factory, else `constraint` itself."""
        if is_constraint_factory(self.constraint):
            return self.constraint.constraint()
        return self.constraint


PROMPT_FIELDS = tuple(f.name for f in dataclasses.fields(PromptInput))
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
# What a front end may declare as a setting: every field but the per-generation constraint.
SAMPLING_SETTINGS = tuple(name for name in SAMPLING_FIELDS if name != "constraint")


# ---------------------------------------------------------------- field checks


def check_sampling_field(name: str, value: Any, label: str | None = None) -> Any:
    """`value` of `SamplingParams` field `name`, checked and normalised; errors name `label` (default `name`)."""
    return _CHECKS[name](value, label or name)


def _is_number(value) -> bool:
    # NaN fails every range comparison that follows; bools are not numbers here.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _max_new_tokens(value, label):
    if not _is_int(value) or value < 1:
        raise ValueError(f"{label} must be an int >= 1, got {value!r}")
    return value


def _temperature(value, label):
    # Below MIN_TEMPERATURE, logits / temperature overflow to inf and sampling breaks.
    if not _is_number(value) or not (value == 0 or MIN_TEMPERATURE <= value <= MAX_TEMPERATURE):
        raise ValueError(
            f"{label} must be 0 (greedy) or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {value!r}"
        )
    return value


def _top_p(value, label):
    if not _is_number(value) or not 0 < value <= 1:
        raise ValueError(f"{label} must be in (0, 1], got {value!r}")
    return value


def _top_k(value, label):
    if not _is_int(value) or value < 0:
        raise ValueError(f"{label} must be an int >= 0 (0 = off), got {value!r}")
    return value


def _seed(value, label):
    if value is not None and (not _is_int(value) or not 0 <= value < 2**63):
        raise ValueError(f"{label} must be None or an int in [0, 2**63), got {value!r}")
    return value


def _stop(value, label):
    stops = (value,) if isinstance(value, str) else value if value is not None else ()
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise TypeError(f"{label} must be a non-empty str or a list of non-empty str, got {value!r}")
    return tuple(stops)


def _penalty(value, label):
    if not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
        raise ValueError(f"{label} must be a number in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value!r}")
    return value


def _repetition_penalty(value, label):
    if not _is_number(value) or not 0 < value < math.inf:
        raise ValueError(f"{label} must be a number > 0 (1 = off), got {value!r}")
    return value


def _logit_bias(value, label):
    """Token ids (ints, or digit strings as JSON sends them) to numbers in [-100, 100]; the vocabulary's bound is
    checked by `SamplingParams.penalties`, which knows the model."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{label} must be a mapping of token ids to numbers in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], "
            f"got {value!r:.100}"
        )
    bias = {}
    for token, number in value.items():
        token_id = int(token) if isinstance(token, str) and token.isdigit() else token
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"{label} keys must be token ids in [0, vocab size), got {token!r}")
        if not _is_number(number) or not -MAX_LOGIT_BIAS <= number <= MAX_LOGIT_BIAS:
            raise ValueError(
                f"{label} values must be numbers in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {number!r} for "
                f"token {token!r}"
            )
        bias[token_id] = float(number)
    return bias


def _logprobs(value, label):
    if value is not None and (not _is_int(value) or not 0 <= value <= MAX_TOP_LOGPROBS):
        raise ValueError(
            f"{label} must be None (off) or an int in [0, {MAX_TOP_LOGPROBS}] (top tokens per token), got {value!r}"
        )
    return value


_CHECKS = {
    "max_new_tokens": _max_new_tokens,
    "temperature": _temperature,
    "top_p": _top_p,
    "top_k": _top_k,
    "seed": _seed,
    "stop": _stop,
    "frequency_penalty": _penalty,
    "presence_penalty": _penalty,
    "repetition_penalty": _repetition_penalty,
    "logit_bias": _logit_bias,
    "logprobs": _logprobs,
}


def sampling_params(values: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> SamplingParams:
    """`SamplingParams(**values)`, whose errors name a field by `labels` (a front end's own name of it, such as
    "max_tokens") where given."""
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as error:
        name = re.match(r"[a-z_]+", str(error))
        if not labels or name is None or name.group() not in labels:
            raise
        raise type(error)(labels[name.group()] + str(error)[name.end() :]) from None


# ---------------------------------------------------------------- an engine call's arguments


def unexpected(owner: str, unknown: list[str], allowed, hints: dict[str, str] | None = None) -> TypeError:
    """A `TypeError` naming each unknown keyword argument with the closest allowed name (or a hint)."""
    allowed = sorted(allowed)
    parts, unexplained = [], False
    for name in unknown:
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = (hints or {}).get(name) or (f"did you mean {close[0]!r}?" if close else "")
        unexplained |= not hint
        parts.append(f"{name!r}" + (f" ({hint})" if hint else ""))
    message = (
        f"{owner} got an unexpected keyword argument {parts[0]}"
        if len(parts) == 1
        else f"{owner} got unexpected keyword arguments {', '.join(parts)}"
    )
    return TypeError(message + (f"; it takes {', '.join(allowed)}" if unexplained else ""))


def _split(owner: str, arguments: dict[str, Any], *groups: Sequence[str]) -> list[dict[str, Any]]:
    """`arguments` split by the names of each group; `TypeError` naming any that is in none."""
    known = [name for group in groups for name in group]
    if unknown := [name for name in arguments if name not in known]:
        raise unexpected(f"{owner}()", unknown, known)
    return [{name: arguments[name] for name in group if name in arguments} for group in groups]


def prompt_input(owner: str, prompt: str | PromptInput | None, arguments: dict[str, Any]) -> PromptInput:
    """`prompt` (raw text, or a `PromptInput` the other `arguments` replace fields of) as a `PromptInput`."""
    (fields,) = _split(owner, arguments, PROMPT_FIELDS[1:])
    if isinstance(prompt, PromptInput):
        return dataclasses.replace(prompt, **fields) if fields else prompt
    return PromptInput(prompt, **fields)


def call_inputs(
    owner: str, prompt: str | PromptInput | None, sampling: SamplingParams | None, arguments: dict[str, Any]
) -> tuple[PromptInput, SamplingParams]:
    """One generation's `PromptInput` and `SamplingParams` from an engine call: `prompt` and `sampling` as
    objects, `arguments` their fields by name (replacing those of the objects). Raises `TypeError` naming an
    unknown argument, and whatever the objects raise for a bad value."""
    prompt_fields, sampling_fields = _split(owner, arguments, PROMPT_FIELDS[1:], SAMPLING_FIELDS)
    return prompt_input(owner, prompt, prompt_fields), _sampling(sampling, sampling_fields)


def _sampling(sampling: SamplingParams | None, fields: dict[str, Any]) -> SamplingParams:
    if sampling is None:
        return SamplingParams(**fields)
    return dataclasses.replace(sampling, **fields) if fields else sampling


# A batch call's per-row arguments, by the `PromptInput` field each row's entry becomes.
_BATCH_INPUTS = {"prompts": "prompt", "messages": "messages", "input_ids": "input_ids"}
_PER_ROW = {"queries": "query", "documents": "documents", "tools": "tools"}


def batch_inputs(
    owner: str, prompts: list | None, sampling: SamplingParams | None, arguments: dict[str, Any]
) -> list[tuple[PromptInput, SamplingParams]]:
    """Per row, the `PromptInput` and `SamplingParams` of a batched engine call: `prompts` a list of texts or of
    `PromptInput`s; the other inputs (`messages`, `input_ids`) and `queries`, `documents`, `tools` and
    `constraints` per-row lists; `tool_format`, `sampling` and the sampling fields shared. Raises naming the
    parameter (and the row) for a missing or mixed input kind, an empty list, per-row lists of another length,
    or one `Constraint` object shared by several rows (pass a `ConstraintFactory`, or `constraints=`)."""
    inputs, per_row, shared, sampling_fields = _split(
        owner,
        {"prompts": prompts, **arguments},
        _BATCH_INPUTS,
        (*_PER_ROW, "constraints"),
        ("tool_format",),
        SAMPLING_FIELDS,
    )
    constraints = per_row.pop("constraints", None)
    if prompts and all(isinstance(prompt, PromptInput) for prompt in prompts):
        given = {**inputs, **per_row, **shared, "prompts": None}
        if others := sorted(name for name, value in given.items() if value is not None):
            raise TypeError(f"{owner}() got PromptInputs and {others}; give those in the PromptInputs")
        kind, rows = "prompts", None
    else:
        kind, rows = _rows(inputs, per_row)
    count = len(prompts) if rows is None else len(rows)
    constraints = _column("constraints", constraints, kind, count)
    sampling = _sampling(sampling, sampling_fields)
    if count > 1 and sampling.constraint is not None and not is_constraint_factory(sampling.constraint):
        raise ValueError("constraint is one generation's: pass a Grammar (a constraint per row) or constraints=[...]")
    batch = []
    for i, constraint in enumerate(constraints):
        try:
            prompt = prompts[i] if rows is None else PromptInput(**rows[i], **shared)
            row_sampling = sampling if constraint is None else dataclasses.replace(sampling, constraint=constraint)
        except (ValueError, TypeError) as error:
            raise type(error)(f"row {i}: {error}") from error
        batch.append((prompt, row_sampling))
    return batch


def _rows(inputs: dict[str, Any], per_row: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The input kind given and each row's `PromptInput` fields."""
    given = [(kind, value) for kind, value in inputs.items() if value is not None]
    if len(given) != 1:
        raise ValueError(
            f"pass exactly one of {', '.join(_BATCH_INPUTS)} (a list, one entry per row); "
            f"got {', '.join(kind for kind, _ in given) or 'none'}"
        )
    kind, values = given[0]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not len(values):
        raise ValueError(f"{kind} must be a non-empty list with one entry per row, got {values!r:.80}")
    rows = [{_BATCH_INPUTS[kind]: value} for value in values]
    for name, column in per_row.items():
        for row, value in zip(rows, _column(name, column, kind, len(rows))):
            row[_PER_ROW[name]] = value
    return kind, rows


def _column(name: str, values, kind: str, count: int) -> list:
    """A per-row argument as a list of `count` entries (None: None for each row)."""
    if values is None:
        return [None] * count
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != count:
        raise ValueError(
            f"{name} must be None or a list with one entry per row of {kind} ({count}), got {values!r:.80}"
        )
    return list(values)
