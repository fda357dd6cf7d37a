"""Schedules (candidate profiles) and the one prefill cost model that prices them and any resolved config; `bench`
prints its predictions beside the prefill times it measures. A layer's cost is `layer_cost`'s; what a prefill runs
is its method's to say (`PrefillMethod.cost`; a schedule is priced as PromptDistill's stages, `staged_cost`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import BudgetRule, PromptDistillConfig, budget_to_json
from ..methods.base import CostedPrompt
from ..methods.promptdistill import stage_budgets, staged_cost
from ..methods.registry import method_class
from ..selection import Selector

# The prefill cost model: a layer processing n tokens costs n * (TOKEN_COST + n / 2), a per-token term (the
# projections and MLP) plus causal attention to n / 2 keys on average, in units of one key's attention. Fitted to
# SmolLM2-135M on this project's 2-core CPU (full attention's 8k/4k prefill-time ratio, 2.9); it predicted the old
# profile's measured prefill ratios (0.37 at 8k, 0.58 at 4k) within 0.02.
TOKEN_COST = 2300


def layer_cost(tokens: int, token_cost: float = TOKEN_COST) -> float:
    """The cost model's time for one layer over `tokens` tokens.

    Args:
        tokens: the prompt tokens the layer processes.
        token_cost: the per-token term, in units of one key's attention.

    Returns:
        `tokens * (token_cost + tokens / 2)`.
    """
    return tokens * (token_cost + tokens / 2)


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
        """The profile settings of this schedule (what `Profile` writes and `PromptDistillConfig` takes)."""
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
        """The selector this schedule's stages rank with."""
        return Selector("softmax_mean", 1, self.unit_score, detrend_window=self.detrend_window)

    @classmethod
    def of(cls, config: PromptDistillConfig) -> Schedule:
        """The schedule of a resolved selecting config."""
        return cls(
            tuple(zip(config.selection_layers, config.budgets, config.heads)),
            config.span,
            config.chunk_size,
            config.unit_score,
            config.detrend_window,
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
        """Tokens each stage keeps of `prunable` context tokens (`stage_budgets`)."""
        return stage_budgets([budget for _, budget, _ in self.stages], prunable)

    def cost(self, num_layers: int, length: int, protected: int = 20) -> float:
        """Share of full attention's layer-tokens (tokens summed over layers) the schedule processes at `length`
        prompt tokens, `protected` of them not prunable (`staged_cost` with every token costing the same)."""
        return staged_cost(self._layer_budgets(), num_layers, length, protected, lambda tokens: tokens)

    def _layer_budgets(self) -> list[tuple[int, int | float | BudgetRule]]:
        return [(layer, budget) for layer, budget, _ in self.stages]


def predicted_prefill_ratio(
    schedule: Schedule, num_layers: int, length: int, protected: int = 60, token_cost: float = TOKEN_COST
) -> float:
    """The cost model's prefill time of `schedule` over full attention's (selection and gathers are not counted).

    Args:
        schedule: the schedule priced.
        num_layers: the model's layers.
        length: the prompt's tokens.
        protected: the prompt's tokens that are not prunable.
        token_cost: `layer_cost`'s per-token term.

    Returns:
        The predicted prefill-time ratio (1.0 when nothing is pruned).
    """
    return staged_cost(
        schedule._layer_budgets(), num_layers, length, protected, lambda tokens: layer_cost(tokens, token_cost)
    )


def predicted_ratio_of(
    config: PromptDistillConfig, num_layers: int, prompt_tokens: int, protected_tokens: int
) -> float | None:
    """The cost model's prefill ratio for a resolved `config`: its method's `PrefillMethod.cost`, with `layer_cost`.

    Args:
        config: a resolved config of any method.
        num_layers: the model's layers.
        prompt_tokens: the prompt's tokens.
        protected_tokens: the prompt's tokens that are not prunable.

    Returns:
        The predicted prefill-time ratio, or None for full attention.
    """
    prompt = CostedPrompt(num_layers, prompt_tokens, protected_tokens, layer_cost)
    return method_class(config.method).cost(config, prompt)
