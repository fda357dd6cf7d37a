"""GemFilter (arXiv 2409.17422), the baseline: select once at layer s from a partial pass, then re-run the whole
model on the kept tokens with positions renumbered 0..k-1. Decoding continues after the kept length."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PromptDistillConfig
from ..layout import RowLayout
from ..runtime import Runtime
from .base import FullAttention, Prefill, PrefillMethod
from .promptdistill import PromptDistill


@dataclass
class GemFilter(PrefillMethod):
    """A scout pass that stops at its selection layer, then a fresh full pass over the kept tokens."""

    scout: PromptDistill
    prunes = True

    @classmethod
    def from_config(cls, config: PromptDistillConfig, layout: RowLayout) -> GemFilter:
        return cls(PromptDistill.from_config(config, layout))

    def prefill(self, runtime: Runtime, ids: torch.Tensor, layout: RowLayout,
                last_layer: int | None = None) -> Prefill:
        scouted = self.scout.prefill(runtime, ids, layout, last_layer=self.scout.stages[0].layer)
        kept = scouted.kept_indices
        state = FullAttention().prefill(runtime, ids[kept], RowLayout.unpruned(kept.shape[0]))
        state.kept_indices, state.stage_kept, state.scores, state.layout = kept, [kept], scouted.scores, layout
        return state
