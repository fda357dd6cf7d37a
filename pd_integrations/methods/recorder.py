"""The calibration recorder: an unpruned pass that records every layer's per-head query-token attention."""

from __future__ import annotations

import torch

from ..selection import Selector
from .base import PrefillMethod, PrefillState


class QueryAttentionRecorder(PrefillMethod):
    """Full attention over one prompt that keeps, per layer, the query tokens' per-head scores [H, tokens] in
    `layers` (for `pd-calibrate`), aggregated over the query tokens with `selector`'s aggregation."""

    def __init__(self, selector: Selector):
        self.selector = selector
        self.layers: list[torch.Tensor] = []

    def after_layer(self, state: PrefillState, i: int, layer_input: torch.Tensor) -> None:
        self.layers.append(state.query_head_scores(self.selector, i, layer_input, 0))
