"""Measure where a model's question→context retrieval happens and pick the fastest schedule that keeps it.

    pd-calibrate --model NAME [--haystack DIR] [--lengths 2000 4000] [--verify 10]
    pd-calibrate --rag [--rag-lengths 1000 2000] [--rag-samples 4] [--records PATH] | --from-records PATH...

1. Probes: needles of several kinds at several depths and lengths in a haystack (no download).
2. One unpruned pass per probe records every layer's and head's seed attention.
3. Per layer and head: how often the needle's best token ranks in the top candidates (512, or a quarter of the
   shortest length when less).
4. Schedules (single- and two-stage; layers, budgets, token/chunk spans, all heads or the layer's retrieval heads)
   are replayed on the recorded scores: a schedule *keeps* a probe when every needle token survives every stage.
   This is exact for the first stage (earlier layers are unpruned); later stages are approximated with the
   unpruned pass's scores.
5. The cheapest schedule (layer-rows cost model at `--plan-length` tokens) that keeps every probe is verified end to
   end against full attention on `--verify` probes; the first that answers as often as full attention wins.
6. The profile is written to the cache (`$PD_INTEGRATIONS_CACHE/profiles/<model>.json`), where engines find it.

`--rag` calibrates on RAG-shaped probes instead (`calibrate_rag`): depot notes retrieved by MiniLM in the three
prompt shapes, each sample's answer passage moved to its own depth. Every single-stage schedule (layer, all heads or
one head, span unit, unit scoring, budget fraction) is judged exactly from `tokens_needed`, two-stage pairs of the
best early and late stages are replayed, schedules are ranked by `predicted_prefill_ratio` (an attention-aware cost
model), and the five cheapest that keep every probe's answer sentence are verified end to end: the first whose real
runs keep every verification probe's answer sentence and answer as often as full attention wins. Its stages are
floored at what they keep of `--floor-length` prunable tokens. Its records are saved (`--records`), and
`--from-records` re-searches them without the model.

`--compare-scoring` instead measures step 3 for each seed/aggregation choice (question span with softmax mean,
softmax max or logit mean; the paper's last token with logit mean), with all heads, and prints it per layer.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .config import BudgetRule, Profile, PromptDistillConfig, budget_to_json, cache_dir, profile_key, resolve_budget
from .engine import PromptDistillEngine
from .loading import DEFAULT_MODEL
from .probes import NEEDLE_KINDS, NeedleProbe, needle_probe
from .prompt import RenderedPrompt
from .selection import Selector
from .spans import row_units

BUDGETS = (256, 512, 1024, 2048)
SPANS = (("token", None), ("chunk", 32), ("chunk", 64))
# Spans saved with records and searched on RAG probes: the retrieved documents and sentences as units.
SEARCH_SPANS = (
    ("token", None),
    ("chunk", 32),
    ("chunk", 64),
    ("sentence", None),
    ("document", None),
    ("passage", None),
)


@dataclass
class ProbeRecord:
    """One probe's unpruned seed attention [layers, heads, tokens], its evidence tokens (`needle_tokens`: the
    needle, or for a RAG probe the sentence of the answer's passage that states the answer), its prunable tokens and
    its rendered prompt (the row layout's, so replayed selection drops what the engine would, in the same units).
    Records loaded from disk (`load_records`) have no rendered prompt, only the units saved with them. `labels`
    name the probe (kind "needle" or "rag", length, shape...)."""

    probe: object
    scores: torch.Tensor
    needle_tokens: torch.Tensor
    prunable: torch.Tensor
    rendered: RenderedPrompt | None
    _units: dict = field(default_factory=dict, repr=False)
    labels: dict = field(default_factory=dict)

    def units(self, span: str, chunk_size: int | None) -> torch.Tensor | None:
        """The engine's span units for this probe (computed once per span; schedules replay thousands of times)."""
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
            self._units[span, chunk_size] = row_units(self.rendered, self.prunable, span, chunk_size)
        return self._units[span, chunk_size]


RECORDS_VERSION = 1


def save_records(records: list[ProbeRecord], path: Path, spans=None) -> None:
    """Write `records` (scores as float16, evidence, prunable mask, labels and the units of every span in `spans`,
    default `SEARCH_SPANS`) to `path` for `load_records`; only tensors and plain values, so it loads with
    `weights_only=True`."""
    spans = spans or SEARCH_SPANS
    data = [
        {
            "labels": r.labels,
            "scores": r.scores.half(),
            "evidence": r.needle_tokens,
            "prunable": r.prunable,
            "units": {f"{span}:{chunk or 0}": r.units(span, chunk) for span, chunk in spans if span != "token"},
        }
        for r in records
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": RECORDS_VERSION, "records": data}, path)


def load_records(path: Path) -> list[ProbeRecord]:
    """Records written by `save_records`; raises `ValueError` for a file that is not one."""
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
    """One needle probe per (length, depth, kind), each from its own seed."""
    return [
        needle_probe(engine.tokenizer, length, depth, kind=kind, seed=seed + k, haystack=haystack)
        for k, (length, depth, kind) in enumerate(itertools.product(lengths, depths, kinds))
    ]


def report_budget(lengths) -> int:
    """The candidate rank within which a needle counts as found in the per-layer and per-head tables."""
    return min(BUDGETS[1], min(lengths) // 4)


def record_probes(engine: PromptDistillEngine, probes: list[NeedleProbe]) -> list[ProbeRecord]:
    """Run every probe unpruned and keep its per-layer, per-head seed attention."""
    records = []
    for probe in tqdm(probes, desc="recording attention", unit="probe"):
        rendered, layout, scores = engine.query_attention(
            messages=probe.messages(), query=probe.question, documents=[probe.context]
        )
        start = rendered.text.rfind(probe.needle)
        end = start + len(probe.needle)
        needle = [i for i, (a, b) in enumerate(rendered.offsets) if a < end and b > start and b > a]
        records.append(
            ProbeRecord(
                probe,
                scores.float().cpu(),
                torch.tensor(needle),
                layout.prunable,
                rendered,
                labels={
                    "kind": "needle",
                    "length": probe_length(probe),
                    "depth": probe.depth,
                    "needle_kind": probe.kind,
                    "prompt_tokens": len(rendered.input_ids),
                },
            )
        )
    return records


def probe_length(probe: NeedleProbe) -> int:
    return len(probe.context) // 4  # labels only: about 4 characters a token


def record_rag_probes(engine: PromptDistillEngine, probes: list) -> list[ProbeRecord]:
    """Run every RAG probe (`bench.ragbench.RagProbe`: retrieved passages as `documents=`, in its prompt shape)
    unpruned; the evidence is the answer's sentence in the answer's passage."""
    records = []
    for probe in tqdm(probes, desc="recording RAG attention", unit="probe"):
        prompt = probe.prompt
        rendered, layout, scores = engine.query_attention(
            messages=prompt.messages, query=prompt.query, documents=prompt.documents
        )
        start = rendered.document_ranges[prompt.answer_index][0]
        start = rendered.text.index(probe.answer_sentence, start)
        end = start + len(probe.answer_sentence)
        evidence = [i for i, (a, b) in enumerate(rendered.offsets) if a < end and b > start and b > a]
        labels = {
            "kind": "rag",
            "length": probe.labels["length"],
            "shape": probe.labels["shape"],
            "question": probe.labels["question"],
            "prompt_tokens": len(rendered.input_ids),
        }
        records.append(
            ProbeRecord(probe, scores.float().cpu(), torch.tensor(evidence), layout.prunable, rendered, labels=labels)
        )
    return records


def needle_rank_table(records: list[ProbeRecord], budget: int) -> torch.Tensor:
    """[layers, heads] share of probes whose best needle token ranks within `budget` of the candidates."""
    hits = []
    for record in records:
        candidates = record.scores[..., record.prunable]
        # Needle tokens the layout protects are always kept; rank the prunable ones among the candidates.
        needle = record.needle_tokens[record.prunable[record.needle_tokens]]
        if needle.numel() == 0:
            hits.append(torch.ones(record.scores.shape[:2]))
            continue
        needle = torch.cumsum(record.prunable.long(), 0)[needle] - 1
        best = candidates[..., needle].amax(-1, keepdim=True)
        rank = (candidates > best).sum(-1)
        hits.append((rank < budget).float())
    return torch.stack(hits).mean(0)


def choose_retrieval_heads(table: torch.Tensor) -> dict[int, tuple[int, ...]]:
    """Per layer of a [layers, heads] needle-recall table (`needle_rank_table`), its retrieval heads: its best third
    of heads by recall (at least one), sorted, when their mean beats the layer's head average; layers whose best
    heads don't beat it are left out."""
    num_heads = table.shape[1]
    retrieval_heads = {}
    for layer in range(table.shape[0]):
        order = torch.argsort(table[layer], descending=True)[: max(1, num_heads // 3)]
        if table[layer, order].mean() > table[layer].mean():
            retrieval_heads[layer] = tuple(sorted(order.tolist()))
    return retrieval_heads


# The seed and aggregation choices compared by `compare_scoring`: the question span with each aggregation, and the
# paper's rule (its pooling aside).
SCORINGS = {
    "question, softmax mean": {"query_source": "auto", "aggregation": "softmax_mean"},
    "question, softmax max": {"query_source": "auto", "aggregation": "softmax_max"},
    "question, logit mean": {"query_source": "auto", "aggregation": "logits_mean"},
    "last token, logit mean (paper)": {"query_source": "last_token", "aggregation": "logits_mean"},
}


def compare_scoring(engine: PromptDistillEngine, probes: list[NeedleProbe], budget: int) -> dict[str, list[float]]:
    """Per entry of `SCORINGS`, per layer: the share of probes whose needle's best token ranks within `budget` of
    the candidates when every head scores, aggregated as that scoring does."""
    recall = {}
    for name, scoring in SCORINGS.items():
        selector = Selector(scoring["aggregation"], 1)
        records = record_probes(engine.with_config(PromptDistillConfig(**scoring)), probes)
        for record in records:
            record.scores = torch.stack([selector.score(layer) for layer in record.scores])[:, None]
        recall[name] = [round(float(v), 3) for v in needle_rank_table(records, budget)[:, 0]]
    return recall


@dataclass(frozen=True)
class Schedule:
    """A candidate profile: stages of (layer, budget, heads) with one span mode, unit scoring and detrend window.
    Budgets are ints, fractions or length-aware `BudgetRule`s (see `config.BudgetRule`)."""

    stages: tuple[tuple[int, int | float | BudgetRule, tuple[int, ...] | None], ...]
    span: str
    chunk_size: int | None
    unit_score: str = "max"
    detrend_window: int = 0

    def settings(self) -> dict:
        settings = {
            "selection_layers": [s[0] for s in self.stages],
            "budgets": [budget_to_json(s[1]) for s in self.stages],
            "heads": None if all(s[2] is None for s in self.stages) else [s[2] for s in self.stages],
            "query_source": "auto",
            "aggregation": "softmax_mean",
            "pool_kernel": 1,
            "span": self.span,
            "chunk_size": self.chunk_size or 32,
        }
        if self.unit_score != "max":
            settings["unit_score"] = self.unit_score
        if self.detrend_window:
            settings["detrend_window"] = self.detrend_window
        return settings

    def selector(self) -> Selector:
        return Selector("softmax_mean", 1, self.unit_score, detrend_window=self.detrend_window)

    @classmethod
    def of(cls, config: PromptDistillConfig) -> Schedule:
        """The schedule of a resolved selecting config."""
        heads = config.heads or (None,) * len(config.selection_layers)
        return cls(
            tuple(zip(config.selection_layers, config.budgets, heads)),
            config.span,
            config.chunk_size,
            config.unit_score or "max",
            config.detrend_window or 0,
        )

    def floored(self, length: int) -> Schedule:
        """The schedule with each rule stage keeping at least what it keeps of `length` prunable tokens: shorter
        contexts are pruned as if they were that long, longer ones exactly as before."""

        def floored_rule(rule: BudgetRule) -> BudgetRule:
            return BudgetRule(rule.fraction, max(rule.floor, rule.resolve(length)), rule.cap)

        return replace(
            self,
            stages=tuple(
                (layer, floored_rule(budget) if isinstance(budget, BudgetRule) else budget, heads)
                for layer, budget, heads in self.stages
            ),
        )

    def budgets_at(self, prunable: int) -> list[int]:
        """Tokens each stage keeps of `prunable` context tokens (as `RowLayout.stage_budgets` resolves them)."""
        resolved = [resolve_budget(budget, prunable) for _, budget, _ in self.stages]
        return [min(resolved[: i + 1]) for i in range(len(resolved))]

    def cost(self, num_layers: int, length: int, protected: int = 20) -> float:
        """Share of full attention's layer-rows the schedule processes at `length` prompt tokens, `protected` of
        them not prunable."""
        rows, total, start = length, 0, 0
        for (layer, _, _), budget in zip(self.stages, self.budgets_at(max(0, length - protected))):
            total += (layer + 1 - start) * rows
            rows, start = min(rows, budget + protected), layer + 1
        total += (num_layers - start) * rows
        return total / (num_layers * length)


# The prefill cost model: a layer processing `rows` rows costs rows * (ROW_COST + rows / 2), a per-row term (the
# projections and MLP) plus causal attention to rows / 2 keys on average, in units of one key's attention. Fitted to
# SmolLM2-135M on this project's 2-core CPU (full attention's 8k/4k prefill-time ratio, 2.9); it predicted the old
# profile's measured prefill ratios (0.37 at 8k, 0.58 at 4k) within 0.02.
ROW_COST = 2300


def layer_cost(rows: int, row_cost: float = ROW_COST) -> float:
    """The cost model's time for one layer over `rows` rows."""
    return rows * (row_cost + rows / 2)


def predicted_prefill_ratio(
    schedule: Schedule, num_layers: int, length: int, protected: int = 60, row_cost: float = ROW_COST
) -> float:
    """The cost model's prefill time of `schedule` over full attention's at `length` prompt tokens, `protected` of
    them not prunable (selection and gathers are not counted)."""
    rows, total, start = length, 0.0, 0
    for (index, _, _), budget in zip(schedule.stages, schedule.budgets_at(max(0, length - protected))):
        total += (index + 1 - start) * layer_cost(rows, row_cost)
        rows, start = min(rows, budget + protected), index + 1
    total += (num_layers - start) * layer_cost(rows, row_cost)
    return total / (num_layers * layer_cost(length, row_cost))


def predicted_ratio_of(
    config: PromptDistillConfig, num_layers: int, prompt_tokens: int, protected_tokens: int
) -> float | None:
    """The cost model's prefill ratio for a resolved `config` on a prompt of `prompt_tokens` tokens, `protected_tokens`
    of them not prunable; None for full attention. GemFilter pays its scout layers on every row and then the whole
    model on the kept rows."""
    if config.method == "full":
        return None
    schedule = Schedule.of(config)
    if config.method == "gemfilter":
        ((layer, _, _),) = schedule.stages
        kept = min(prompt_tokens, schedule.budgets_at(prompt_tokens - protected_tokens)[0] + protected_tokens)
        full = num_layers * layer_cost(prompt_tokens)
        return ((layer + 1) * layer_cost(prompt_tokens) + num_layers * layer_cost(kept)) / full
    return predicted_prefill_ratio(schedule, num_layers, prompt_tokens, protected_tokens)


def keeps_needle(schedule: Schedule, record: ProbeRecord) -> bool:
    """Replay `schedule` on the recorded scores; True when every evidence token (the needle, or a RAG probe's
    answer sentence) survives every stage."""
    selector = schedule.selector()
    kept = torch.arange(record.scores.shape[-1])
    remaining = int(record.prunable.sum())
    units = record.units(schedule.span, schedule.chunk_size)
    for (layer, _, heads), budget in zip(schedule.stages, schedule.budgets_at(remaining)):
        if budget >= remaining:
            continue
        scores = selector.score(record.scores[layer][:, kept], heads)
        kept = kept[
            selector.keep(scores, record.prunable[kept], remaining, budget, units[kept] if units is not None else None)
        ]
        remaining = budget
    return bool(torch.isin(record.needle_tokens, kept).all())


def tokens_needed(
    record: ProbeRecord,
    layer: int,
    heads: tuple[int, ...] | None,
    span: str,
    chunk_size: int | None,
    unit_score: str = "max",
    detrend_window: int = 0,
) -> int:
    """The smallest single-stage budget at `layer` from which every larger one keeps every prunable evidence token
    of `record` (0 when no evidence token is prunable): the candidate tokens of every unit the selector ranks before
    the evidence's last unit, plus the shortest window of that unit from which the selector's best window (see
    `selection._top_units`) always covers its evidence. A single-stage schedule keeps the evidence whenever its
    resolved budget is at least this, so every budget and budget rule can be judged from one number per probe.
    (A few budgets below it may keep the evidence too, when a shorter best window happens to cover it; the
    search counts them as losses.)"""
    from .selection import best_window_starts, score_prefix, unit_ranks

    selector = Selector("softmax_mean", 1, detrend_window=detrend_window)
    candidates = record.prunable.nonzero().flatten()
    evidence = record.needle_tokens[record.prunable[record.needle_tokens]]
    if evidence.numel() == 0:
        return 0
    scores = selector.candidate_scores(selector.score(record.scores[layer], heads)[candidates])
    units = record.units(span, chunk_size)
    if units is None:  # tokens: everything scoring at least the weakest evidence token (ties count against it)
        weakest = scores[torch.searchsorted(candidates, evidence)].min()
        return int((scores >= weakest).sum())
    rank = unit_ranks(scores, units[candidates], unit_score)
    evidence_rows = torch.searchsorted(candidates, evidence)
    last = rank[evidence_rows].max()
    before = int((rank < last).sum())
    unit_rows = (rank == last).nonzero().flatten()
    first, size = int(unit_rows[0]), unit_rows.numel()
    # The same prefix sums as the selector's, so the windows compared are the same floats.
    prefix = score_prefix(scores)[first : first + size + 1]
    lengths = torch.arange(1, size + 1)
    starts = best_window_starts(prefix, torch.ones(size, dtype=torch.bool), lengths)
    in_unit = evidence_rows[rank[evidence_rows] == last] - first
    covers = (starts <= in_unit.min()) & (starts + lengths > in_unit.max())
    misses = (~covers).nonzero()
    return before + (int(misses[-1]) + 2 if misses.numel() else 1)


def rag_search(
    records: list[ProbeRecord],
    num_layers: int,
    plan_lengths=(2000, 4000, 8000),
    first_fractions=(0.4, 0.5, 0.6, 0.7, 0.8),
    second_fractions=(0.15, 0.175, 0.2, 0.25, 0.3),
    shortlist: int = 6,
    spans=(("passage", None),),
    scorings=("max", "topk_mean"),
    detrend_windows=(0, 512, 1024),
) -> list[dict]:
    """Every schedule tried on the RAG (and needle) `records`, as dicts with the schedule, its kept share and its
    predicted prefill ratio per plan length, cheapest first among equal shares.

    Single-stage schedules (every layer from 2, all heads and each single head, each span unit, unit scoring and
    detrend window, every fraction) are judged exactly from `tokens_needed`. Two-stage ones pair the `shortlist`
    cheapest early stages (layer < 2/3 of the depth) that keep every record at one of `first_fractions` with the
    `shortlist` best later stages of the same scoring, at each of `second_fractions`, replayed with `keeps_needle`
    (the second stage scored from the unpruned pass: an approximation)."""
    heads_options = [None] + [(h,) for h in range(records[0].scores.shape[1])]
    prunable = torch.tensor([int(r.prunable.sum()) for r in records]).float()
    fractions = sorted(set(first_fractions) | set(second_fractions))
    scoring_options = [
        (span, chunk, scoring, window)
        for (span, chunk), scoring, window in itertools.product(spans, scorings, detrend_windows)
    ]
    tried, exact = [], []
    for layer in tqdm(range(2, num_layers - 1), desc="single-stage search", unit="layer", leave=False):
        for heads, (span, chunk, scoring, window) in itertools.product(heads_options, scoring_options):
            needed = (
                torch.tensor([tokens_needed(r, layer, heads, span, chunk, scoring, window) for r in records]) / prunable
            )
            exact.append((float(needed.max()), layer, heads, (span, chunk, scoring, window)))
            for f in fractions:
                schedule = Schedule(((layer, BudgetRule(f), heads),), span, chunk, scoring, window)
                tried.append((schedule, float((needed <= f + 1e-9).float().mean())))
    for scoring in scoring_options:
        options = [e for e in exact if e[3] == scoring]
        early = sorted(
            (e for e in options if e[1] < num_layers * 2 // 3 and e[0] <= max(first_fractions)),
            key=lambda e: (e[1], e[0]),
        )[:shortlist]
        late = sorted((e for e in options if e[1] >= num_layers // 3), key=lambda e: e[0])[:shortlist]
        for first, second in itertools.product(early, late):
            if second[1] <= first[1]:
                continue
            f1 = min(f for f in first_fractions if f >= first[0] - 1e-9)
            for f2 in second_fractions:
                schedule = Schedule(
                    ((first[1], BudgetRule(f1), first[2]), (second[1], BudgetRule(f2), second[2])), *scoring
                )
                tried.append((schedule, sum(keeps_needle(schedule, r) for r in records) / len(records)))
    rows = [
        {
            "schedule": schedule,
            "kept_share": share,
            "predicted_prefill_ratio": {
                n: round(predicted_prefill_ratio(schedule, num_layers, n), 3) for n in plan_lengths
            },
        }
        for schedule, share in tried
    ]
    return sorted(
        rows, key=lambda row: (-row["kept_share"], sum(row["predicted_prefill_ratio"].values()) / len(plan_lengths))
    )


def candidate_schedules(
    num_layers: int, retrieval_heads: dict[int, tuple[int, ...]], max_length: int
) -> list[Schedule]:
    """Single-stage schedules at every selectable layer from a quarter of the depth, each with all heads or the
    layer's retrieval heads, and two-stage ones that keep twice the budget early and the budget later."""
    budgets = [b for b in BUDGETS if b < max_length]
    layers = range(num_layers // 4, num_layers - 1)
    schedules = []
    for span, chunk in SPANS:
        for layer, budget in itertools.product(layers, budgets):
            for heads in (None, retrieval_heads.get(layer)):
                schedules.append(Schedule(((layer, budget, heads),), span, chunk))
        for first, second, budget in itertools.product(layers, layers, budgets):
            if second > first and budget * 2 < max_length:
                schedules.append(Schedule(((first, budget * 2, None), (second, budget, None)), span, chunk))
    return list(dict.fromkeys(schedules))


def answer_rate(engine: PromptDistillEngine, probes: list[NeedleProbe], desc: str) -> tuple[float, float]:
    """(share of needle `probes` answered, share whose needle sentence the engine kept), end to end."""
    from .bench.measure import needles_kept

    answered = kept = 0
    for probe in tqdm(probes, desc=desc, unit="probe", leave=False):
        result = engine.generate(
            messages=probe.messages(), query=probe.question, documents=[probe.context], max_new_tokens=24
        )
        answered += probe.is_answered(result.text)
        kept += needles_kept(result.prompt_text, result.kept_char_spans, (probe.needle,))
    return answered / len(probes), kept / len(probes)


def verification_probes(probes: list, count: int) -> list:
    """`count` of `probes`, evenly spaced over them (none for 0)."""
    return probes[:: max(1, len(probes) // count)][:count] if count else []


class Verification(NamedTuple):
    """The schedule verification chose, its answer rate and full attention's (None when unverified), and every
    candidate run: its layers, budgets and heads with the shares of probes it answered and whose evidence it kept."""

    chosen: Schedule
    rate: float | None
    full_rate: float | None
    runs: list[dict]


def verify_schedules(
    engine: PromptDistillEngine, ranked: list[Schedule], probes: list, rate_of: Callable = answer_rate
) -> Verification:
    """Run `probes` end to end (`rate_of(engine, probes, description)` -> (answered share, evidence-kept share):
    `answer_rate` for needles, `rag_answer_rate` for RAG probes) and choose the first of the five cheapest `ranked`
    schedules that keeps every probe's evidence in a real run (the search replays stage 2 on the unpruned pass,
    which a real run can disagree with) and answers as often as full attention; else (with a warning) the
    cheapest. Without probes, the cheapest, unverified."""
    if not probes:
        return Verification(ranked[0], None, None, [])
    full_rate, _ = rate_of(engine.with_config(PromptDistillConfig(method="full")), probes, "full attention")
    runs = []
    for schedule in ranked[:5]:
        settings = schedule.settings()
        rate, kept = rate_of(
            engine.with_config(PromptDistillConfig(**settings)),
            probes,
            f"verifying layers {settings['selection_layers']}",
        )
        runs.append(
            {key: settings[key] for key in ("selection_layers", "budgets", "heads")}
            | {"answered": rate, "evidence_kept": kept}
        )
        if kept == 1.0 and rate >= full_rate:
            return Verification(schedule, rate, full_rate, runs)
    warnings.warn(
        "no candidate kept every verification probe's evidence and matched full attention's accuracy; "
        "keeping the cheapest schedule that keeps it in the search",
        stacklevel=3,
    )
    return Verification(ranked[0], None, full_rate, runs)


def calibrate(
    model: str = DEFAULT_MODEL,
    *,
    engine: PromptDistillEngine | None = None,
    haystack: str | None = None,
    lengths: tuple[int, ...] = (2000, 4000),
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
    kinds: tuple[str, ...] = ("passcode", "city", "magic_word"),
    seed: int = 0,
    verify: int = 10,
    plan_length: int = 8192,
    out: Path | None = None,
) -> Profile:
    """Calibrate `model` (or an already loaded `engine`) and write its profile; returns the `Profile`.

    Raises `ValueError` for lengths that don't fit the model or an unknown needle kind.
    """
    engine = engine or PromptDistillEngine.from_pretrained(model)
    scorer = engine.with_config(PromptDistillConfig(query_source="auto", aggregation="softmax_mean"))
    num_layers = engine.arch.num_layers
    probes = make_probes(engine, haystack, lengths, depths, kinds, seed)
    records = record_probes(scorer, probes)

    table = needle_rank_table(records, report_budget(lengths))
    retrieval_heads = choose_retrieval_heads(table)
    schedules = candidate_schedules(num_layers, retrieval_heads, max(lengths))
    kept_share = {
        s: sum(keeps_needle(s, r) for r in records) / len(records)
        for s in tqdm(schedules, desc="replaying schedules", unit="schedule")
    }
    best_share = max(kept_share.values())
    if best_share < 1:
        warnings.warn(
            f"no schedule kept every probe's needle (best {best_share:.0%}); choosing among the best", stacklevel=2
        )
    ranked = sorted(
        (s for s in schedules if kept_share[s] == best_share),
        key=lambda s: (s.cost(num_layers, plan_length), -s.stages[-1][1]),
    )

    verify_probes = verification_probes(probes, verify)
    chosen, chosen_rate, full_rate, runs = verify_schedules(engine, ranked, verify_probes)

    profile = Profile(profile_key(model), num_layers, chosen.settings())
    measurements = {
        "calibration": {
            "probes": len(probes),
            "lengths": list(lengths),
            "depths": list(depths),
            "kinds": list(kinds),
            "seed": seed,
            "plan_length": plan_length,
            "needle_recall_at_budget": report_budget(lengths),
            "layer_needle_recall": [round(float(v), 3) for v in table.mean(1)],
            "retrieval_heads": {str(k): list(v) for k, v in retrieval_heads.items()},
            "predicted_kept_share": best_share,
            "predicted_prefill_cost": round(chosen.cost(num_layers, plan_length), 3),
            "verified_accuracy": chosen_rate,
            "full_attention_accuracy": full_rate,
            "verification_runs": runs,
            "verification_probes": len(verify_probes),
        }
    }
    out = out or cache_dir() / "profiles" / f"{profile.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.to_json(out, measurements)
    return Profile.from_json(out)


def rag_answer_rate(engine: PromptDistillEngine, probes: list, desc: str) -> tuple[float, float]:
    """(share of RAG `probes` answered, share whose answer sentence the engine kept), end to end."""
    from .bench.handbook import contains
    from .bench.measure import needles_kept

    answered = kept = 0
    for probe in tqdm(probes, desc=desc, unit="probe", leave=False):
        prompt = probe.prompt
        result = engine.generate(
            messages=prompt.messages, query=prompt.query, documents=prompt.documents, max_new_tokens=24
        )
        answered += contains(result.text, prompt.answer)
        kept += needles_kept(result.prompt_text, result.kept_char_spans, (probe.answer_sentence,))
    return answered / len(probes), kept / len(probes)


RAG_ORDERS = ("spread", "rank")


def rag_probes(tokenizer, lengths, samples: int, seed: int, orders) -> list:
    """Depot probes in the three prompt shapes for each passage order in `orders` (see `calibrate_rag`); raises
    `ValueError` naming an unknown order."""
    from .bench import ragbench

    if not orders or set(orders) - set(RAG_ORDERS):
        raise ValueError(f"rag_orders must be one or more of {', '.join(RAG_ORDERS)}, got {list(orders)!r}")
    return [
        probe
        for order in orders
        for probe in ragbench.probes(
            tokenizer, list(lengths), list(ragbench.SHAPES), samples, seed, spread=order == "spread"
        )
    ]


def _rag_records(
    engine: PromptDistillEngine, probes: list, from_records: list[Path] | None, records_path: Path
) -> list[ProbeRecord]:
    """The records saved at `from_records`, or `probes` recorded now and saved to `records_path`."""
    if from_records:
        return [record for path in from_records for record in load_records(path)]
    scorer = engine.with_config(PromptDistillConfig(query_source="auto", aggregation="softmax_mean"))
    records = record_rag_probes(scorer, probes)
    save_records(records, records_path)
    return records


def _save_search(tried: list[dict], path: Path) -> Path:
    """Write `rag_search`'s rows, schedules as settings dicts, to `path` (returned)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{**row, "schedule": row["schedule"].settings()} for row in tried]) + "\n")
    return path


def _plot_search(search_path: Path, chosen: Schedule, kept_share: float, num_layers: int, length: int) -> None:
    """The accuracy/speed frontier of the search written at `search_path`, at `length` tokens, with `chosen`
    marked, beside it (`.frontier.png`); skipped without matplotlib (the `bench` extra)."""
    if not importlib.util.find_spec("matplotlib"):
        return
    from .bench.ragbench import plot_frontier

    ratio = predicted_prefill_ratio(chosen, num_layers, length)
    plot_frontier(
        json.loads(search_path.read_text()),
        search_path.with_name(search_path.name.replace(".search.json", ".frontier.png")),
        length,
        {f"chosen profile (predicted {ratio:.2f})": (ratio, kept_share)},
    )


def calibrate_rag(
    model: str = DEFAULT_MODEL,
    *,
    engine: PromptDistillEngine | None = None,
    rag_lengths: tuple[int, ...] = (1000, 2000),
    rag_samples: int = 4,
    seed: int = 100,
    rag_orders: tuple[str, ...] = RAG_ORDERS,
    records_path: Path | None = None,
    from_records: list[Path] | None = None,
    verify: int = 6,
    floor_length: int = 1536,
    plan_lengths: tuple[int, ...] = (2000, 4000, 8000),
    out: Path | None = None,
) -> Profile:
    """Calibrate on RAG-shaped probes: depot notes retrieved by MiniLM (`bench.depots`), in the three prompt shapes,
    in each of `rag_orders`: "spread" moves each sample's answer passage to its own depth, "rank" keeps the
    retriever's order (the answer's passage first, farthest from the question: the hard case for early layers);
    choose the schedule (layers, heads, span unit, unit scoring, detrend window, length-aware budget fractions)
    that keeps the answer's sentence in every probe at the lowest predicted prefill cost, verify the cheapest five
    end to end against full attention, and write the profile. Its stages are floored at what they keep of
    `floor_length` prunable tokens (0: no floors): short prompts save little time and leave few passages to choose
    from, and on held-out 1k prompts layer 7 head 7 keeping half the passages lost the answer's in 4 of 24.

    Records are saved to `records_path` (default: the cache's `calibration/<model>.rag.pt`) so that
    `from_records` re-searches without running the model; every schedule tried is written beside them
    (`.search.json`), and with matplotlib installed (the `bench` extra) its accuracy/speed frontier at the longest
    plan length (`.frontier.png`)."""
    if isinstance(floor_length, bool) or not isinstance(floor_length, int) or floor_length < 0:
        raise ValueError(f"floor_length must be an int >= 0 (0: no floors), got {floor_length!r}")
    engine = engine or PromptDistillEngine.from_pretrained(model)
    num_layers = engine.arch.num_layers
    key = profile_key(model)
    records_path = records_path or cache_dir() / "calibration" / f"{key}.rag.pt"
    probes = rag_probes(engine.tokenizer, rag_lengths, rag_samples, seed, rag_orders)
    records = _rag_records(engine, probes, from_records, records_path)
    tried = rag_search(records, num_layers, plan_lengths)
    search_path = _save_search(tried, Path(records_path).with_suffix(".search.json"))
    best = tried[0]["kept_share"]
    ranked = [row["schedule"] for row in tried if row["kept_share"] == best]
    verify_probes = verification_probes(probes, verify)
    chosen, rate, full_rate, runs = verify_schedules(engine, ranked, verify_probes, rag_answer_rate)
    if floor_length:
        chosen = chosen.floored(floor_length)
    profile = Profile(key, num_layers, chosen.settings())
    _plot_search(search_path, chosen, best, num_layers, max(plan_lengths))
    measurements = {
        "calibration": {
            "rag_probes": len(records),
            "rag_lengths": list(rag_lengths),
            "rag_samples": rag_samples,
            "seed": seed,
            "rag_orders": list(rag_orders),
            "records": str(records_path),
            "schedules_tried": len(tried),
            "predicted_kept_share": best,
            "predicted_prefill_ratio": {
                str(n): round(predicted_prefill_ratio(chosen, num_layers, n), 3) for n in plan_lengths
            },
            "verified_accuracy": rate,
            "full_attention_accuracy": full_rate,
            "verification_probes": len(verify_probes),
            "verification_runs": runs,
            "floor_length": floor_length,
        }
    }
    out = out or cache_dir() / "profiles" / f"{key}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.to_json(out, measurements)
    return Profile.from_json(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pd-calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--haystack", default=None, help="folder of .txt files (default: CPython's help text)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--kinds", nargs="+", default=["passcode", "city", "magic_word"], choices=NEEDLE_KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verify", type=int, default=10, help="probes for end-to-end verification (0 = skip)")
    parser.add_argument("--plan-length", type=int, default=8192, help="prompt length the cost model optimises")
    parser.add_argument("--out", type=Path, default=None, help="profile path (default: the cache)")
    parser.add_argument(
        "--rag",
        action="store_true",
        help="calibrate on RAG-shaped probes (retrieved look-alike passages, three prompt shapes)",
    )
    parser.add_argument("--rag-lengths", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--rag-samples", type=int, default=4, help="questions per length and shape")
    parser.add_argument(
        "--rag-orders",
        nargs="+",
        default=list(RAG_ORDERS),
        choices=RAG_ORDERS,
        help="passage orders probed: answer spread over depths, and the retriever's rank order",
    )
    parser.add_argument(
        "--records",
        type=Path,
        default=None,
        help="where --rag saves its recorded attention (default: the cache's calibration/)",
    )
    parser.add_argument(
        "--from-records",
        type=Path,
        nargs="+",
        default=None,
        help="re-search saved --rag records instead of running the model on probes",
    )
    parser.add_argument(
        "--floor-length",
        type=int,
        default=1536,
        help="--rag profiles keep at least what they keep of this many prunable tokens (0: no floors)",
    )
    parser.add_argument(
        "--compare-scoring",
        action="store_true",
        help="only measure, per layer, how often each seed/aggregation choice ranks the needle in the "
        "top candidates, print it and exit",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.compare_scoring:
        engine = PromptDistillEngine.from_pretrained(args.model)
        probes = make_probes(engine, args.haystack, args.lengths, args.depths, args.kinds, args.seed)
        budget = report_budget(args.lengths)
        print(
            f"share of {len(probes)} probes whose needle ranks in the top {budget} candidates, layers 0 → "
            f"{engine.arch.num_layers - 1} (all heads):"
        )
        for name, recall in compare_scoring(engine, probes, budget).items():
            print(f"{name:>32}: mean {sum(recall) / len(recall):.2f} | " + " ".join(f"{v:.2f}" for v in recall))
        return
    if args.rag or args.from_records:
        started = time.perf_counter()
        profile = calibrate_rag(
            args.model,
            rag_lengths=tuple(args.rag_lengths),
            rag_samples=args.rag_samples,
            seed=args.seed if args.seed else 100,
            rag_orders=tuple(args.rag_orders),
            records_path=args.records,
            from_records=args.from_records,
            verify=args.verify,
            floor_length=args.floor_length,
            out=args.out,
        )
        print(
            f"profile written to {profile.source} in {time.perf_counter() - started:.0f} s:\n"
            f"{Path(profile.source).read_text()}"
        )
        return
    profile = calibrate(
        args.model,
        haystack=args.haystack,
        lengths=tuple(args.lengths),
        depths=tuple(args.depths),
        kinds=tuple(args.kinds),
        seed=args.seed,
        verify=args.verify,
        plan_length=args.plan_length,
        out=args.out,
    )
    print(f"profile written to {profile.source}:\n{Path(profile.source).read_text()}")


if __name__ == "__main__":
    main()
