"""What PromptDistill kept, in terms a RAG user reads: retrieved documents and their retention, a shaded HTML view
of the prompt, and a terminal summary.

    result = engine.generate(messages=..., query=question)
    print(summary(result, documents))
    Path("kept.html").write_text(render_html(result, engine.tokenizer, documents))
"""

from __future__ import annotations

import bisect
import html
from dataclasses import dataclass

from .engine import GenerationResult
from .prompt import document_texts, kept_shares, locate_documents

SHADES = 10  # score deciles, each with its own shade
_KEPT_RGB = (34, 139, 34)  # green: kept; darker = higher selection score
_DROPPED_RGB = (214, 69, 65)  # red tint on grey text: dropped; darker = higher score (a near miss)


def document_retention(
    prompt_text: str, kept_char_spans: list[tuple[int, int]], documents: list[str]
) -> list[float | None]:
    """Share of each document's characters that lie in kept spans of the rendered prompt.

    `documents` are the retrieved texts, located as the engine locates `documents=`
    (`locate_documents`); one not found verbatim gets `None`. A result made with `documents=` already carries
    these shares (`GenerationResult.document_retention`).
    """
    return kept_shares(locate_documents(prompt_text, document_texts(documents)), kept_char_spans)


@dataclass(frozen=True)
class TokenView:
    """Per prompt token: its character span in `result.prompt_text`, whether it was kept, whether it was protected
    (never prunable: not retrieved context), and its selection score as a percentile among the prompt's tokens
    (None when no selection happened)."""

    offsets: list[tuple[int, int]]
    kept: list[bool]
    protected: list[bool]
    score_percentiles: list[float] | None
    scores: list[float] | None


def token_view(result: GenerationResult, tokenizer) -> TokenView:
    """Map `result`'s kept token indices and scores onto character spans of its prompt text, by re-tokenizing the
    text with `tokenizer` (the engine's).

    Raises `ValueError` when the result has no prompt text (raw token ids that don't round-trip) or the text does
    not re-tokenize to `result.prompt_tokens` tokens (a different tokenizer).
    """
    if result.prompt_text is None:
        raise ValueError("the result has no prompt text (its input_ids don't round-trip through the tokenizer)")
    # Chat-rendered prompts were tokenized without special tokens, raw prompts with them (e.g. a BOS at (0, 0)).
    for add_special_tokens in (False, True):
        encoding = tokenizer(result.prompt_text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        if len(encoding["input_ids"]) == result.prompt_tokens:
            break
    else:
        raise ValueError(
            f"the prompt text re-tokenizes to {len(encoding['input_ids'])} tokens, not the result's "
            f"{result.prompt_tokens}: pass the tokenizer of the engine that produced the result"
        )
    kept_indices = set(result.kept_token_indices)
    kept = [i in kept_indices for i in range(result.prompt_tokens)]
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    spans = result.protected_char_spans  # sorted and disjoint
    span_starts = [a for a, _ in spans]
    protected = [
        (k := bisect.bisect_right(span_starts, start) - 1) >= 0 and start < spans[k][1] for start, _ in offsets
    ]
    percentiles = None
    if result.token_scores is not None:
        order = sorted(range(len(result.token_scores)), key=result.token_scores.__getitem__)
        percentiles = [0.0] * len(order)
        for rank, index in enumerate(order):
            percentiles[index] = rank / max(len(order) - 1, 1)
    return TokenView(offsets, kept, protected, percentiles, result.token_scores)


def render_html(
    result: GenerationResult, tokenizer, documents: list[str] | None = None, title: str | None = None
) -> str:
    """A self-contained HTML page: the prompt text with each retrieved-context token shaded green (kept) or grey
    (dropped), darker for a higher selection score, and protected text (instructions, question, earlier turns,
    template) in blue, with a legend, the run's figures, the answer and (given the retrieved `documents`)
    each document's retention. Raises `ValueError` like `token_view`."""
    view = token_view(result, tokenizer)
    text = result.prompt_text
    parts, cursor = [], 0
    for i, (start, end) in enumerate(view.offsets):
        if start < cursor:  # a token sharing characters with its predecessor (byte-level splits): already shown
            start = cursor
        if start >= end:
            continue
        parts.append(html.escape(text[cursor:start]))
        state = "protected" if view.protected[i] else "kept" if view.kept[i] else "dropped"
        if state == "protected" or view.score_percentiles is None:
            shade, tip = "", state
        else:
            percentile = view.score_percentiles[i]
            shade = f" {state[0]}{min(int(percentile * SHADES), SHADES - 1)}"
            tip = f"{state} · score {view.scores[i]:.4g} · percentile {percentile:.0%}"
        parts.append(
            f'<span class="{state}{shade}" data-start="{start}" data-end="{end}" title="{tip}">'
            f"{html.escape(text[start:end])}</span>"
        )
        cursor = end
    parts.append(html.escape(text[cursor:]))
    heading = title or f"What {result.method} kept"
    return _PAGE.format(
        title=html.escape(heading),
        style=_style(),
        stats=_stats_table(result),
        legend=_legend(view.score_percentiles is not None),
        documents=_documents_table(result, documents) if documents else "",
        answer=html.escape(result.text),
        prompt="".join(parts),
    )


def summary(result: GenerationResult, documents: list[str] | None = None, max_spans: int = 8) -> str:
    """A terminal summary: kept ratio and figures, a preview of the kept spans, and per-document retention when the
    retrieved `documents` are given."""
    lines = [_headline(result)]
    text = result.prompt_text
    if text is None:
        return lines[0]
    kept_chars = sum(b - a for a, b in result.kept_char_spans)
    lines.append(f"kept spans: {len(result.kept_char_spans)}, {kept_chars} of {len(text)} prompt characters")
    for a, b in result.kept_char_spans[:max_spans]:
        lines.append(f"  [{a}:{b}] {_preview(text[a:b])}")
    if len(result.kept_char_spans) > max_spans:
        lines.append(f"  … and {len(result.kept_char_spans) - max_spans} more")
    if documents:
        lines.append("documents kept:")
        for number, (share, document) in enumerate(
            zip(document_retention(text, result.kept_char_spans, documents), documents), start=1
        ):
            kept = "not in prompt" if share is None else f"{share:.0%}"
            lines.append(f"  #{number} {kept:>13}  {_preview(document, 50)}")
    return "\n".join(lines)


def _headline(result: GenerationResult) -> str:
    layers = f" at layers {', '.join(map(str, result.selection_layers))}" if result.selection_layers else ""
    share = result.kept_tokens / result.prompt_tokens if result.prompt_tokens else 0.0
    return (
        f"{result.method}{layers}: kept {result.kept_tokens} of {result.prompt_tokens} prompt tokens ({share:.1%}); "
        f"prefill {result.prefill_seconds:.2f} s; KV cache {result.kv_cache_bytes / 2**20:.1f} MiB"
    )


def _preview(text: str, width: int = 70) -> str:
    flat = " ".join(text.split("\n")).replace("\t", " ")
    if len(flat) > width:
        flat = f"{flat[: width * 2 // 3]} … {flat[-(width // 3) :]}"
    return repr(flat)


def _style() -> str:
    rules = []
    for decile in range(SHADES):
        strength = (decile + 1) / SHADES
        rules.append(f".k{decile} {{ background: rgba{(*_KEPT_RGB, round(0.12 + 0.68 * strength, 3))}; }}")
        rules.append(f".d{decile} {{ background: rgba{(*_DROPPED_RGB, round(0.5 * strength * strength, 3))}; }}")
    return "\n".join(rules)


def _stats_table(result: GenerationResult) -> str:
    share = result.kept_tokens / result.prompt_tokens if result.prompt_tokens else 0.0
    rows = [
        ("method", result.method),
        ("selection layers", ", ".join(map(str, result.selection_layers)) or "none"),
        ("prompt tokens kept", f"{result.kept_tokens} of {result.prompt_tokens} ({share:.1%})"),
        (
            "retrieved context",
            f"{result.kept_prunable_tokens} of {result.prunable_tokens} tokens kept "
            f"(found by: {result.context_source}); {result.protected_tokens} protected",
        ),
        ("prefill (time to first token)", f"{result.prefill_seconds:.3f} s"),
        ("KV cache after prefill", f"{result.kv_cache_bytes / 2**20:.2f} MiB"),
        (
            "decode",
            f"{result.output_tokens} tokens at {result.decode_tokens_per_second:.1f} tokens/s "
            f"(finish: {result.finish_reason})",
        ),
    ]
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)


def _legend(scored: bool) -> str:
    protected = '<span class="protected">protected (never pruned)</span>'
    if not scored:
        return (
            f'{protected} <span class="kept k5">kept</span> <span class="dropped">dropped</span> '
            "— no selection scores: nothing was selected for this prompt"
        )
    kept = "".join(f'<span class="kept k{d}">&nbsp;{d + 1}&nbsp;</span>' for d in range(SHADES))
    dropped = "".join(f'<span class="dropped d{d}">&nbsp;{d + 1}&nbsp;</span>' for d in range(SHADES))
    return (
        f"{protected} &nbsp; kept {kept} &nbsp; dropped {dropped}<br>shade = decile of the token's first-stage "
        f"selection score among the prompt's tokens (1 = lowest, 10 = highest); hover a token for its score"
    )


def _documents_table(result: GenerationResult, documents: list[str]) -> str:
    shares = document_retention(result.prompt_text, result.kept_char_spans, documents)
    rows = "".join(
        f"<tr><td>{number}</td><td>{'not in prompt' if share is None else f'{share:.0%}'}</td>"
        f"<td>{html.escape(_preview(document, 90))}</td></tr>"
        for number, (share, document) in enumerate(zip(shares, documents), start=1)
    )
    return f"<h2>Documents</h2><table><tr><th>#</th><th>kept</th><th>document</th></tr>{rows}</table>"


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ text-align: left; padding: 0.2em 0.8em 0.2em 0; vertical-align: top; }}
.legend {{ margin: 1em 0; line-height: 2; }}
.answer {{ white-space: pre-wrap; background: #f4f4f4; padding: 0.6em; }}
.prompt {{ font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.6; white-space: pre-wrap;
           overflow-wrap: anywhere; border: 1px solid #ddd; padding: 1em; }}
.kept {{ color: #111; background: rgba(34, 139, 34, 0.35); }}
.dropped {{ color: #9a9a9a; }}
.protected {{ color: #111; background: rgba(65, 105, 225, 0.22); }}
{style}
</style>
</head>
<body>
<h1>{title}</h1>
<table>{stats}</table>
{documents}
<h2>Answer</h2>
<div class="answer">{answer}</div>
<h2>Prompt</h2>
<div class="legend">{legend}</div>
<div class="prompt">{prompt}</div>
</body>
</html>
"""
