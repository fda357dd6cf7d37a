"""GemFilter (arXiv 2409.17422), the baseline: select once at layer s from a partial pass, then re-run the whole
model on the kept tokens with positions renumbered 0..k-1. Decoding continues after the kept length."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import PromptDistillConfig
from ..layout import RowLayout
from ..runtime import Runtime
from .base import FullAttention, Prefill, PrefillMethod
from .promptdistill import PromptDistill


@dataclass
class GemFilter(PrefillMethod):
    """A scout pass that stops at its selection layer, then a fresh full pass over each row's kept tokens."""

    scout: PromptDistill
    prunes = True

    @classmethod
    def from_config(cls, config: PromptDistillConfig, layouts: list[RowLayout]) -> GemFilter:
        return cls(PromptDistill.from_config(config, layouts))

    def prefill(
        self, runtime: Runtime, ids: list[torch.Tensor], layouts: list[RowLayout], last_layer: int | None = None
    ) -> Prefill:
        scouted = self.scout.prefill(runtime, ids, layouts, last_layer=self.scout.stages[0].layer)
        kept = [row.kept_indices for row in scouted.rows]
        rerun = FullAttention().prefill(
            runtime, [row[k] for row, k in zip(ids, kept)], [RowLayout.unpruned(k.shape[0]) for k in kept]
        )
        rerun.rows = [
            replace(row, layout=layout, kept_indices=k, stage_kept=[k], scores=scout.scores)
            for row, layout, k, scout in zip(rerun.rows, layouts, kept, scouted.rows)
        ]
        return rerun
