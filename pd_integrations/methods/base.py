"""What every prefill method shares: the per-call prefill state and the layer loop over HF's own modules.

A method is a small class in the shape of kvpress's presses: `PrefillMethod.prefill` runs the prompt through
`model.model.layers` with HF's decoder layers, rotary embedding, `DynamicCache` and attention functions, and calls
`after_layer` after each layer; a method that selects tokens gathers the state's rows there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..layout import RowLayout
from ..runtime import Runtime
from ..selection import Selector


@dataclass
class Prefill:
    """The result of a prefill: the cache, the original positions of each layer's cached keys, the next-token
    logits and what was kept. `kept_indices` are prompt token indices whose states reached the last layer;
    `stage_kept` holds the kept indices after each selection stage; `scores` are first-stage selection scores per
    prompt token (0 before the first stage's selection); `layout` says what was prunable. Decoding continues at
    `next_position` (the original prompt length, or the kept length after GemFilter's re-run)."""

    cache: DynamicCache
    key_positions: list[torch.Tensor]
    next_position: int
    logits: torch.Tensor
    kept_indices: torch.Tensor
    stage_kept: list[torch.Tensor]
    scores: torch.Tensor | None
    layout: RowLayout
    seconds: float = 0.0

    @property
    def kv_cache_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)


@dataclass
class PrefillState:
    """The rows of one prefill as it runs: hidden states, original positions and RoPE tables of the current rows,
    which of them are candidates for pruning (and how many, tracked on the host), the cache and each layer's
    cached key positions. `gather` and `drop_probe` are the only ways rows leave."""

    runtime: Runtime
    layout: RowLayout
    hidden: torch.Tensor
    positions: torch.Tensor
    cos_sin: dict
    candidates: torch.Tensor
    remaining: int
    cache: DynamicCache = field(default_factory=DynamicCache)
    key_positions: list[torch.Tensor] = field(default_factory=list)
    stage_kept: list[torch.Tensor] = field(default_factory=list)
    scores: torch.Tensor | None = None
    masks: dict = field(default_factory=dict)  # per sliding window, for the current rows

    @classmethod
    def start(cls, runtime: Runtime, ids: torch.Tensor, layout: RowLayout) -> PrefillState:
        """Embed `ids` (prompt, then probe) at positions 0..n-1."""
        arch = runtime.arch
        positions = torch.arange(ids.shape[0], device=ids.device)
        hidden = arch.decoder.embed_tokens(ids[None])
        return cls(runtime, layout, hidden, positions, arch.position_embeddings(hidden, positions[None]),
                   layout.candidates().to(ids.device), layout.num_prunable)

    def run_layer(self, i: int) -> torch.Tensor:
        """Run decoder layer `i` over the current rows; returns its input (for scoring)."""
        arch, layer_input = self.runtime.arch, self.hidden
        window = arch.windows[i]
        if window not in self.masks:
            self.masks[window] = arch.attention_mask(i, self.positions, self.positions, self._last_position(),
                                                     self.hidden.dtype)
        self.hidden = arch.layers[i](self.hidden, attention_mask=self.masks[window],
                                     position_ids=self.positions[None], past_key_values=self.cache, use_cache=True,
                                     position_embeddings=self.cos_sin[arch.layer_types[i]])
        self.key_positions.append(self.positions)
        return layer_input

    def query_head_scores(self, selector: Selector, i: int, layer_input: torch.Tensor) -> torch.Tensor:
        """Per-head scores [H, rows] of the current rows by the query rows' attention at layer `i`."""
        arch = self.runtime.arch
        query = slice(self.hidden.shape[1] - self.layout.query_rows, None)
        cos, sin = self.cos_sin[arch.layer_types[i]]
        queries = arch.query_states(i, layer_input[:, query], (cos[:, query], sin[:, query]))
        return selector.head_scores(arch, i, queries, self.cache.layers[i].keys, self.positions[query],
                                    self.positions)

    def units(self) -> torch.Tensor | None:
        """Span unit id of each current row, or None for token-level selection."""
        units = self.layout.units
        return None if units is None else units.to(self.positions.device)[self.positions]

    def gather(self, keep: torch.Tensor, through_layer: int, truncate_cache: bool) -> None:
        """Keep only rows `keep` (sorted); with `truncate_cache`, gather the KV of layers 0..`through_layer` too."""
        self.hidden, self.positions, self.candidates = self.hidden[:, keep], self.positions[keep], self.candidates[keep]
        self.cos_sin = {kind: (cos[:, keep], sin[:, keep]) for kind, (cos, sin) in self.cos_sin.items()}
        self.masks = {}
        for j in range(through_layer + 1) if truncate_cache else ():
            layer = self.cache.layers[j]
            layer.keys, layer.values = layer.keys.index_select(-2, keep), layer.values.index_select(-2, keep)
            self.key_positions[j] = self.positions

    def drop_probe(self, through_layer: int, truncate_cache: bool) -> None:
        """Remove the probe rows (the last ones): they only score selection. Caches already gathered lost them with
        the rows; the others are cropped."""
        probe = len(self.layout.probe_ids)
        if not probe:
            return
        self.gather(torch.arange(self.hidden.shape[1] - probe, device=self.hidden.device), through_layer,
                    truncate_cache)
        for j in range(through_layer + 1) if not truncate_cache else ():
            self.cache.layers[j].crop(-probe)
            self.key_positions[j] = self.key_positions[j][:-probe]

    def finish(self, with_logits: bool = True) -> Prefill:
        """The prefill result; without logits (a scout pass that stops early) its logits are empty."""
        arch, n = self.runtime.arch, len(self.layout.prunable)
        logits = arch.logits(self.hidden[:, -1])[0] if with_logits else torch.empty(0)
        return Prefill(self.cache, self.key_positions, n, logits, self.positions, self.stage_kept, self.scores,
                       self.layout)

    def _last_position(self) -> int:
        # A host int (no device sync): tells the mask whether a sliding window can exclude anything yet.
        return len(self.layout.prunable) + len(self.layout.probe_ids) - 1


class PrefillMethod:
    """One way to prefill a prompt: the layer loop, with `after_layer` for what a method does between layers.

    Subclasses set `prunes` (whether the engine lays out prunable context for them) and override `after_layer`
    or, for passes of their own, `prefill`.
    """

    prunes = False

    def prefill(self, runtime: Runtime, ids: torch.Tensor, layout: RowLayout,
                last_layer: int | None = None) -> Prefill:
        """Run `ids` (prompt, then probe) through layers 0..`last_layer` (default: all); returns the `Prefill`,
        with empty logits when it stops early."""
        state = PrefillState.start(runtime, ids, layout)
        layers = runtime.arch.num_layers if last_layer is None else last_layer + 1
        for i in range(layers):
            layer_input = state.run_layer(i)
            self.after_layer(state, i, layer_input)
        return state.finish(with_logits=last_layer is None)

    def after_layer(self, state: PrefillState, i: int, layer_input: torch.Tensor) -> None:
        """Called after layer `i` with that layer's input hidden states; the base method does nothing."""


class FullAttention(PrefillMethod):
    """The unmodified model: every token through every layer."""
