"""The layout of a prompt for prefill: which tokens selection may drop, which query tokens score it, the query suffix.

Only retrieved context is prunable. Chat-template tokens and role headers, the system prompt (unless it holds the
context), the tools' signatures, instructions, the question wherever it stands, earlier turns of a conversation and
the text after the context are protected: they reach every layer. The engine and calibration both select within
this layout.

Where the context is, most precise first (`PromptLayout.context_source`):
- "documents": the retrieved texts a caller names with `documents=` (the adapters fill it from prompt templates);
  only their tokens are prunable.
- "heuristic": no documents named. The one message (the whole text for a raw prompt) holding the most tokens is the
  context when it has at least `context_min_tokens`; the tools' signatures lie outside every message's range and tool
  results (a tool message's content) don't count either, so however long they are they are never taken for retrieved
  context: name a tool result in `documents=` to have it pruned. In it, the context block runs from the first to the
  last passage-like line: at least `SHORT_LINE_TOKENS` tokens, not a question line ("Question: ...", "...?") under
  `INSTRUCTION_LINE_TOKENS` tokens, and, unless no other line qualifies, not a first or last line under that length
  (an instruction before or after the context). The block's lines are prunable, except question lines; labels and
  instructions outside it are protected.
- "positional": `input_ids` without documents (the caller handed over tokens, not their structure): every token
  but the first `protect_head` and the protected tail.
- "none": no message is long enough to be retrieved context, so nothing is pruned.
The first `protect_head` tokens (attention sinks), the question's own span and the query tokens are always protected;
optionally also the context's line and sentence ends (`protect_structure`) and its last `protect_recent` tokens.

Query-free prompts ("Summarise these documents", a tree-summarize step without a query): when no `query` is named,
no question line is found, and the seeds would be only the template's tail or an instruction that asks for a
summary or overview, there is nothing for attention to look for, so nothing is pruned: the layout's budgets
resolve to every prunable token (full attention) and `query_free` is True, reported in every result's metadata.
Raw `input_ids` (context "positional") and `query_source="last_token"` (the paper's rule) keep selecting.

Seeds are always the last tokens of the sequence the model sees, so that their attention reaches the whole context:
the question plus the template tokens after it when no context follows the question, otherwise a transient query suffix
(the question's tokens appended after the prompt and dropped after the last selection stage).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .config import PromptDistillConfig, resolve_budget
from .prompt import RenderedPrompt, check_text
from .spans import sentence_end_tokens, token_units

# Lines shorter than this are labels ("Context:", "Answer briefly.") unless they lie inside the context block.
SHORT_LINE_TOKENS = 8
# First and last lines, and question lines, shorter than this are instructions and questions, not passages.
INSTRUCTION_LINE_TOKENS = 64
# A line that asks: a "Question:"/"Query:" label, or a line ending in a question mark.
_QUESTION_LINE = re.compile(r"^\W*(question|query)\s*:|\?\W*$", re.IGNORECASE)
_LINE = re.compile(r"[^\n]*\S[^\n]*")
# An instruction that asks for the whole context rather than for something in it.
_SUMMARY = re.compile(r"\b(summar|overview|tl;?dr|outline|key points|main points|digest|gist)", re.IGNORECASE)


@dataclass(frozen=True)
class PromptLayout:
    """Per prompt token whether selection may drop it (`prunable`), where the context came from, the transient
    `query_suffix_ids` appended after the prompt, how many of the last tokens seed selection (`query_tokens`), each
    token's span unit (`units`, prompt and query suffix tokens; None for token-level selection), and whether the
    prompt is query-free (`query_free`: nothing to seed selection with, so nothing is pruned; see the module
    docstring)."""

    prunable: torch.Tensor
    context_source: str
    query_suffix_ids: tuple[int, ...]
    query_tokens: int
    units: torch.Tensor | None
    query_free: bool = False

    @classmethod
    def unpruned(cls, length: int) -> PromptLayout:
        """A layout that prunes nothing: the last token is the query token, nobody selects."""
        return cls(torch.zeros(length, dtype=torch.bool), "none", (), 1, None)

    @property
    def num_prunable(self) -> int:
        return int(self.prunable.sum())

    def candidates(self) -> torch.Tensor:
        """Per token (prompt, then query suffix): whether selection may drop it."""
        return torch.cat([self.prunable, torch.zeros(len(self.query_suffix_ids), dtype=torch.bool)])

    def stage_budgets(self, budgets: tuple) -> list[int]:
        """Context tokens kept per stage: ints as given, fractions of the prunable tokens (rounded up), length-aware
        rules resolved against them (`config.BudgetRule`); never more than an earlier stage kept. A query-free
        layout keeps every prunable token at every stage."""
        n = self.num_prunable
        if self.query_free:
            return [n] * len(budgets)
        resolved = [resolve_budget(b, n) for b in budgets]
        return [min(resolved[: i + 1]) for i in range(len(resolved))]

    def counts(self, kept_indices: torch.Tensor) -> dict[str, int]:
        """How many prompt tokens were protected, prunable, and kept among the prunable."""
        prunable = self.num_prunable
        return {
            "protected_tokens": self.prunable.numel() - prunable,
            "prunable_tokens": prunable,
            "kept_prunable_tokens": int(self.prunable[kept_indices.cpu()].sum()),
            "query_free": self.query_free,
        }


def plan_layout(tokenizer, rendered: RenderedPrompt, query: str | None, config: PromptDistillConfig) -> PromptLayout:
    """The layout of `rendered` for a method that prunes, under `config`: what is prunable (see the module
    docstring), the query tokens and the query suffix.

    Query tokens: the last prompt token for `query_source="last_token"` (the paper's rule); else the question (`query`,
    or a question line the heuristic found) from its start to the end when no prunable token follows it, else a
    query suffix of its tokens; with no question, the last user message when it is short and follows the context, else
    the last `tail_tokens` tokens. Raises `ValueError` for an empty query, or one longer than `max_probe_tokens`
    that needs a query suffix.
    """
    n = len(rendered.input_ids)
    check_query(query)
    question = _locate(rendered, query.strip()) if query is not None else None
    if rendered.document_ranges:
        prunable, source = _tokens_in(rendered, rendered.document_ranges), "documents"
    elif rendered.from_ids:
        prunable, source = torch.ones(n, dtype=torch.bool), "positional"
    else:
        prunable = _heuristic_context(
            rendered, config.context_min_tokens, _tokens_in(rendered, rendered.tool_result_ranges)
        )
        source = "heuristic" if bool(prunable.any()) else "none"
    prunable[: config.protect_head] = False
    if rendered.tools_range is not None:  # tool signatures are instructions, however long
        prunable &= ~_tokens_in(rendered, [rendered.tools_range])
    # Template markup (role headers, end-of-turn tokens) stays even inside a document's range.
    prunable &= ~torch.isin(torch.tensor(rendered.input_ids), torch.tensor(tokenizer.all_special_ids))
    if question is not None:
        prunable &= ~_tokens_in(rendered, [question])
    elif query is None and source != "positional" and rendered.text is not None:
        question = _question_line(rendered, prunable)
    suffix, query_tokens, tail, seeds = _query_tokens(tokenizer, rendered, query, question, prunable, config)
    prunable[n - (tail - len(suffix)) :] = False
    _protect_context(rendered, prunable, config)
    units = token_units(rendered, prunable, config.span or "token", config.chunk_size, len(suffix))
    query_free = (
        source != "positional"
        and bool(prunable.any())
        and (
            seeds == "tail"
            or seeds == "user"
            and _SUMMARY.search(rendered.text[rendered.last_user_start :]) is not None
        )
    )
    return PromptLayout(prunable, source, suffix, query_tokens, units, query_free)


def _protect_context(rendered: RenderedPrompt, prunable: torch.Tensor, config: PromptDistillConfig) -> None:
    """Mark as protected, in place, the context tokens that end a sentence or a line (`protect_structure`, the
    sentence spans' rule), then the last `protect_recent` context tokens."""
    if config.protect_structure:
        prunable &= ~sentence_end_tokens(rendered)
    if config.protect_recent:
        prunable[prunable.nonzero().flatten()[-config.protect_recent :]] = False


def check_query(query) -> None:
    """Raise `ValueError` naming `query` unless it is None or a non-empty str of characters."""
    if query is not None and (not isinstance(query, str) or not query.strip()):
        raise ValueError(f"query must be a non-empty str, got {query!r}")
    if query is not None:
        check_text("query", query)


def _query_tokens(
    tokenizer,
    rendered: RenderedPrompt,
    query: str | None,
    question: tuple[int, int] | None,
    prunable: torch.Tensor,
    config: PromptDistillConfig,
) -> tuple[tuple[int, ...], int, int, str]:
    """(query suffix ids, query tokens, protected tail tokens including the query suffix, what seeds: "last_token",
    "question", "user" (the last user message) or "tail"); see `plan_layout`."""
    n = len(rendered.input_ids)
    if config.query_source == "last_token":
        return (), 1, 1, "last_token"
    if question is not None:
        start = _first_token_at_or_after(rendered, question[0])
        if not bool(prunable[start:].any()) and n - start <= config.max_probe_tokens:
            return (), n - start, n - start, "question"
    if query is not None or question is not None:
        text = query.strip() if query is not None else rendered.text[question[0] : question[1]].strip()
        suffix = tuple(tokenizer("\n" + text, add_special_tokens=False)["input_ids"])
        if len(suffix) > config.max_probe_tokens:
            raise ValueError(
                f"query has {len(suffix)} tokens; at most max_probe_tokens={config.max_probe_tokens} "
                f"can be used as a query suffix"
            )
        return suffix, len(suffix), len(suffix) + _template_tail(prunable, config.tail_tokens), "question"
    user = rendered.last_user_start
    if user is not None:
        start = _first_token_at_or_after(rendered, user)
        if not bool(prunable[start:].any()) and n - start <= config.max_probe_tokens:
            return (), n - start, n - start, "user"
    tail = _template_tail(prunable, config.tail_tokens)
    return (), tail, tail, "tail"


def _template_tail(prunable: torch.Tensor, tail_tokens: int) -> int:
    """How many of the last prompt tokens to protect: `tail_tokens`, but none of the context itself when text
    (the template's end) follows it."""
    n = prunable.numel()
    after_context = n - 1 - int(prunable.nonzero().max()) if bool(prunable.any()) else n
    return min(tail_tokens, n, after_context) if after_context > 0 else min(tail_tokens, n)


def _locate(rendered: RenderedPrompt, question: str) -> tuple[int, int] | None:
    """Character range of the question's last occurrence in the text, or None."""
    at = rendered.text.rfind(question) if rendered.text else -1
    return (at, at + len(question)) if at >= 0 else None


def _first_token_at_or_after(rendered: RenderedPrompt, char: int) -> int:
    ends = torch.tensor([end for _, end in rendered.offsets])
    return int(torch.searchsorted(ends, char, right=True))


def _tokens_in(rendered: RenderedPrompt, ranges) -> torch.Tensor:
    """Per token, whether its first non-space character lies in one of the character `ranges`."""
    starts = rendered.word_starts()
    inside = torch.zeros(len(rendered.input_ids), dtype=torch.bool)
    for start, end in ranges:
        inside |= (starts >= start) & (starts < end)
    return inside


def _heuristic_context(rendered: RenderedPrompt, min_tokens: int, tool_results: torch.Tensor) -> torch.Tensor:
    """The prunable tokens of the longest message, not counting the `tool_results` tokens, which are never
    prunable (see the module docstring)."""
    text, starts = rendered.text, rendered.word_starts()
    regions = [(m.start, m.end) for m in rendered.message_ranges] if rendered.message_ranges else [(0, len(text))]
    sizes = [int(((starts >= a) & (starts < b) & ~tool_results).sum()) for a, b in regions]
    first, last = regions[max(range(len(regions)), key=sizes.__getitem__)]
    lines, tokens = _lines(rendered, first, last)
    prunable = torch.zeros(len(starts), dtype=torch.bool)
    if max(sizes) < min_tokens or not lines:
        return prunable
    instruction_sized = tokens < INSTRUCTION_LINE_TOKENS
    asks = _asks(text, lines) & instruction_sized
    passage = (tokens >= SHORT_LINE_TOKENS) & ~asks
    inner = passage.clone()
    inner[[0, -1]] &= ~instruction_sized[[0, -1]]
    # Edge lines count as instructions only when other lines are passages (a short context may be one line).
    passages = (inner if bool(inner.any()) else passage).nonzero().flatten().tolist()
    if not passages:
        return prunable
    # The block covers everything between its first and last passage-like line, line breaks included; question
    # lines inside it stay protected.
    block = (lines[passages[0]][0], lines[passages[-1]][1])
    questions = [lines[i] for i in asks.nonzero().flatten().tolist()]
    return _tokens_in(rendered, [block]) & ~_tokens_in(rendered, questions) & ~tool_results


def _question_line(rendered: RenderedPrompt, prunable: torch.Tensor) -> tuple[int, int] | None:
    """Character range of the question line when the caller named no query: a protected line under
    `INSTRUCTION_LINE_TOKENS` tokens that asks; the last one after the context, else the last one before it (a
    question-first prompt)."""
    # Within each message's content, so that template markup on the same line ("...?<|im_end|>") doesn't hide
    # the question mark.
    regions = (
        [(m.start, m.end) for m in rendered.message_ranges] if rendered.message_ranges else [(0, len(rendered.text))]
    )
    per_region = [_lines(rendered, a, b) for a, b in regions]
    lines = [line for region_lines, _ in per_region for line in region_lines]
    if not lines:
        return None
    tokens = torch.cat([region_tokens for _, region_tokens in per_region])
    starts = rendered.word_starts()
    pruned = torch.tensor([bool(prunable[(starts >= a) & (starts < b)].any()) for a, b in lines], dtype=torch.bool)
    asks = (_asks(rendered.text, lines) & (tokens < INSTRUCTION_LINE_TOKENS) & ~pruned).nonzero().flatten().tolist()
    context = starts[prunable]
    if context.numel() == 0:
        return lines[asks[-1]] if asks else None
    after = [lines[i] for i in asks if lines[i][0] > int(context[-1])]
    before = [lines[i] for i in asks if lines[i][1] <= int(context[0])]
    return (after or before or [None])[-1]


def _lines(rendered: RenderedPrompt, first: int, last: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The non-blank lines of `rendered.text[first:last]` as character ranges, and each one's token count."""
    lines = [(m.start(), m.end()) for m in _LINE.finditer(rendered.text, first, last)]
    if not lines:
        return [], torch.zeros(0, dtype=torch.long)
    starts = rendered.word_starts()
    line_starts = torch.tensor([a for a, _ in lines])
    line_ends = torch.tensor([b for _, b in lines])
    line_of = (torch.searchsorted(line_starts, starts, right=True) - 1).clamp(min=0)
    in_line = (starts >= line_starts[line_of]) & (starts < line_ends[line_of])
    return lines, torch.bincount(line_of[in_line], minlength=len(lines))


def _asks(text: str, lines: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor([bool(_QUESTION_LINE.search(text[a:b])) for a, b in lines], dtype=torch.bool)
