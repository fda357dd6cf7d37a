"""PromptDistill (arXiv 2503.23274): at each selection layer the query rows' attention picks the prunable rows that
later layers see; kept rows keep their hidden states and original RoPE positions, and nothing is recomputed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PromptDistillConfig
from ..layout import RowLayout
from ..selection import Selector
from .base import PrefillMethod, PrefillState


@dataclass(frozen=True)
class Stage:
    """Select at `layer`, keeping `budget` prunable tokens, scored by `heads` (None: all)."""

    layer: int
    budget: int
    heads: tuple[int, ...] | None


@dataclass
class PromptDistill(PrefillMethod):
    """Multi-stage selection with optional cache truncation (KV of the layers before a stage gathered to its kept
    rows). The transient probe, if any, is dropped after the last stage."""

    stages: list[Stage]
    selector: Selector
    truncate_cache: bool
    prunes = True

    @classmethod
    def from_config(cls, config: PromptDistillConfig, layout: RowLayout) -> PromptDistill:
        """The config's stages, with fractional budgets resolved against `layout`'s prunable tokens."""
        heads = config.heads or (None,) * len(config.budgets)
        stages = [Stage(*stage) for stage in zip(config.selection_layers, layout.stage_budgets(config.budgets), heads)]
        return cls(stages, Selector.from_config(config), config.cache_truncation)

    def after_layer(self, state: PrefillState, i: int, layer_input: torch.Tensor) -> None:
        stage = next((s for s in self.stages if s.layer == i), None)
        if stage is None:
            return
        if stage.budget < state.remaining:
            scores = self.selector.score(state.query_head_scores(self.selector, i, layer_input), stage.heads)
            if state.scores is None:
                rows = len(state.layout.prunable) + len(state.layout.probe_ids)
                state.scores = torch.zeros(rows, device=scores.device).index_put_((state.positions,), scores)
            keep = self.selector.keep(scores, state.candidates, state.remaining, stage.budget, state.units())
            state.gather(keep, i, self.truncate_cache)
            state.remaining = stage.budget
        if stage is self.stages[-1]:
            state.drop_probe(i, self.truncate_cache)
        state.stage_kept.append(state.positions)
