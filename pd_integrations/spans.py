"""Span units: the groups of tokens that selection keeps or drops whole (chunks of whole sentences, sentences,
retrieved documents)."""

from __future__ import annotations

import re

import torch

from .prompt import RenderedPrompt

# A sentence ends after its punctuation (and closing quotes), before the whitespace, so a following " Word" token
# starts the next sentence.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)|\n+")
# A paragraph ends at a blank line: retrieved passages joined into one context string are separated by them.
_PARAGRAPH_END = re.compile(r"\n[ \t]*\n\s*")


def span_units(
    rendered: RenderedPrompt, span: str, chunk_size: int | None, regions: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Per token, the id of the span unit it belongs to (non-decreasing), or None for token-level selection.

    Units never cross the boundaries of `document_ranges`, nor those of `regions` (a non-decreasing id per token, e.g.
    prunable and protected stretches). "document" makes each document (and each stretch of text between documents) one
    unit; "passage" does the same and also splits at blank lines, so that passages joined into one context string (a
    prompt template's `context_str`, or a context the layout's rule found) are units of their own, with or without named
    documents; "sentence" splits after . ! ? and at line breaks; "chunk" groups whole sentences into chunks of about
    `chunk_size` tokens (a chunk holds the sentences that start in its `chunk_size`-token window, counted from each
    document and region start), so chunks never cut a sentence. Without text (raw ids that don't round-trip) sentences
    and chunks are fixed `chunk_size`-token windows.
    """
    if span == "token":
        return None
    n = len(rendered.input_ids)
    sentences = span in ("sentence", "chunk") and rendered.text is not None
    paragraphs = span == "passage" and rendered.text is not None
    starts = rendered.word_starts() if rendered.document_ranges or sentences or paragraphs else None
    segments = torch.zeros(n, dtype=torch.long)
    if rendered.document_ranges:
        bounds = torch.tensor(sorted({c for document in rendered.document_ranges for c in document}))
        segments = torch.searchsorted(bounds, starts, right=True)
    if regions is not None:
        segments = torch.unique_consecutive(segments * (n + 1) + regions, return_inverse=True)[1]
    if paragraphs:
        ends = torch.tensor([m.end() for m in _PARAGRAPH_END.finditer(rendered.text)], dtype=torch.long)
        inner = torch.searchsorted(ends, starts, right=True)
    elif span in ("document", "passage"):
        inner = torch.zeros(n, dtype=torch.long)
    elif sentences:
        ends = torch.tensor([m.end() for m in _SENTENCE_END.finditer(rendered.text)], dtype=torch.long)
        inner = torch.searchsorted(ends, starts, right=True)
        if span == "chunk":
            # Each sentence goes to the window (within its segment) where its first token lies.
            sentence = torch.unique_consecutive(segments * (n + 1) + inner, return_inverse=True)[1]
            inner = (_run_starts(sentence) - _run_starts(segments)) // chunk_size
    else:
        inner = (torch.arange(n) - _run_starts(segments)) // chunk_size
    return torch.unique_consecutive(segments * (n + 1) + inner, return_inverse=True)[1]


def sentence_end_tokens(rendered: RenderedPrompt) -> torch.Tensor:
    """Per token, whether it holds the last character of a sentence end or a run of line breaks (`_SENTENCE_END`,
    where sentence spans split).

    Raises:
        ValueError: the prompt has no text (raw ids that don't round-trip through the tokenizer).
    """
    if rendered.text is None:
        raise ValueError(
            "protect_structure needs the prompt's text; these input_ids don't round-trip through the tokenizer"
        )
    chars = torch.tensor([m.end() - 1 for m in _SENTENCE_END.finditer(rendered.text)], dtype=torch.long)
    starts, ends = torch.tensor(rendered.offsets, dtype=torch.long).reshape(-1, 2).T
    token = (torch.searchsorted(starts, chars, right=True) - 1).clamp(min=0)
    held = (starts[token] <= chars) & (chars < ends[token])
    marks = torch.zeros(len(rendered.input_ids), dtype=torch.bool)
    marks[token[held]] = True
    return marks


def _run_starts(ids: torch.Tensor) -> torch.Tensor:
    """Per position of a non-decreasing id sequence, the index where its run of equal ids starts."""
    _, lengths = torch.unique_consecutive(ids, return_counts=True)
    return torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)


def token_units(
    rendered: RenderedPrompt, prunable: torch.Tensor, span: str, chunk_size: int | None, suffix_tokens: int = 0
) -> torch.Tensor | None:
    """Span unit id per token (prompt, then `suffix_tokens` query suffix tokens), or None for token-level selection.
    Units never cross the edge of a prunable region, so a protected line never shares a unit with context."""
    regions = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), (prunable[1:] != prunable[:-1]).long()]), 0)
    units = span_units(rendered, span, chunk_size, regions)
    if units is None:
        return None
    # Query suffix tokens are protected; their ids only need to continue the order.
    return torch.cat([units, torch.arange(suffix_tokens) + int(units[-1]) + 1])
