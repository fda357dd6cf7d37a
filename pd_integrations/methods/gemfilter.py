"""GemFilter (arXiv 2409.17422), the baseline: select once at layer s from a partial pass, then re-run the whole
model on the kept tokens with positions renumbered 0..k-1. Decoding continues after the kept length."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import PAPER_SCORING, PromptDistillConfig, fill_unset, resolve_budget
from ..layout import PromptLayout
from ..runtime import Runtime
from .base import CostedPrompt, FullAttention, Prefill, PrefillMethod
from .promptdistill import PromptDistill


@dataclass
class GemFilter(PrefillMethod):
    """A scout pass that stops at its selection layer, then a fresh full pass over each sequence's kept tokens."""

    scout: PromptDistill
    name = "gemfilter"
    prunes = True

    @classmethod
    def check_config(cls, config: PromptDistillConfig) -> None:
        """Raise `ValueError` unless the schedule, where given, has exactly one stage: GemFilter selects once."""
        PromptDistill.check_config(config)
        if config.selection_layers is not None and len(config.selection_layers) != 1:
            raise ValueError(
                f"gemfilter selects once: selection_layers must have one layer, got {config.selection_layers!r}"
            )

    @classmethod
    def resolve(cls, config: PromptDistillConfig, sources: list[dict]) -> PromptDistillConfig:
        """Unset fields come from the paper's scoring first, then from the first stage of `sources` (the
        profile's and the fallback rule's schedules) without their heads: GemFilter selects once, scored by all
        heads as in its paper."""
        first_stage = [
            {k: v[:1] if k in ("selection_layers", "budgets") else v for k, v in source.items() if k != "heads"}
            for source in sources
        ]
        return fill_unset(config, [PAPER_SCORING, *first_stage])

    @classmethod
    def from_config(cls, config: PromptDistillConfig, layouts: list[PromptLayout]) -> GemFilter:
        return cls(PromptDistill.from_config(config, layouts))

    @classmethod
    def cost(cls, config: PromptDistillConfig, prompt: CostedPrompt) -> float:
        """The scout's layers through the selection layer over every token, then the whole model again over the kept
        ones (their budget plus the protected tokens)."""
        ((layer, budget),) = zip(config.selection_layers, config.budgets)
        n, protected = prompt.prompt_tokens, prompt.protected_tokens
        kept = min(n, resolve_budget(budget, n - protected) + protected)
        full = prompt.num_layers * prompt.layer_cost(n)
        return ((layer + 1) * prompt.layer_cost(n) + prompt.num_layers * prompt.layer_cost(kept)) / full

    def prefill(
        self, runtime: Runtime, ids: list[torch.Tensor], layouts: list[PromptLayout], last_layer: int | None = None
    ) -> Prefill:
        scouted = self.scout.prefill(runtime, ids, layouts, last_layer=self.scout.stages[0].layer)
        kept = [sequence.kept_indices for sequence in scouted.sequences]
        rerun = FullAttention().prefill(
            runtime, [sequence[k] for sequence, k in zip(ids, kept)], [PromptLayout.unpruned(k.shape[0]) for k in kept]
        )
        rerun.sequences = [
            replace(sequence, layout=layout, kept_indices=k, stage_kept=[k], scores=scout.scores)
            for sequence, layout, k, scout in zip(rerun.sequences, layouts, kept, scouted.sequences)
        ]
        return rerun
