"""PromptDistill (arXiv 2503.23274): at each selection layer the query tokens' attention picks the prunable tokens
that later layers see; kept tokens keep their hidden states and original RoPE positions, and nothing is recomputed.
Each sequence of the batch selects on its own: its own query tokens, candidates and budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..config import BudgetRule, PromptDistillConfig, resolve_budget
from ..layout import PromptLayout
from ..selection import Selector
from .base import CostedPrompt, PrefillMethod, PrefillState


def stage_budgets(budgets: Sequence[int | float | BudgetRule], prunable: int) -> list[int]:
    """Tokens each stage keeps of `prunable` context tokens, as `PromptLayout.stage_budgets` resolves them.

    Args:
        budgets: each stage's budget: an int, a fraction or a `BudgetRule`.
        prunable: the prunable tokens of the prompt.

    Returns:
        Each stage's resolved budget, never above an earlier stage's.
    """
    resolved = [resolve_budget(budget, prunable) for budget in budgets]
    return [min(resolved[: i + 1]) for i in range(len(resolved))]


def staged_cost(
    stages: Sequence[tuple[int, int | float | BudgetRule]],
    num_layers: int,
    length: int,
    protected: int,
    layer_cost: Callable[[int], float],
) -> float:
    """A staged prefill's cost over full attention's: each layer through a stage's selection layer runs over the
    tokens the stage before kept (every token before the first stage), the layers after the last stage over the last
    stage's; what the cost model prices `PromptDistill` and calibration's schedules with.

    Args:
        stages: (selection layer, budget) per stage; the tokens after a stage are its budget plus `protected`.
        num_layers: the model's layers.
        length: the prompt's tokens.
        protected: the prompt's tokens that are not prunable.
        layer_cost: one layer's cost over a number of tokens.

    Returns:
        The stages' summed layer costs divided by `num_layers * layer_cost(length)`.
    """
    budgets = stage_budgets([budget for _, budget in stages], max(0, length - protected))
    tokens, total, start = length, 0, 0
    for (layer, _), budget in zip(stages, budgets):
        total += (layer + 1 - start) * layer_cost(tokens)
        tokens, start = min(tokens, budget + protected), layer + 1
    total += (num_layers - start) * layer_cost(tokens)
    return total / (num_layers * layer_cost(length))


@dataclass(frozen=True)
class Stage:
    """Select at `layer`, keeping `budgets[b]` prunable tokens of sequence b, scored by `heads` (None: all)."""

    layer: int
    budgets: tuple[int, ...]
    heads: tuple[int, ...] | None


@dataclass
class PromptDistill(PrefillMethod):
    """Multi-stage selection with optional cache truncation: at each stage, the KV of the layers from
    `truncate_from` (None: none) to the stage's layer is gathered to its kept tokens. The transient query suffix, if
    any, is dropped after the last stage. Subclasses change which tokens a stage keeps through `scores` and
    `units`."""

    stages: list[Stage]
    selector: Selector
    truncate_from: int | None
    name = "promptdistill"
    prunes = True

    @classmethod
    def check_config(cls, config: PromptDistillConfig) -> None:
        """Raise `ValueError` for an empty schedule: a selecting method needs at least one stage."""
        if config.selection_layers == ():
            raise ValueError(f"selection_layers must be one or more ints >= 0, got {config.selection_layers!r}")
        if config.budgets == ():
            raise ValueError(f"budgets must be one or more ints >= 1 or fractions in (0, 1], got {config.budgets!r}")

    @classmethod
    def from_config(cls, config: PromptDistillConfig, layouts: list[PromptLayout]) -> PromptDistill:
        """The config's stages, with fractional budgets resolved against each sequence layout's prunable tokens."""
        budgets = zip(*(layout.stage_budgets(config.budgets) for layout in layouts))
        stages = [Stage(*stage) for stage in zip(config.selection_layers, budgets, config.heads)]
        return cls(stages, Selector.from_config(config), config.truncated_from_layer())

    @classmethod
    def cost(cls, config: PromptDistillConfig, prompt: CostedPrompt) -> float:
        """The config's stages priced by `staged_cost` (selection and gathers are not counted)."""
        stages = list(zip(config.selection_layers, config.budgets))
        return staged_cost(stages, prompt.num_layers, prompt.prompt_tokens, prompt.protected_tokens, prompt.layer_cost)

    def after_layer(self, state: PrefillState, i: int, layer_input: torch.Tensor) -> None:
        stage = next((s for s in self.stages if s.layer == i), None)
        if stage is None:
            return
        keeps = [self._keep(state, i, layer_input, b, budget, stage.heads) for b, budget in enumerate(stage.budgets)]
        truncated = range(0) if self.truncate_from is None else range(self.truncate_from, i + 1)
        if any(keep is not None for keep in keeps):
            state.gather(keeps, truncated)
        if stage is self.stages[-1]:
            state.drop_query_suffix(i, truncated)
        for b, kept in enumerate(state.stage_kept):
            kept.append(state.positions[b, state.real_tokens(b)])

    def scores(
        self, state: PrefillState, i: int, layer_input: torch.Tensor, b: int, heads: tuple[int, ...] | None
    ) -> torch.Tensor:
        """Scores [real tokens] of sequence `b`'s real tokens at layer `i`: its query tokens' attention over
        `heads`."""
        return self.selector.score(state.query_head_scores(self.selector, i, layer_input, b), heads)

    def units(self, state: PrefillState, b: int) -> torch.Tensor | None:
        """Span unit ids of sequence `b`'s real tokens, which the selector keeps whole (None: token by token)."""
        return state.units(b)

    def _keep(
        self, state: PrefillState, i: int, layer_input: torch.Tensor, b: int, budget: int, heads: tuple[int, ...] | None
    ) -> torch.Tensor | None:
        """Sequence `b`'s real tokens to keep at layer `i` (None: all, the budget covers its candidates)."""
        if budget >= state.remaining[b]:
            return None
        real = state.real_tokens(b)
        scores = self.scores(state, i, layer_input, b, heads)
        if state.scores[b] is None:
            layout = state.layouts[b]
            state.scores[b] = torch.zeros(
                len(layout.prunable) + len(layout.query_suffix_ids), device=scores.device
            ).index_put_((state.positions[b, real],), scores)
        keep = self.selector.keep(scores, state.candidates[b, real], state.remaining[b], budget, self.units(state, b))
        state.remaining[b] = budget
        return keep
