"""Which context tokens survive a selection layer.

The tokens at a selection layer are candidates (retrieved context, see `pd_integrations.layout`) and protected
tokens; the query tokens are the last ones, always protected. Scores come from the query tokens' post-RoPE attention
to every key; the budget picks candidates; every protected token is kept; the kept tokens stay in their original
order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .arch import Architecture


@dataclass(frozen=True)
class Selector:
    """Scores candidates from query-token attention and keeps the best `budget` of them.

    aggregation: "softmax_mean" | "softmax_max" | "logits_mean" over heads and query tokens.
    pool_kernel: odd avg-pool width over candidate scores (1 = none).
    unit_score: how span units are ranked from their tokens' scores: "max", "mean" or "topk_mean" (the mean of the
        unit's `unit_topk` best tokens, all of them in shorter units).
    detrend_window: candidates around each one (its own included) whose mean score divides its score before
        ranking (0 = off). Attention decays with distance, strongly in early layers: at 8k tokens the passage
        farthest from the question (the retriever's first) ranks near the bottom at a layer that finds it at 2k.
        Relative to its neighbourhood it stands out again. Needs a softmax aggregation (positive scores).
    """

    aggregation: str
    pool_kernel: int
    unit_score: str = "max"
    unit_topk: int = 8
    detrend_window: int = 0

    @classmethod
    def from_config(cls, config) -> Selector:
        """The selector a resolved `PromptDistillConfig` describes."""
        return cls(config.aggregation, config.pool_kernel, config.unit_score, config.unit_topk, config.detrend_window)

    def head_scores(
        self,
        arch: Architecture,
        layer_idx: int,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_positions: torch.Tensor,
        key_positions: torch.Tensor,
    ) -> torch.Tensor:
        """Per-head key scores [H, k] (float32), aggregated over the query tokens: post-RoPE `queries`
        [1, H, s, d] against `keys` [1, KV, k, d], causal by original position."""
        logits = arch.attention_logits(layer_idx, queries, keys)[0]  # [H, s, k]
        hidden = key_positions[None, :] > query_positions[:, None]  # a query token sees only earlier keys
        if self.aggregation == "logits_mean":
            visible = (~hidden).float()
            return (logits * visible).sum(1) / visible.sum(0).clamp(min=1)
        probs = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)
        return probs.amax(1) if self.aggregation == "softmax_max" else probs.mean(1)

    def score(self, head_scores: torch.Tensor, heads: tuple[int, ...] | None = None) -> torch.Tensor:
        """Key scores [k] from `head_scores` [H, k], over the chosen `heads` (default: all)."""
        if heads is not None:
            head_scores = head_scores[list(heads)]
        return head_scores.amax(0) if self.aggregation == "softmax_max" else head_scores.mean(0)

    def keep(
        self,
        scores: torch.Tensor,
        candidates: torch.Tensor,
        num_candidates: int,
        budget: int,
        unit_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sorted token indices to keep: every token that is not a candidate, plus the best `budget` candidates.

        `candidates` marks the prunable tokens; `num_candidates` is their count, known on the host, so no device
        sync is needed. With `unit_ids` (one id per token, non-decreasing), whole units (chunks, sentences,
        documents) are taken in the order of their `unit_score` (by default their best token's score); of the first
        unit that does not fit, its best-scoring contiguous window of the tokens left is kept, so the budget is met
        exactly. Pooling smooths scores along the candidates only.
        """
        # Candidates first, each group in token order.
        order = torch.argsort((~candidates).to(torch.uint8), stable=True)
        candidate_tokens, protected_tokens = order[:num_candidates], order[num_candidates:]
        candidate_scores = self.candidate_scores(scores[candidate_tokens])
        if unit_ids is None:
            chosen = torch.topk(candidate_scores, budget, sorted=False).indices
        else:
            chosen = _top_units(candidate_scores, unit_ids[candidate_tokens], budget, self.unit_score, self.unit_topk)
        return torch.sort(torch.cat([protected_tokens, candidate_tokens[chosen]])).values

    def candidate_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The candidates' `scores` (in token order) as ranked: smoothed by the pool, then detrended."""
        if self.pool_kernel > 1:
            scores = F.avg_pool1d(scores[None, None], self.pool_kernel, 1, self.pool_kernel // 2)[0, 0]
        if self.detrend_window > 1:
            half = self.detrend_window // 2
            local = F.avg_pool1d(scores[None, None], 2 * half + 1, 1, half, count_include_pad=False)[0, 0]
            scores = scores / local.clamp(min=torch.finfo(scores.dtype).tiny)
        return scores


def unit_scores(
    scores: torch.Tensor, unit_ids: torch.Tensor, how: str = "max", topk: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score per unit, each token's unit index 0..units-1) for non-decreasing `unit_ids`: the max, mean or
    top-`topk` mean ("topk_mean") of the unit's token `scores`."""
    units, unit_of_token = torch.unique_consecutive(unit_ids, return_inverse=True)
    count = units.shape[0]
    if how == "max":
        best = torch.full((count,), float("-inf"), device=scores.device, dtype=scores.dtype)
        return best.scatter_reduce(0, unit_of_token, scores, "amax"), unit_of_token
    if how == "topk_mean":
        # Tokens grouped by unit, best first within each; keep each unit's first `topk`.
        by_score = torch.argsort(scores, descending=True, stable=True)
        order = by_score[torch.argsort(unit_of_token[by_score], stable=True)]
        grouped = unit_of_token[order]
        _, lengths = torch.unique_consecutive(grouped, return_counts=True)
        starts = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        top = (torch.arange(grouped.numel(), device=scores.device) - starts) < topk
        scores, unit_of_token_used = scores[order][top], grouped[top]
    else:
        unit_of_token_used = unit_of_token
    sums = torch.zeros(count, device=scores.device, dtype=scores.dtype).index_add_(0, unit_of_token_used, scores)
    sizes = torch.zeros(count, device=scores.device, dtype=scores.dtype).index_add_(
        0, unit_of_token_used, torch.ones_like(scores)
    )
    return sums / sizes.clamp(min=1), unit_of_token


def unit_ranks(scores: torch.Tensor, unit_ids: torch.Tensor, how: str = "max", topk: int = 8) -> torch.Tensor:
    """Per token, its unit's rank (0 = best) by `unit_scores`; ties go to the earlier unit."""
    unit_best, unit_of_token = unit_scores(scores, unit_ids, how, topk)
    count = unit_best.shape[0]
    unit_rank = torch.empty(count, dtype=torch.long, device=scores.device)
    unit_rank[torch.argsort(unit_best, descending=True, stable=True)] = torch.arange(count, device=scores.device)
    return unit_rank[unit_of_token]


def score_prefix(scores: torch.Tensor) -> torch.Tensor:
    """Prefix sums of `scores` starting at 0 ([tokens + 1]), for `best_window_starts`."""
    return torch.cat([scores.new_zeros(1), torch.cumsum(scores, 0)])


def best_window_starts(prefix: torch.Tensor, inside: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """For each of `lengths`, the first token of the highest-scoring run of that many consecutive tokens that all lie
    `inside` (one contiguous block), from the score prefix sums `prefix` (`score_prefix`). The earliest run wins
    ties."""
    starts = torch.arange(inside.numel(), device=inside.device)
    ends = starts[None] + lengths[:, None]
    sums = prefix[ends.clamp(max=inside.numel())] - prefix[starts][None]
    fits = inside[None] & inside[(ends - 1).clamp(0, inside.numel() - 1)]
    return torch.where(fits, sums, float("-inf")).argmax(1)


def _top_units(
    scores: torch.Tensor, unit_ids: torch.Tensor, budget: int, how: str = "max", topk: int = 8
) -> torch.Tensor:
    """Indices of `budget` tokens: whole units in the order of their score (`unit_scores`), then, of the first unit
    that does not fit, the best-scoring contiguous window of the tokens left. A passage's answer sentence is rarely
    its first, so the cut unit keeps where its scores peak, and never scattered tokens. No device sync."""
    rank = unit_ranks(scores, unit_ids, how, topk)
    sizes = torch.bincount(rank, minlength=int(unit_ids.numel()))
    cut_rank = torch.searchsorted(torch.cumsum(sizes, 0), torch.tensor([budget], device=scores.device), right=True)
    whole = rank < cut_rank
    left = budget - whole.sum()
    in_cut = rank == cut_rank
    start = best_window_starts(score_prefix(scores), in_cut, left.reshape(1).clamp(min=1))
    tokens = torch.arange(scores.numel(), device=scores.device)
    window = in_cut & (tokens >= start) & (tokens < start + left)
    return torch.argsort((~(whole | window)).to(torch.uint8), stable=True)[:budget]
