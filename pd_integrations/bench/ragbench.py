"""`pd-bench rag`: RAG-shaped prompts (see `rag.py`) through every method, with answer accuracy and what selection
kept of the answer's passage.

Per (length, shape, sample) one question is asked over passages retrieved up to `length` context tokens, in rank
order (or, with `answer_depths`, with the answer's passage moved to each depth); the same questions are asked at
every length and shape. Records hold, besides the timings `measure` records:
- `score`: 1.0 when the answer appears in the greedy output (case-insensitive, as a whole phrase);
- `answer_kept`: the share of the answer passage's characters that selection kept (`document_retention`);
- `needles_kept`: 1.0 when the sentence that states the answer was kept whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from ..engine import PromptDistillEngine
from ..kept_view import document_retention
from . import measure, report
from .depots import make_depot_questions, make_depots
from .rag import SHAPES, RagPrompt, contains, make_handbook, make_questions, move_answer, rag_prompt, retrieve

# name: (corpus maker(seed), question maker(corpus, n, seed)). "depots" is the default: one genre, one fact form,
# answerable by the default model with full attention; "handbook" is harder (city and policy both to match).
CORPORA = {"depots": (make_depots, make_depot_questions), "handbook": (make_handbook, make_questions)}

CONTEXT_SOURCES = ("documents", "none")
MAX_NEW_TOKENS = 32  # room for a sentence around the answer: question-first asks for up to three
COLUMNS_NOTE = (
    "Means over the questions of each row. ÷ full: the method's figure divided by full attention's on the "
    "same prompts (same length and shape). Answer passage kept: share of the answer passage's "
    "characters that selection kept; answer sentence kept: share of runs that kept the sentence stating "
    "the answer whole. Accuracy: runs whose greedy answer contains the expected answer "
    "(case-insensitive)."
)


@dataclass(frozen=True)
class RagProbe:
    """One benchmark prompt: its place in the grid (`labels`), the prompt, and the answer's sentence."""

    labels: dict
    prompt: RagPrompt
    answer_sentence: str
    max_new_tokens: int


def probes(
    tokenizer,
    lengths: list[int],
    shapes: list[str],
    samples: int,
    seed: int = 0,
    *,
    corpus_seed: int = 0,
    answer_depths: list[float] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    corpus: str = "depots",
    spread: bool = False,
) -> list[RagProbe]:
    """`samples` questions (drawn by `seed`) per length and shape, each over the passages of `corpus` (a name in
    CORPORA) retrieved for it up to `length` context tokens, in rank order, or with the answer's passage moved to
    each of `answer_depths` (relative, 0 = first); length-major, then sample, then depth, then shape.

    The retriever ranks the answer's passage first for nearly every question, which lets a selector that favours
    the start of the context look right. With `spread`, sample k's answer passage is moved to relative depth
    (k + 0.5) / samples instead (labelled `answer_position`; rows still aggregate over samples)."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {', '.join(CORPORA)}, got {corpus!r}")
    make_corpus, make_qs = CORPORA[corpus]
    name = corpus
    corpus = make_corpus(corpus_seed)
    questions = make_qs(corpus, samples, seed)
    result = []
    for length in lengths:
        for sample, question in enumerate(questions):
            ranked = retrieve(question, corpus, tokenizer, length)
            position = (sample + 0.5) / samples if spread else None
            if spread:
                ranked = move_answer(ranked, question.passage_id, position)
            for depth in answer_depths or [None]:
                passages = ranked if depth is None else move_answer(ranked, question.passage_id, depth)
                for shape in shapes:
                    prompt = rag_prompt(shape, question, passages)
                    labels = {
                        "corpus": name,
                        "length": length,
                        "shape": shape,
                        "sample": seed + sample,
                        "question": question.question,
                        "answer": question.answer,
                        "passages": len(passages),
                        "answer_depth": depth,
                        "answer_position": position,
                        "answer_index": prompt.answer_index,
                    }
                    result.append(
                        RagProbe(
                            labels,
                            prompt,
                            _sentence(prompt.documents[prompt.answer_index], question.answer),
                            max_new_tokens,
                        )
                    )
    return result


def _sentence(text: str, answer: str) -> str:
    return next(s for s in re.split(r"(?<=[.;])\s+", text) if answer in s)


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
        measure_one=lambda engine, probe, device: _measure(engine, probe, device, context_source),
    )


def _measure(engine: PromptDistillEngine, probe: RagProbe, device, context_source: str) -> dict:
    prompt = probe.prompt
    documents = prompt.documents if context_source == "documents" else None
    result, peak = measure._with_peak_memory(
        device,
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
        "needles_kept": measure.needles_kept(result.prompt_text, result.kept_char_spans, (probe.answer_sentence,)),
    }


def summarize(records: list[dict]) -> list[dict]:
    """One row per (length, shape, answer depth, method) in that order, with `report.summarize`'s means and ratios
    against full attention on the same prompts, plus `answer_kept`, `documents_kept` and `correct` (a count)."""
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
                    "answer_kept": mean(r["answer_kept"] for r in group),
                    "documents_kept": mean(r["documents_kept"] for r in group),
                }
            )
    return sorted(rows, key=lambda row: row["length"])  # stable: shapes, depths and methods keep their order


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
        "accuracy",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(
                [
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
                    f"{row['correct']}/{row['runs']} ({row['accuracy']:.0%})",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def plot_frontier(tried: list[dict], path, length: int, marks: dict[str, tuple[float, float]] | None = None) -> None:
    """The accuracy/speed frontier of a RAG calibration search (`calibrate.rag_search` rows, as written to its
    `.search.json`): every schedule tried as a point (predicted prefill ratio at `length` tokens, share of probes
    whose answer sentence it keeps), one-stage and two-stage in two colours, the frontier drawn as a step line, and
    `marks` (label: (ratio, share)) such as the shipped profile's measured point. Written as a PNG to `path`."""
    plt = report._pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    key = str(length)
    for stages, colour, label in ((1, "tab:blue", "one stage"), (2, "tab:orange", "two stages")):
        points = [
            (row["predicted_prefill_ratio"][key], row["kept_share"])
            for row in tried
            if len(row["schedule"]["selection_layers"]) == stages
        ]
        if points:
            axis.scatter(*zip(*points), s=6, alpha=0.35, color=colour, label=f"{label} ({len(points)})")
    frontier, best = [], -1.0
    for ratio, share in sorted((row["predicted_prefill_ratio"][key], row["kept_share"]) for row in tried):
        if share > best:
            frontier.append((ratio, share))
            best = share
    if frontier:
        axis.step(*zip(*frontier), where="post", color="black", linewidth=1, label="frontier")
    for label, (ratio, share) in (marks or {}).items():
        axis.scatter([ratio], [share], s=60, marker="*", zorder=3)
        axis.annotate(label, (ratio, share), textcoords="offset points", xytext=(6, -12), fontsize=8)
    axis.set_xlabel(f"predicted prefill time ÷ full attention at {length} tokens (cost model)")
    axis.set_ylabel("share of RAG probes whose answer sentence is kept")
    axis.set_xlim(0, 1.02)
    axis.set_ylim(-0.02, 1.05)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
