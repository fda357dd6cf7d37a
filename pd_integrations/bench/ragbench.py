"""`pd-bench rag`: RAG-shaped prompts (`corpora/rag.py`) through every method, with answer accuracy and what
kept of the answer's passage.

Per (length, shape, sample) one question is asked over passages retrieved up to `length` context tokens, in rank
order (or, with `answer_depths`, with the answer's passage moved to each depth); the same questions are asked at
every length and shape. Records hold, besides the timings `measure` records:
- `score`: 1.0 when the answer appears in the greedy output (case-insensitive, as a whole phrase);
- `answer_kept`: the share of the answer passage's characters that selection kept (`document_retention`);
- `needles_kept`: 1.0 when the sentence that states the answer was kept whole.
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from ..calibration.mixed import wilson_interval
from ..corpora.rag import SHAPES, RagProbe, contains
from ..engine import PromptDistillEngine
from ..kept_view import document_retention
from ..probes import needles_kept
from . import measure, report

CONTEXT_SOURCES = ("documents", "none")
COLUMNS_NOTE = (
    "Means over the questions of each row. ÷ full: the method's figure divided by full attention's on the "
    "same prompts (same length and shape). Answer passage kept: share of the answer passage's "
    "characters that selection kept; answer sentence kept: share of runs that kept the sentence stating "
    "the answer whole. Accuracy: runs whose greedy answer contains the expected answer "
    "(case-insensitive), with the Wilson score interval of that share. Answered when kept: among the runs that "
    "kept the answer sentence; answered where full did: among the prompts full attention answered."
)


def run(
    engines: dict[str, PromptDistillEngine],
    probes: list[RagProbe],
    *,
    context_source: str = "documents",
    desc: str = "pd-bench rag",
    log: Path | None = None,
) -> list[dict]:
    """Generate every probe with every method (probe-major; equal configs run once and share the record), passing
    the retrieved passages as `documents=` when `context_source` is "documents". Each record is also appended to
    `log` (JSON lines) as soon as it exists."""
    if context_source not in CONTEXT_SOURCES:
        raise ValueError(f"context_source must be one of {', '.join(CONTEXT_SOURCES)}, got {context_source!r}")
    distinct = {engine.config: engine for engine in engines.values()}.values()
    for probe in probes:  # before the first run: a prompt over the context window must not end a long run late
        prompt = probe.prompt
        for engine in distinct:
            try:
                engine.check(
                    messages=prompt.messages,
                    query=prompt.query,
                    documents=prompt.documents if context_source == "documents" else None,
                )
            except ValueError as error:
                raise ValueError(f"{probe.labels['length']}-token {probe.labels['shape']} prompt: {error}") from None
    return measure.run(
        engines,
        probes,
        desc=desc,
        log=log,
        labels={"context_source": context_source},
        measure_one=lambda engine, probe: _measure(engine, probe, context_source),
    )


def _measure(engine: PromptDistillEngine, probe: RagProbe, context_source: str) -> dict:
    prompt = probe.prompt
    documents = prompt.documents if context_source == "documents" else None
    result, peak = measure.cell_peak_memory(
        engine,
        probe.labels,
        lambda: engine.generate(
            messages=prompt.messages, query=prompt.query, documents=documents, max_new_tokens=probe.max_new_tokens
        ),
    )
    retention = result.document_retention or document_retention(
        result.prompt_text, result.kept_char_spans, prompt.documents
    )
    return {
        **measure.timing_record(engine, result, peak),
        "score": float(contains(result.text, prompt.answer)),
        "answer_kept": retention[prompt.answer_index],
        "documents_kept": mean(r for r in retention if r is not None),
        "needles_kept": needles_kept(result.prompt_text, result.kept_char_spans, (probe.answer_sentence,)),
    }


def summarize(records: list[dict]) -> list[dict]:
    """One row per (length, shape, answer depth, method) in that order, with `report.summarize`'s means and ratios
    against full attention on the same prompts, plus `answer_kept`, `documents_kept`, `correct` (a count) with its
    95% `interval`, `kept_answered` (correct among the runs that kept the answer sentence) and `both_answered`
    (correct among the prompts full attention answered, against `full_answered`)."""
    full = {_prompt_key(r): r["score"] for r in records if r["method"] == "full"}
    rows = []
    cells = sorted(
        {(r["shape"], r["answer_depth"]) for r in records},
        key=lambda cell: (SHAPES.index(cell[0]), -1 if cell[1] is None else cell[1]),
    )
    for shape, depth in cells:
        subset = [r for r in records if r["shape"] == shape and r["answer_depth"] == depth]
        for row in report.summarize(subset):
            group = [r for r in subset if r["length"] == row["length"] and r["method"] == row["method"]]
            rows.append(
                {
                    "shape": shape,
                    "answer_depth": depth,
                    **row,
                    "correct": int(sum(r["score"] for r in group)),
                    "interval": wilson_interval(sum(r["score"] for r in group), len(group)),
                    **_answered_where(group, full),
                    "answer_kept": mean(r["answer_kept"] for r in group),
                    "documents_kept": mean(r["documents_kept"] for r in group),
                }
            )
    return sorted(rows, key=lambda row: row["length"])  # stable: shapes, depths and methods keep their order


def _prompt_key(record: dict) -> tuple:
    return record["length"], record["shape"], record["answer_depth"], record["sample"]


def _answered_where(group: list[dict], full: dict) -> dict:
    """Of `group`'s runs: answered among those that kept the answer sentence, and among the prompts full attention
    answered (`full`: prompt key -> its score; absent when full attention did not run every prompt)."""
    kept = [r for r in group if r["needles_kept"] == 1]
    counts = {"kept_runs": len(kept), "kept_answered": int(sum(r["score"] for r in kept))}
    if all(_prompt_key(r) in full for r in group):
        counts["full_answered"] = int(sum(full[_prompt_key(r)] for r in group))
        counts["both_answered"] = int(sum(r["score"] * full[_prompt_key(r)] for r in group))
    return counts


def markdown_table(rows: list[dict]) -> str:
    """The summary rows as a Markdown table (with an answer-depth column when the answer was moved)."""
    depths = any(row["answer_depth"] is not None for row in rows)
    header = [
        "length",
        "shape",
        *(["answer depth"] if depths else []),
        "method",
        "kept / prompt",
        "prefill s",
        "÷ full",
        "predicted",
        "KV ÷ full",
        "passages kept",
        "answer passage kept",
        "answer sentence kept",
        "accuracy (95% interval)",
        "answered when kept",
        "answered where full did",
    ]
    return report.markdown(header, [_cells(row, depths) for row in rows])


def _cells(row: dict, depths: bool) -> list[str]:
    """One summary row's table cells, with its answer depth when `depths`."""
    return [
        str(row["length"]),
        row["shape"],
        *([report._fmt(row["answer_depth"], ".0%")] if depths else []),
        row["method"],
        f"{row['kept_tokens']:.0f} / {row['prompt_tokens']:.0f}",
        report._fmt(row["prefill_seconds"], ".2f"),
        report._fmt(row["prefill_ratio"], ".2f", "×"),
        report._fmt(row["predicted_prefill_ratio"], ".2f", "×"),
        report._fmt(row["kv_ratio"], ".2f", "×"),
        report._fmt(row["documents_kept"], ".0%"),
        report._fmt(row["answer_kept"], ".0%"),
        report._fmt(row["needles_kept"], ".0%"),
        f"{row['correct']}/{row['runs']} ({row['interval'][0]:.2f}–{row['interval'][1]:.2f})",
        f"{row['kept_answered']}/{row['kept_runs']}",
        f"{row['both_answered']}/{row['full_answered']}" if "both_answered" in row else "–",
    ]
