"""Rendering the input to tokens with character offsets, locating retrieved documents in it, and span units."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import torch



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
    passed token ids (`from_ids`) rather than text."""

    input_ids: list[int]
    text: str | None
    offsets: list[tuple[int, int]] | None
    message_ranges: tuple[MessageRange, ...] | None = None
    document_ranges: tuple[tuple[int, int], ...] | None = None
    from_ids: bool = False

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
            raise ValueError(f"documents[{missing[0]}] is empty or does not appear verbatim in the rendered prompt "
                             f"(apart from the other documents); pass the retrieved texts exactly as they were "
                             f"inserted")
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

    def span_units(self, span: str, chunk_size: int | None,
                   regions: torch.Tensor | None = None) -> torch.Tensor | None:
        """Per token, the id of the span unit it belongs to (non-decreasing), or None for token-level selection.

        Units never cross the boundaries of `document_ranges`, nor those of `regions` (a non-decreasing id per
        token, e.g. prunable and protected stretches). "document" makes each document (and each stretch of text
        between documents) one unit; "sentence" splits after . ! ? and at line breaks; "chunk" groups whole
        sentences into chunks of about `chunk_size` tokens (a chunk holds the sentences that start in its
        `chunk_size`-token window, counted from each document and region start), so chunks never cut a sentence.
        Without text (raw ids that don't round-trip) sentences and chunks are fixed `chunk_size`-token windows.
        """
        if span == "token":
            return None
        n = len(self.input_ids)
        sentences = span in ("sentence", "chunk") and self.text is not None
        starts = self.word_starts() if self.document_ranges or sentences else None
        segments = torch.zeros(n, dtype=torch.long)
        if self.document_ranges:
            bounds = torch.tensor(sorted({c for document in self.document_ranges for c in document}))
            segments = torch.searchsorted(bounds, starts, right=True)
        if regions is not None:
            segments = torch.unique_consecutive(segments * (n + 1) + regions, return_inverse=True)[1]
        if span == "document":
            inner = torch.zeros(n, dtype=torch.long)
        elif sentences:
            ends = torch.tensor([m.end() for m in _SENTENCE_END.finditer(self.text)], dtype=torch.long)
            inner = torch.searchsorted(ends, starts, right=True)
            if span == "chunk":
                # Each sentence goes to the window (within its segment) where its first token lies.
                sentence = torch.unique_consecutive(segments * (n + 1) + inner, return_inverse=True)[1]
                inner = (_run_starts(sentence) - _run_starts(segments)) // chunk_size
        else:
            inner = (torch.arange(n) - _run_starts(segments)) // chunk_size
        return torch.unique_consecutive(segments * (n + 1) + inner, return_inverse=True)[1]


def _run_starts(ids: torch.Tensor) -> torch.Tensor:
    """Per position of a non-decreasing id sequence, the index where its run of equal ids starts."""
    _, lengths = torch.unique_consecutive(ids, return_counts=True)
    return torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)


def document_texts(documents) -> list[str]:
    """The texts of retrieved `documents`: strings, LangChain `Document`s (`page_content`) or LlamaIndex nodes
    (`get_content()`). Raises `TypeError` for anything else."""
    if not isinstance(documents, (list, tuple)):
        raise TypeError(f"documents (pd_documents in the adapters) must be a list of texts, Documents or nodes, "
                        f"got {type(documents).__name__}")
    texts = []
    for document in documents:
        if hasattr(document, "page_content"):
            document = document.page_content
        elif callable(getattr(document, "get_content", None)):
            document = document.get_content()
        if not isinstance(document, str):
            raise TypeError(f"documents (pd_documents in the adapters) must be a list of texts, Documents or nodes, "
                            f"got an item of type {type(document).__name__}")
        texts.append(document)
    return texts


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
    return [None if r is None else sum(max(0, min(r[1], b) - max(r[0], a)) for a, b in kept_char_spans)
            / (r[1] - r[0]) for r in ranges]


# Code points Python's str.isspace() counts as whitespace (all lie below U+3001).
_WHITESPACE = torch.tensor([c for c in range(0x3001) if chr(c).isspace()])

# A sentence ends after its punctuation (and closing quotes), before the whitespace, so a following " Word" token
# starts the next sentence.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)|\n+")


def render(tokenizer, prompt: str | None, messages: list | None, input_ids) -> RenderedPrompt:
    """Tokenize exactly one of `prompt` (raw text), `messages` (via the chat template) or `input_ids`.

    Raises `ValueError` when none or several are given, or the input is empty.
    """
    given = [name for name, value in (("prompt", prompt), ("messages", messages), ("input_ids", input_ids))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of prompt, messages or input_ids, got {given or 'none'}")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("prompt is empty")
        return _tokenize(tokenizer, prompt, add_special_tokens=True)
    if messages is not None:
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rendered = _tokenize(tokenizer, text, add_special_tokens=False)
        return dataclasses.replace(rendered, message_ranges=_message_ranges(text, messages))
    ids = input_ids.flatten().tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    if not ids:
        raise ValueError("input_ids is empty")
    # Offsets exist only when the decoded text tokenizes back to the same ids.
    text = tokenizer.decode(ids)
    retokenized = _tokenize(tokenizer, text, add_special_tokens=False)
    if retokenized.input_ids == ids:
        return dataclasses.replace(retokenized, from_ids=True)
    return RenderedPrompt(ids, None, None, from_ids=True)


def _message_ranges(text: str, messages: list[dict]) -> tuple[MessageRange, ...]:
    """Each message's content range in the rendered `text`, found in order (templates copy contents verbatim);
    a content the template changed or dropped is left out."""
    ranges, cursor = [], 0
    for message in messages:
        content = message["content"] if isinstance(message["content"], str) else ""
        at = text.find(content, cursor) if content else -1
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
