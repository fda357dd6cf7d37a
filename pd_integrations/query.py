"""Rendering the input to tokens, and finding the query tokens that seed selection.

Seeds are always the last rows of the sequence the model sees: the question (plus the template suffix after it)
when the prompt ends with it, otherwise a transient probe appended after the prompt and dropped after selection.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import torch

from .config import PromptDistillConfig


@dataclass(frozen=True)
class RenderedPrompt:
    """The prompt as the model sees it: `text` with per-token character `offsets` (both None for raw ids that
    don't round-trip through the tokenizer), where the last user message starts in `text`, if known, and the
    character ranges of the caller's retrieved documents in `text`, if given."""

    input_ids: list[int]
    text: str | None
    offsets: list[tuple[int, int]] | None
    last_user_start: int | None = None
    document_ranges: tuple[tuple[int, int], ...] | None = None

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


    def _word_starts(self) -> torch.Tensor:
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

    def span_units(self, span: str, chunk_size: int | None) -> torch.Tensor | None:
        """Per token, the id of the span unit it belongs to (non-decreasing), or None for token-level selection.

        Units never cross the boundaries of `document_ranges`. "document" makes each document (and each stretch of
        text between documents) one unit; "sentence" splits after . ! ? and at line breaks; "chunk" cuts
        `chunk_size`-token chunks, restarting at each document. Without text (raw ids that don't round-trip)
        sentences fall back to chunks.
        """
        if span == "token":
            return None
        n = len(self.input_ids)
        sentences = span == "sentence" and self.text is not None
        starts = self._word_starts() if self.document_ranges or sentences else None
        segments = torch.zeros(n, dtype=torch.long)
        if self.document_ranges:
            bounds = torch.tensor(sorted({c for document in self.document_ranges for c in document}))
            segments = torch.searchsorted(bounds, starts, right=True)
        if span == "document":
            inner = torch.zeros(n, dtype=torch.long)
        elif sentences:
            ends = torch.tensor([m.end() for m in _SENTENCE_END.finditer(self.text)], dtype=torch.long)
            inner = torch.searchsorted(ends, starts, right=True)
        else:
            _, lengths = torch.unique_consecutive(segments, return_counts=True)
            segment_start = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
            inner = (torch.arange(n) - segment_start) // chunk_size
        return torch.unique_consecutive(segments * (n + 1) + inner, return_inverse=True)[1]


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


@dataclass(frozen=True)
class QueryPlan:
    """Where the seeds are: the last `num_seeds` rows of prompt + `probe_ids`; the last `protected_tail` rows are
    always kept; the probe rows are dropped after the last selection stage."""

    probe_ids: tuple[int, ...]
    num_seeds: int
    protected_tail: int


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
        user_contents = [m["content"] for m in messages if m["role"] == "user" and isinstance(m["content"], str)]
        last_user_start = text.rfind(user_contents[-1]) if user_contents and user_contents[-1] else -1
        rendered = _tokenize(tokenizer, text, add_special_tokens=False)
        return RenderedPrompt(rendered.input_ids, text, rendered.offsets,
                              last_user_start if last_user_start >= 0 else None)
    ids = input_ids.flatten().tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    if not ids:
        raise ValueError("input_ids is empty")
    # Offsets exist only when the decoded text tokenizes back to the same ids.
    text = tokenizer.decode(ids)
    retokenized = _tokenize(tokenizer, text, add_special_tokens=False)
    if retokenized.input_ids == ids:
        return retokenized
    return RenderedPrompt(ids, None, None)


def _tokenize(tokenizer, text: str, add_special_tokens: bool) -> RenderedPrompt:
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    if not ids:
        raise ValueError("prompt is empty after tokenization")
    return RenderedPrompt(ids, text, [tuple(o) for o in encoding["offset_mapping"]])


def plan_query(tokenizer, rendered: RenderedPrompt, query: str | None, config: PromptDistillConfig) -> QueryPlan:
    """Choose the seed tokens for selection.

    - `method="full"` selects nothing, so a query adds no probe.
    - `query_source="last_token"`: the last prompt token (the paper's rule).
    - `query` found at the prompt tail (at most `tail_tokens` template tokens after it): its tokens to the end.
    - `query` elsewhere (e.g. a question-first prompt): a transient probe of the query's tokens.
    - no `query`: the last user message when it is short, else the last `tail_tokens` tokens.
    Raises `ValueError` for an empty query or one longer than `max_probe_tokens` that needs a probe.
    """
    n = len(rendered.input_ids)
    if config.method == "full" or config.query_source == "last_token":
        return QueryPlan((), 1, 1)  # nothing is selected, or only the last token seeds
    if query is not None:
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"query must be a non-empty str, got {query!r}")
        question = query.strip()
        at = rendered.text.rfind(question) if rendered.text else -1
        start, end = _token_at(rendered, at), _token_at(rendered, at + len(question) - 1)
        if start is not None and end is not None and n - 1 - end <= config.tail_tokens:
            return QueryPlan((), n - start, n - start)
        probe = tuple(tokenizer("\n" + question, add_special_tokens=False)["input_ids"])
        if len(probe) > config.max_probe_tokens:
            raise ValueError(f"query has {len(probe)} tokens; at most max_probe_tokens={config.max_probe_tokens} "
                             f"can be used as a probe")
        return QueryPlan(probe, len(probe), len(probe) + min(config.tail_tokens, n))
    start = _token_at(rendered, rendered.last_user_start if rendered.last_user_start is not None else -1)
    if start is not None and n - start <= config.max_probe_tokens:
        return QueryPlan((), n - start, n - start)
    seeds = min(config.tail_tokens, n)
    return QueryPlan((), seeds, seeds)


def _token_at(rendered: RenderedPrompt, char: int) -> int | None:
    """Index of the token that holds character `char` of the rendered text (None for char < 0 or no offsets)."""
    if char < 0 or rendered.offsets is None:
        return None
    index = bisect.bisect_right(rendered.offsets, char, key=lambda offset: offset[1])
    return index if index < len(rendered.offsets) else None
