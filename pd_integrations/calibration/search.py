"""The schedule search on recorded probes: where the needle ranks per layer and head, retrieval heads, candidate
schedules, their exact or replayed verdicts (`tokens_needed`, `keeps_evidence`), and the RAG search over them."""

from __future__ import annotations

import itertools

import torch
from tqdm.auto import tqdm

from ..config import BudgetRule, PromptDistillConfig
from ..engine import PromptDistillEngine
from ..probes import NeedleProbe
from ..selection import Selector, best_window_starts, score_prefix, unit_ranks
from .cost import Schedule, predicted_prefill_ratio
from .records import ProbeRecord, record_probes

BUDGETS = (256, 512, 1024, 2048)
SPANS = (("token", None), ("chunk", 32), ("chunk", 64))
# The seed and aggregation choices compared by `compare_scoring`: the question span with each aggregation, and the
# paper's rule (its pooling aside).
SCORINGS = {
    "question, softmax mean": {"query_source": "auto", "aggregation": "softmax_mean"},
    "question, softmax max": {"query_source": "auto", "aggregation": "softmax_max"},
    "question, logit mean": {"query_source": "auto", "aggregation": "logits_mean"},
    "last token, logit mean (paper)": {"query_source": "last_token", "aggregation": "logits_mean"},
}


def report_budget(lengths) -> int:
    """The candidate rank within which a needle counts as found in the per-layer and per-head tables.

    Args:
        lengths: the probes' context lengths.

    Returns:
        512, or a quarter of the shortest length when less.
    """
    return min(BUDGETS[1], min(lengths) // 4)


def needle_rank_table(records: list[ProbeRecord], budget: int) -> torch.Tensor:
    """Per layer and head, the share of probes whose best needle token ranks within `budget` of the candidates.

    Args:
        records: the probes' records.
        budget: the candidate rank that counts as found.

    Returns:
        A [layers, heads] tensor of shares (a probe whose needle is all protected counts as found).
    """
    hits = []
    for record in records:
        candidates = record.scores[..., record.prunable]
        # Needle tokens the layout protects are always kept; rank the prunable ones among the candidates.
        needle = record.evidence_tokens[record.prunable[record.evidence_tokens]]
        if needle.numel() == 0:
            hits.append(torch.ones(record.scores.shape[:2]))
            continue
        needle = torch.cumsum(record.prunable.long(), 0)[needle] - 1
        best = candidates[..., needle].amax(-1, keepdim=True)
        rank = (candidates > best).sum(-1)
        hits.append((rank < budget).float())
    return torch.stack(hits).mean(0)


def choose_retrieval_heads(table: torch.Tensor) -> dict[int, tuple[int, ...]]:
    """Per layer, its retrieval heads: its best third of heads by recall (at least one), when they beat its average.

    Args:
        table: a [layers, heads] needle-recall table (`needle_rank_table`).

    Returns:
        Layer: its retrieval heads, sorted; layers whose best heads don't beat their average are left out.
    """
    num_heads = table.shape[1]
    retrieval_heads = {}
    for layer in range(table.shape[0]):
        order = torch.argsort(table[layer], descending=True)[: max(1, num_heads // 3)]
        if table[layer, order].mean() > table[layer].mean():
            retrieval_heads[layer] = tuple(sorted(order.tolist()))
    return retrieval_heads


def compare_scoring(engine: PromptDistillEngine, probes: list[NeedleProbe], budget: int) -> dict[str, list[float]]:
    """Per entry of `SCORINGS`, per layer: how often the needle ranks in the top candidates when every head scores.

    Args:
        engine: the engine whose model is measured.
        probes: the needle probes.
        budget: the candidate rank that counts as found.

    Returns:
        Scoring name: per layer, the share of probes whose needle's best token ranks within `budget`, aggregated
        as that scoring does.
    """
    recall = {}
    for name, scoring in SCORINGS.items():
        selector = Selector(scoring["aggregation"], 1)
        records = record_probes(engine.with_config(PromptDistillConfig(**scoring)), probes)
        for record in records:
            record.scores = torch.stack([selector.score(layer) for layer in record.scores])[:, None]
        recall[name] = [round(float(v), 3) for v in needle_rank_table(records, budget)[:, 0]]
    return recall


def keeps_evidence(schedule: Schedule, record: ProbeRecord) -> bool:
    """Replay `schedule` on the recorded scores (later stages scored from the unpruned pass: an approximation).

    Args:
        schedule: the schedule replayed.
        record: the probe's record.

    Returns:
        True when every evidence token (the needle, or a RAG probe's answer sentence) survives every stage.
    """
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
    return bool(torch.isin(record.evidence_tokens, kept).all())


def tokens_needed(
    record: ProbeRecord,
    layer: int,
    heads: tuple[int, ...] | None,
    span: str,
    chunk_size: int | None,
    unit_score: str = "max",
    detrend_window: int = 0,
) -> int:
    """The smallest single-stage budget at `layer` from which every larger one keeps every prunable evidence token.

    That is the candidate tokens of every unit the selector ranks before the evidence's last unit, plus the shortest
    window of that unit from which the selector's best window (`selection.best_window_starts`, on the selector's own
    prefix sums) always covers its evidence. A single-stage schedule keeps the evidence whenever its resolved budget
    is at least this, so every budget and budget rule is judged from one number per probe. (A few budgets below it
    may keep the evidence too, when a shorter best window happens to cover it; the search counts them as losses.)

    Args:
        record: the probe's record.
        layer: the selection layer.
        heads: the heads that score, or None for all.
        span, chunk_size: the span units.
        unit_score, detrend_window: how units are ranked and scores detrended.

    Returns:
        The budget in tokens; 0 when no evidence token is prunable.
    """
    selector = Selector("softmax_mean", 1, detrend_window=detrend_window)
    candidates = record.prunable.nonzero().flatten()
    evidence = record.evidence_tokens[record.prunable[record.evidence_tokens]]
    if evidence.numel() == 0:
        return 0
    scores = selector.candidate_scores(selector.score(record.scores[layer], heads)[candidates])
    evidence_rows = torch.searchsorted(candidates, evidence)
    units = record.units(span, chunk_size)
    if units is None:  # tokens: everything scoring at least the weakest evidence token (ties count against it)
        return int((scores >= scores[evidence_rows].min()).sum())
    rank = unit_ranks(scores, units[candidates], unit_score)
    last = rank[evidence_rows].max()
    unit_rows = (rank == last).nonzero().flatten()
    first, size = int(unit_rows[0]), unit_rows.numel()
    prefix = score_prefix(scores)[first : first + size + 1]
    lengths = torch.arange(1, size + 1)
    starts = best_window_starts(prefix, torch.ones(size, dtype=torch.bool), lengths)
    in_unit = evidence_rows[rank[evidence_rows] == last] - first
    misses = (~((starts <= in_unit.min()) & (starts + lengths > in_unit.max()))).nonzero()
    return int((rank < last).sum()) + (int(misses[-1]) + 2 if misses.numel() else 1)


def candidate_schedules(
    num_layers: int, retrieval_heads: dict[int, tuple[int, ...]], max_length: int
) -> list[Schedule]:
    """The needle search's candidates, in every span of `SPANS`, with budgets of `BUDGETS` below `max_length`.

    Args:
        num_layers: the model's layers.
        retrieval_heads: layer: its retrieval heads (`choose_retrieval_heads`).
        max_length: the longest probe's length.

    Returns:
        Single-stage schedules at every selectable layer from a quarter of the depth, each with all heads or the
        layer's retrieval heads, and two-stage ones that keep twice the budget early and the budget later.
    """
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
    """Every schedule tried on the RAG (and needle) `records`, cheapest first among equal kept shares: single-stage
    ones (every layer from 2, all heads and each head, every scoring option and fraction) judged exactly from
    `tokens_needed`, and two-stage pairs of the `shortlist` cheapest early stages (layer < 2/3 of the depth) that keep
    every record within `first_fractions` with the `shortlist` best later ones, replayed with `keeps_evidence`.

    Args:
        records: the probes' records.
        num_layers: the model's layers.
        plan_lengths: the prompt lengths the cost model prices each schedule at.
        first_fractions, second_fractions: the budget fractions of first and second stages.
        shortlist: how many early and late stages of each scoring are paired.
        spans, scorings, detrend_windows: the span units, unit scorings and detrend windows tried.

    Returns:
        Per schedule: {"schedule", "kept_share", "predicted_prefill_ratio": {plan length: ratio}}.
    """
    scoring_options = [
        (span, chunk, scoring, window)
        for (span, chunk), scoring, window in itertools.product(spans, scorings, detrend_windows)
    ]
    fractions = sorted(set(first_fractions) | set(second_fractions))
    tried, exact = _single_stage(records, num_layers, scoring_options, fractions)
    for scoring in scoring_options:
        options = [e for e in exact if e[3] == scoring]
        tried += _two_stage(records, num_layers, options, shortlist, first_fractions, second_fractions)
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


def _single_stage(
    records: list[ProbeRecord], num_layers: int, scoring_options: list[tuple], fractions: list[float]
) -> tuple[list[tuple[Schedule, float]], list[tuple]]:
    """(every single-stage schedule with its kept share, and per stage option (the largest share of the prunable
    tokens any record needs, layer, heads, scoring option))."""
    heads_options = [None] + [(h,) for h in range(records[0].scores.shape[1])]
    prunable = torch.tensor([int(r.prunable.sum()) for r in records]).float()
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
    return tried, exact


def _two_stage(
    records: list[ProbeRecord],
    num_layers: int,
    options: list[tuple],
    shortlist: int,
    first_fractions,
    second_fractions,
) -> list[tuple[Schedule, float]]:
    """The two-stage schedules of one scoring option, from its single-stage verdicts `options`, with their replayed
    kept shares."""
    early = sorted(
        (e for e in options if e[1] < num_layers * 2 // 3 and e[0] <= max(first_fractions)),
        key=lambda e: (e[1], e[0]),
    )[:shortlist]
    late = sorted((e for e in options if e[1] >= num_layers // 3), key=lambda e: e[0])[:shortlist]
    tried = []
    for first, second in itertools.product(early, late):
        if second[1] <= first[1]:
            continue
        f1 = min(f for f in first_fractions if f >= first[0] - 1e-9)
        for f2 in second_fractions:
            stages = ((first[1], BudgetRule(f1), first[2]), (second[1], BudgetRule(f2), second[2]))
            schedule = Schedule(stages, *first[3])
            tried.append((schedule, sum(keeps_evidence(schedule, r) for r in records) / len(records)))
    return tried
