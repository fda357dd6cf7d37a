"""Calibration probes (needles in a haystack, RAG-shaped prompts) and their records: one unpruned pass's seed
attention per probe, which schedules are replayed on, saved to and loaded from disk."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..corpora import rag
from ..engine import PromptDistillEngine
from ..probes import NeedleProbe, needle_probe
from ..prompt import RenderedPrompt
from ..spans import token_units

# Spans saved with records and searched on RAG probes: the retrieved documents and sentences as units.
SEARCH_SPANS = (
    ("token", None),
    ("chunk", 32),
    ("chunk", 64),
    ("sentence", None),
    ("document", None),
    ("passage", None),
)
RECORDS_VERSION = 1
RAG_ORDERS = ("spread", "rank")


@dataclass
class ProbeRecord:
    """One probe's unpruned seed attention [layers, heads, tokens], its evidence tokens (`evidence_tokens`: the
    needle, or for a RAG probe the sentence of the answer's passage that states the answer), its prunable tokens and
    its rendered prompt (the prompt layout's, so replayed selection drops what the engine would, in the same units).
    Records loaded from disk (`load_records`) have no rendered prompt, only the units saved with them. `labels`
    name the probe (kind "needle" or "rag", length, shape...)."""

    probe: object
    scores: torch.Tensor
    evidence_tokens: torch.Tensor
    prunable: torch.Tensor
    rendered: RenderedPrompt | None
    _units: dict = field(default_factory=dict, repr=False)
    labels: dict = field(default_factory=dict)

    def units(self, span: str, chunk_size: int | None) -> torch.Tensor | None:
        """The engine's span units for this probe (computed once per span; schedules replay thousands of times).

        Args:
            span: the span mode ("token", "chunk", "sentence", "document" or "passage").
            chunk_size: the chunk size for "chunk" spans.

        Returns:
            Each token's unit id, or None for token-level selection.

        Raises:
            ValueError: a loaded record was saved without these units.
        """
        if (span, chunk_size) not in self._units and span == "passage" and ("document", None) in self._units:
            # Records from before "passage" units: RAG probes name their documents, none holding a blank line, so
            # their passages are their documents.
            return self._units["document", None]
        if (span, chunk_size) not in self._units:
            if self.rendered is None:
                raise ValueError(
                    f"these records were saved without {span!r} units (chunk_size {chunk_size}); "
                    f"record them again with that span"
                )
            self._units[span, chunk_size] = token_units(self.rendered, self.prunable, span, chunk_size)
        return self._units[span, chunk_size]


def save_records(records: list[ProbeRecord], path: Path, spans=None) -> None:
    """Write `records` for `load_records`: only tensors and plain values, so they load with `weights_only=True`.

    Args:
        records: the records (scores are saved as float16, with the evidence, prunable mask and labels).
        path: the file written (its folder is created).
        spans: the (span, chunk size) units saved with each record (default `SEARCH_SPANS`).
    """
    spans = spans or SEARCH_SPANS
    data = [
        {
            "labels": r.labels,
            "scores": r.scores.half(),
            "evidence": r.evidence_tokens,
            "prunable": r.prunable,
            "units": {f"{span}:{chunk or 0}": r.units(span, chunk) for span, chunk in spans if span != "token"},
        }
        for r in records
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": RECORDS_VERSION, "records": data}, path)


def load_records(path: Path) -> list[ProbeRecord]:
    """Records written by `save_records`.

    Args:
        path: the records file.

    Returns:
        Its records, without rendered prompts (the saved units stand in).

    Raises:
        ValueError: the file is not a records file of this version.
    """
    try:
        data = torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets one clear message
        raise ValueError(f"{path} is not a pd-calibrate records file: {error}") from error
    if not isinstance(data, dict) or data.get("version") != RECORDS_VERSION:
        raise ValueError(f"{path} is not a version-{RECORDS_VERSION} pd-calibrate records file")
    records = []
    for item in data["records"]:
        units = {(key.split(":")[0], int(key.split(":")[1]) or None): value for key, value in item["units"].items()}
        units["token", None] = None
        records.append(
            ProbeRecord(None, item["scores"].float(), item["evidence"], item["prunable"], None, units, item["labels"])
        )
    return records


def make_probes(
    engine: PromptDistillEngine, haystack: str | None, lengths, depths, kinds, seed: int
) -> list[NeedleProbe]:
    """One needle probe per (length, depth, kind), each from its own seed.

    Args:
        engine: the engine whose tokenizer measures the lengths.
        haystack: a folder of `.txt` files, or None for the built-in haystack.
        lengths: context lengths in tokens.
        depths: relative needle depths.
        kinds: needle kinds (`probes.NEEDLE_KINDS`).
        seed: the first probe's seed; each next probe takes the next.

    Returns:
        The probes, length-major, then depth, then kind.

    Raises:
        ValueError: a length that doesn't fit the haystack or an unknown needle kind.
    """
    return [
        needle_probe(engine.tokenizer, length, depth, kind=kind, seed=seed + k, haystack=haystack)
        for k, (length, depth, kind) in enumerate(itertools.product(lengths, depths, kinds))
    ]


def rag_probes(tokenizer, lengths, samples: int, seed: int, orders) -> list[rag.RagProbe]:
    """Depot probes in the four prompt shapes for each passage order (see `calibrate_rag`).

    Args:
        tokenizer: the model's tokenizer, which measures the retrieved context.
        lengths: context lengths in tokens.
        samples: questions per length and shape.
        seed: the questions' seed.
        orders: passage orders among `RAG_ORDERS`: "spread" moves each answer passage to its own depth, "rank" keeps
            the retriever's.

    Returns:
        The probes, order-major.

    Raises:
        ValueError: no order, or an unknown one.
    """
    if not orders or set(orders) - set(RAG_ORDERS):
        raise ValueError(f"rag_orders must be one or more of {', '.join(RAG_ORDERS)}, got {list(orders)!r}")
    return [
        probe
        for order in orders
        for probe in rag.probes(tokenizer, list(lengths), list(rag.SHAPES), samples, seed, spread=order == "spread")
    ]


def record_probes(engine: PromptDistillEngine, probes: list[NeedleProbe]) -> list[ProbeRecord]:
    """Run every needle probe unpruned and keep its per-layer, per-head seed attention.

    Args:
        engine: the engine, configured with the scoring to record.
        probes: the needle probes.

    Returns:
        One record per probe, its evidence the needle's tokens.
    """
    records = []
    for probe in tqdm(probes, desc="recording attention", unit="probe"):
        rendered, layout, scores = engine.query_attention(
            messages=probe.messages(), query=probe.question, documents=[probe.context]
        )
        needle = _tokens_of(rendered, probe.needle, rendered.text.rfind(probe.needle))
        labels = {
            "kind": "needle",
            "length": len(probe.context) // 4,  # labels only: about 4 characters a token
            "depth": probe.depth,
            "needle_kind": probe.kind,
            "prompt_tokens": len(rendered.input_ids),
        }
        records.append(ProbeRecord(probe, scores.float().cpu(), needle, layout.prunable, rendered, labels=labels))
    return records


def record_rag_probes(engine: PromptDistillEngine, probes: list[rag.RagProbe]) -> list[ProbeRecord]:
    """Run every RAG probe (retrieved passages as `documents=`, in its prompt shape) unpruned.

    Args:
        engine: the engine, configured with the scoring to record.
        probes: the RAG probes (`rag_probes`).

    Returns:
        One record per probe, its evidence the answer's sentence in the answer's passage.
    """
    records = []
    for probe in tqdm(probes, desc="recording RAG attention", unit="probe"):
        prompt = probe.prompt
        rendered, layout, scores = engine.query_attention(
            messages=prompt.messages, query=prompt.query, documents=prompt.documents
        )
        passage_start = rendered.document_ranges[prompt.answer_index][0]
        start = rendered.text.index(probe.answer_sentence, passage_start)
        evidence = _tokens_of(rendered, probe.answer_sentence, start)
        labels = {
            "kind": "rag",
            "length": probe.labels["length"],
            "shape": probe.labels["shape"],
            "question": probe.labels["question"],
            "prompt_tokens": len(rendered.input_ids),
        }
        records.append(ProbeRecord(probe, scores.float().cpu(), evidence, layout.prunable, rendered, labels=labels))
    return records


def _tokens_of(rendered: RenderedPrompt, text: str, start: int) -> torch.Tensor:
    """The non-empty tokens of `rendered` that overlap `text` at character `start`."""
    end = start + len(text)
    return torch.tensor([i for i, (a, b) in enumerate(rendered.offsets) if a < end and b > start and b > a])
