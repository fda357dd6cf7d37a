"""The random baseline: PromptDistill's schedule, budgets, gathers and cache truncation, with the kept context tokens
drawn uniformly at random instead of by attention. It is the floor that any selector must beat."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import PromptDistillConfig
from ..layout import PromptLayout
from ..selection import Selector
from .base import PrefillState
from .promptdistill import PromptDistill

# Draws of a stage come from a generator seeded with `seed * SEED_STRIDE + layer`: fewer layers than the stride, so no
# two (seed, layer) pairs share draws.
SEED_STRIDE = 1000


@dataclass
class RandomSelection(PromptDistill):
    """At each stage, keeps a uniformly random `budget` of the sequence's remaining prunable tokens, token by token
    whatever the config's span; protected tokens stay as always, with their original positions. The draws depend on
    `seed`, the stage's layer and the sequence's length only, so a prompt keeps the same tokens in any batch and on
    any run; the first stage's draws are the sequence's reported `scores`."""

    seed: int = 0
    name = "random"

    @classmethod
    def from_config(cls, config: PromptDistillConfig, layouts: list[PromptLayout]) -> RandomSelection:
        """PromptDistill's stages for `config`, with a selector that ranks the draws as they are (no pooling or
        detrending, which would correlate neighbouring draws): the `budget` highest draws are a uniform subset."""
        method = super().from_config(config, layouts)
        return replace(method, selector=Selector(config.aggregation, pool_kernel=1))

    def scores(
        self, state: PrefillState, i: int, layer_input: torch.Tensor, b: int, heads: tuple[int, ...] | None
    ) -> torch.Tensor:
        """Uniform draws in [0, 1), one per real token of sequence `b`, from the stage's own seeded generator."""
        generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + i)
        return torch.rand(state.lengths[b], generator=generator).to(state.hidden.device)

    def units(self, state: PrefillState, b: int) -> None:
        """None: the draws pick tokens one by one whatever the span, so the baseline is the same for every span."""
        return None
