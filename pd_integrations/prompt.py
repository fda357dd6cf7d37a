"""Rendering the input to tokens with character offsets, and locating chat messages and retrieved documents in
the rendered text."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from .tools import builtin_messages, check_tool_format, check_tools, has_tool_messages, resolve_tool_format


@dataclass(frozen=True)
class MessageRange:
    """Where one chat message's content lies in the rendered text."""

    role: str
    start: int
    end: int


@dataclass(frozen=True)
class RenderedPrompt:
    """The prompt as the model sees it: `text` with per-token character `offsets` (both None for raw ids that
    don't round-trip through the tokenizer), where each chat message's content lies in `text` (for `messages`
    input), the character ranges of the caller's retrieved documents in `text`, if given, and whether the caller
    passed token ids (`from_ids`) rather than text. With tools, `tools_range` is where their signatures lie in
    `text` (never pruned), `tool_result_ranges` where the tool messages' results lie (pruned only when the caller
    names them as documents) and `tool_format` how tools and tool messages were rendered ("template" or
    "builtin", see `pd_integrations.tools`)."""

    input_ids: list[int]
    text: str | None
    offsets: list[tuple[int, int]] | None
    message_ranges: tuple[MessageRange, ...] | None = None
    document_ranges: tuple[tuple[int, int], ...] | None = None
    from_ids: bool = False
    tools_range: tuple[int, int] | None = None
    tool_result_ranges: tuple[tuple[int, int], ...] = ()
    tool_format: str | None = None

    @property
    def last_user_start(self) -> int | None:
        """Where the last user message's content starts in `text`, if the prompt came from messages."""
        starts = [m.start for m in self.message_ranges or () if m.role == "user"]
        return starts[-1] if starts else None

    def with_documents(self, documents: list[str]) -> RenderedPrompt:
        """This prompt with the ranges of `documents` (see `document_texts`), which appear verbatim in it, in order.

        Raises `ValueError` naming the first document that is empty or not found, or when there is no text.
        """
        texts = document_texts(documents)
        if not texts:
            raise ValueError("documents is empty: name at least one retrieved text, or pass None")
        if self.text is None:
            raise ValueError("documents need a prompt or messages: these input_ids don't round-trip to text")
        ranges = locate_documents(self.text, texts)
        missing = [i for i, r in enumerate(ranges) if r is None]
        if missing:
            raise ValueError(
                f"documents[{missing[0]}] is empty or does not appear verbatim in the rendered prompt "
                f"(apart from the other documents); pass the retrieved texts exactly as they were "
                f"inserted"
            )
        return dataclasses.replace(self, document_ranges=tuple(ranges))

    def char_spans(self, token_indices: torch.Tensor) -> list[tuple[int, int]]:
        """Merged `(start, end)` character spans of runs of consecutive kept tokens (empty without offsets)."""
        if self.offsets is None or token_indices.numel() == 0:
            return []
        indices = token_indices.tolist()
        run_starts = [0] + [k for k in range(1, len(indices)) if indices[k] != indices[k - 1] + 1]
        run_ends = run_starts[1:] + [len(indices)]
        return [(self.offsets[indices[a]][0], self.offsets[indices[b - 1]][1]) for a, b in zip(run_starts, run_ends)]

    def word_starts(self) -> torch.Tensor:
        """Per token, its first non-whitespace character (its start for whitespace-only tokens). Tokenizers attach
        the space before a word to the word, which would otherwise put a document's first word in the unit before
        it."""
        starts, ends = torch.tensor(self.offsets, dtype=torch.long).T
        # UTF-32 gives one code point per character, so positions match the offsets.
        codes = torch.from_numpy(np.frombuffer(self.text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64))
        length = codes.shape[0]
        text_at = torch.where(torch.isin(codes, _WHITESPACE), length, torch.arange(length))
        next_text = text_at.flip(0).cummin(0).values.flip(0)  # first non-whitespace character at or after each
        first = next_text[starts.clamp(max=length - 1)]
        return torch.where(first < ends, first, starts)


def document_texts(documents) -> list[str]:
    """`documents` as a list of texts: str items as they are, LangChain `Document`s as their `page_content`,
    LlamaIndex nodes (and `NodeWithScore`s) as their `get_content()`. Raises `TypeError` naming `documents` for
    anything else."""
    if not isinstance(documents, (list, tuple)):
        raise TypeError(
            f"documents must be a list of str (the retrieved texts), LangChain Documents or LlamaIndex "
            f"nodes, got {type(documents).__name__}"
        )
    return [_document_text(document) for document in documents]


def _document_text(document) -> str:
    # Duck-typed, so that the engine imports neither framework.
    text = document
    if isinstance(getattr(document, "page_content", None), str):
        text = document.page_content
    elif callable(getattr(document, "get_content", None)):
        text = document.get_content()
    if not isinstance(text, str):
        raise TypeError(
            f"documents must be a list of str (the retrieved texts), LangChain Documents or LlamaIndex "
            f"nodes, got an item of type {type(document).__name__}"
        )
    return text


def locate_documents(text: str, documents: list[str]) -> list[tuple[int, int] | None]:
    """Character range of each document (stripped) in `text`: its first occurrence after the previous document
    found, else its first anywhere that overlaps no document found so far; None for a document that doesn't
    appear verbatim (or only inside others)."""
    ranges: list[tuple[int, int] | None] = []
    cursor = 0
    for document in documents:
        needle = document.strip()
        found = None
        for start in (cursor, 0) if needle else ():
            at = text.find(needle, start)
            while at >= 0 and any(a < at + len(needle) and at < b for a, b in filter(None, ranges)):
                at = text.find(needle, at + 1)
            if at >= 0:
                found = (at, at + len(needle))
                break
        ranges.append(found)
        cursor = found[1] if found else cursor
    return ranges


def kept_shares(ranges: list[tuple[int, int] | None], kept_char_spans: list[tuple[int, int]]) -> list[float | None]:
    """Share of each character range (None stays None) that lies in the kept spans."""
    return [
        None if r is None else sum(max(0, min(r[1], b) - max(r[0], a)) for a, b in kept_char_spans) / (r[1] - r[0])
        for r in ranges
    ]


# Code points Python's str.isspace() counts as whitespace (all lie below U+3001).
_WHITESPACE = torch.tensor([c for c in range(0x3001) if chr(c).isspace()])


def render(
    tokenizer,
    prompt: str | None,
    messages: list | None,
    input_ids,
    tools: list | None = None,
    tool_format: str = "auto",
) -> RenderedPrompt:
    """Tokenize exactly one of `prompt` (raw text), `messages` (via the chat template) or `input_ids`.

    `tools` (OpenAI tool dicts) go with `messages`, which may then also hold tool calls and results (see
    `pd_integrations.tools` for their shape and for `tool_format`: "auto", "template" or "builtin").

    Raises `ValueError` when none or several are given, or the input is empty. `input_ids` must be a flat list
    (or tuple) of ints, or a 1-D (or [1, n]) integer tensor or array, every id in [0, `len(tokenizer)`); else
    `TypeError` (wrong type) or `ValueError` (wrong shape or id) naming `input_ids`, before any model work.
    `ValueError` for tools without messages, malformed tool calls, and `tool_format="template"` with a chat
    template that does not support tools.
    """
    given = [
        name
        for name, value in (("prompt", prompt), ("messages", messages), ("input_ids", input_ids))
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of prompt, messages or input_ids, got {given or 'none'}")
    check_tool_format(tool_format)
    if tools and messages is None:
        raise ValueError("tools need messages: they are rendered by the chat template")
    if prompt is not None:
        return _render_prompt(tokenizer, prompt)
    if messages is not None:
        return _render_messages(tokenizer, messages, tools, tool_format)
    return _render_ids(tokenizer, input_ids)


def _render_prompt(tokenizer, prompt) -> RenderedPrompt:
    """Raw text `prompt`, checked, tokenized with the tokenizer's special tokens (BOS and the like)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty")
    check_text("prompt", prompt)
    return _tokenize(tokenizer, prompt, add_special_tokens=True)


def _render_messages(tokenizer, messages, tools: list | None, tool_format: str) -> RenderedPrompt:
    """`messages` (and `tools`) through the chat template, with each message's character range."""
    _check_messages(messages)
    tools = check_tools(tools) if tools else None
    if tools or has_tool_messages(messages):
        return _render_with_tools(tokenizer, messages, tools, tool_format)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rendered = _tokenize(tokenizer, text, add_special_tokens=False)
    return dataclasses.replace(rendered, message_ranges=_message_ranges(text, messages))


def _render_ids(tokenizer, input_ids) -> RenderedPrompt:
    """Token ids `input_ids`, checked, kept as given; with offsets when their text has them."""
    ids = _token_ids(input_ids, len(tokenizer))
    # Offsets exist only when the decoded text tokenizes back to the same ids.
    text = tokenizer.decode(ids)
    retokenized = _tokenize(tokenizer, text, add_special_tokens=False)
    if retokenized.input_ids == ids:
        return dataclasses.replace(retokenized, from_ids=True)
    return RenderedPrompt(ids, None, None, from_ids=True)


def _check_messages(messages) -> None:
    if (
        not isinstance(messages, (list, tuple))
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise ValueError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
    for i, message in enumerate(messages):
        check_text("messages", message["content"])
        calls = message.get("tool_calls")
        if calls is None:
            continue
        if message["role"] != "assistant" or not isinstance(calls, (list, tuple)):
            raise ValueError(f"messages[{i}].tool_calls must be a list, on an assistant message")
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not (
                isinstance(function, dict)
                and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), dict)
            ):
                raise ValueError(
                    f"messages[{i}].tool_calls[{j}] must be {{'id': ..., 'type': 'function', "
                    f"'function': {{'name': str, 'arguments': dict}}}}, got {call!r:.200}"
                )


def _render_with_tools(tokenizer, messages: list[dict], tools: list[dict] | None, tool_format: str) -> RenderedPrompt:
    """Render a conversation with tools or tool messages in the model's template or the built-in format (see
    `pd_integrations.tools`); the tools' signatures and the tool results are located so that layout does not take
    them for retrieved context."""
    used = resolve_tool_format(tokenizer, tool_format)
    rendered_messages = messages
    if used == "template":
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        tools_range = (
            _inserted_range(text, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            if tools
            else None
        )
    else:
        rendered_messages = builtin_messages(messages, tools)
        text = tokenizer.apply_chat_template(rendered_messages, tokenize=False, add_generation_prompt=True)
        tools_range = None
        if tools:
            block = builtin_messages([], tools)[0]["content"]
            start = text.find(block)  # the template copies the system message verbatim
            tools_range = (start, start + len(block)) if start >= 0 else None
    # Both formats copy a result verbatim (the built-in one inside a <tool_response> block).
    results = tuple(filter(None, locate_documents(text, [m["content"] for m in messages if m["role"] == "tool"])))
    rendered = _tokenize(tokenizer, text, add_special_tokens=False)
    return dataclasses.replace(
        rendered,
        message_ranges=_message_ranges(text, rendered_messages, tools_range),
        tools_range=tools_range,
        tool_result_ranges=results,
        tool_format=used,
    )


def _inserted_range(with_tools: str, without_tools: str) -> tuple[int, int]:
    """The range of `with_tools` that rendering without tools lacks: all but the two texts' common prefix and
    suffix (which covers the tools block wherever a template puts it)."""
    prefix = 0
    limit = min(len(with_tools), len(without_tools))
    while prefix < limit and with_tools[prefix] == without_tools[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and with_tools[-1 - suffix] == without_tools[-1 - suffix]:
        suffix += 1
    return prefix, len(with_tools) - suffix


def check_text(name: str, text: str) -> None:
    """Raise `ValueError` naming `name` for text no tokenizer can take: a lone surrogate (UTF-16 debris that is
    not a character, e.g. from a badly decoded file)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{name} holds a lone surrogate {text[error.start]!r} at character {error.start}, which is "
            f"not a character; decode the source text with errors='replace'"
        ) from None


def _token_ids(input_ids, vocab_size: int) -> list[int]:
    """`input_ids` as a list of Python ints, checked: a flat list/tuple/range of ints, or a 1-D or [1, n] integer
    tensor or NumPy array; every id in [0, vocab_size).

    The bound is the tokenizer's `len(tokenizer)` (its vocabulary with added tokens), the only vocabulary rendering
    knows. A model's embedding may be larger (padded to a multiple of 64, say), and ids past the tokenizer's
    vocabulary would then be valid for the model but have no text; they are refused here so that nothing
    downstream (decoding, offsets, the embedding lookup) meets an id without a token.
    """
    what = (
        "input_ids must be a flat list of ints or a 1-D (or [1, n]) integer tensor of token ids in "
        f"[0, {vocab_size - 1}]"
    )
    if isinstance(input_ids, (torch.Tensor, np.ndarray)):
        ids = _array_ids(input_ids, what)
    elif isinstance(input_ids, (list, tuple, range)):
        ids = _sequence_ids(input_ids, what)
    else:
        raise TypeError(
            f"{what}, got {type(input_ids).__name__}"
            + (" (pass encoding['input_ids'])" if hasattr(input_ids, "keys") else "")
        )
    if not ids:
        raise ValueError("input_ids is empty")
    bad = next((k for k, value in enumerate(ids) if not 0 <= value < vocab_size), None)
    if bad is not None:
        raise ValueError(
            f"input_ids must be token ids in [0, {vocab_size - 1}] (the tokenizer's vocabulary), got "
            f"{ids[bad]} at position {bad}"
        )
    return ids


def _array_ids(array, what: str) -> list[int]:
    """The ids of an integer tensor or NumPy array of one sequence (1-D or [1, n]); `what` opens the errors."""
    is_int = (
        not array.dtype.is_floating_point and not array.dtype.is_complex and array.dtype != torch.bool
        if isinstance(array, torch.Tensor)
        else array.dtype.kind in "iu"
    )
    if not is_int:
        raise TypeError(f"{what}, got a {type(array).__name__} of dtype {array.dtype}")
    shape = tuple(array.shape)
    if len(shape) == 2 and shape[0] == 1:
        array = array[0]
    elif len(shape) != 1:
        raise ValueError(f"{what} (one sequence: batches are not supported), got shape {list(shape)}")
    return array.tolist()


def _sequence_ids(sequence, what: str) -> list[int]:
    """The ids of a flat list/tuple/range as Python ints; `what` opens the error naming the first non-int."""
    ids = list(sequence)
    for position, value in enumerate(ids):
        # bool is an int subclass, but True is no token id.
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            nested = (
                " (nested lists are not accepted: pass one sequence)"
                if isinstance(value, (list, tuple, torch.Tensor, np.ndarray))
                else ""
            )
            raise TypeError(f"{what}{nested}, got {type(value).__name__} {value!r} at position {position}")
    return [int(value) for value in ids]


def _message_ranges(
    text: str, messages: list[dict], tools_range: tuple[int, int] | None = None
) -> tuple[MessageRange, ...]:
    """Each message's content range in the rendered `text`, found in order (templates copy contents verbatim);
    a content the template changed or dropped is left out. None lies in the tools' signatures (`tools_range`): a
    message that holds them (the built-in format's system message) keeps only its part before them."""
    ranges, cursor = [], 0
    for message in messages:
        content = message["content"] if isinstance(message["content"], str) else ""
        at = text.find(content, cursor) if content else -1
        if tools_range is not None and at >= 0 and at < tools_range[1] and at + len(content) > tools_range[0]:
            if at < tools_range[0]:  # holds the tools: its own text comes first
                ranges.append(MessageRange(message["role"], at, tools_range[0]))
                cursor = at + len(content)
                continue
            at = text.find(content, tools_range[1])  # a content that only recurs inside a tool's description
        if at >= 0:
            ranges.append(MessageRange(message["role"], at, at + len(content)))
            cursor = at + len(content)
    return tuple(ranges)


def _tokenize(tokenizer, text: str, add_special_tokens: bool) -> RenderedPrompt:
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    if not ids:
        raise ValueError("prompt is empty after tokenization")
    return RenderedPrompt(ids, text, [tuple(o) for o in encoding["offset_mapping"]])
