"""What every prefill method shares: the batched prefill state and the layer loop over HF's own modules.

A method is a small class in the shape of kvpress's presses: `PrefillMethod.prefill` runs a batch of prompts
through `model.model.layers` with HF's decoder layers, rotary embedding, `DynamicCache` and attention functions,
and calls `after_layer` after each layer; a method that selects tokens gathers each sequence's kept tokens there.

Words: a *sequence* is one prompt of the batch (index b); a *token* is one place along the sequence dimension (its
hidden state, cached key and value); a token's *position* is its original RoPE position, which a gather keeps.

Sequences are left-padded: sequence b's real tokens are the last `lengths[b]` of the sequence dimension, so every
sequence's query tokens and last token sit at the end, and a sequence that keeps fewer tokens after a selection is
simply re-padded. The same holds for each layer's cached keys (`key_lengths`), which is what `DecodeBatch` continues
from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import DynamicCache

from ..arch import padding
from ..config import PromptDistillConfig, fill_unset
from ..layout import PromptLayout
from ..runtime import Runtime
from ..selection import Selector


@dataclass
class PrefillSequence:
    """One sequence's part of a prefill. `kept_indices` are prompt token indices whose states reached the last
    layer; `stage_kept` holds the kept indices after each selection stage; `scores` are first-stage selection
    scores per token (prompt, then query suffix; 0 before the first stage's selection); `layout` says what was
    prunable. Decoding continues at `next_position` (the original prompt length, or the kept length after GemFilter's
    re-run). `kv_cache_bytes` counts this sequence's cached keys and values (not the batch's padding)."""

    layout: PromptLayout
    kept_indices: torch.Tensor
    stage_kept: list[torch.Tensor]
    scores: torch.Tensor | None
    next_position: int
    kv_cache_bytes: int


@dataclass
class Prefill:
    """The result of a batched prefill: the cache (each layer left-padded per sequence by `key_pads`), the original
    positions of each layer's cached keys, next-token logits [B, vocab] and, in `sequences`, each sequence's
    `PrefillSequence`."""

    cache: DynamicCache
    key_positions: list[torch.Tensor]
    key_pads: list[list[int]]
    logits: torch.Tensor
    sequences: list[PrefillSequence]


def left_pad(sequences: list[torch.Tensor], fill=0) -> torch.Tensor:
    """`sequences` (each [n_b, ...]) stacked into [B, max n_b, ...], each right-aligned after `fill`."""
    width = max(sequence.shape[0] for sequence in sequences)
    padded = sequences[0].new_full((len(sequences), width, *sequences[0].shape[1:]), fill)
    for b, sequence in enumerate(sequences):
        padded[b, width - sequence.shape[0] :] = sequence
    return padded


def _padded_index(
    width: int, lengths: list[int], keeps: list[torch.Tensor | None], device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """A gather index [B, new width] that keeps, per sequence, `keeps[b]` (indices into its `lengths[b]` real
    tokens, on `device`; None: all of them) left-padded (padding points at index 0), and the new lengths (from
    shapes, so no device sync)."""
    kept = [
        torch.arange(width - n, width, device=device) if keep is None else keep + (width - n)
        for n, keep in zip(lengths, keeps)
    ]
    return left_pad(kept), [index.shape[0] for index in kept]


def _gather_tokens(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """`tensor` gathered along its token dimension `dim` by a per-sequence `index` [B, n]."""
    shape = [1] * tensor.dim()
    shape[0], shape[dim] = index.shape
    expanded = list(tensor.shape)
    expanded[dim] = index.shape[1]
    return tensor.gather(dim, index.view(shape).expand(expanded))


@dataclass
class PrefillState:
    """The tokens of one batched prefill as it runs: hidden states [B, T, h] (T: the widest sequence's current
    tokens), original positions [B, T] and RoPE tables of the current tokens, how many are real per sequence
    (`lengths`, host ints), which are candidates for pruning (and how many per sequence), the cache and each layer's
    cached key positions and per-sequence key counts. `gather` and `drop_query_suffix` are the only ways tokens
    leave."""

    runtime: Runtime
    layouts: list[PromptLayout]
    hidden: torch.Tensor
    positions: torch.Tensor
    lengths: list[int]
    cos_sin: dict
    candidates: torch.Tensor
    remaining: list[int]
    cache: DynamicCache = field(default_factory=DynamicCache)
    key_positions: list[torch.Tensor] = field(default_factory=list)
    key_lengths: list[list[int]] = field(default_factory=list)
    stage_kept: list[list[torch.Tensor]] = field(default_factory=list)
    scores: list[torch.Tensor | None] = field(default_factory=list)
    masks: dict = field(default_factory=dict)  # per sliding window, for the current tokens

    @classmethod
    def start(cls, runtime: Runtime, ids: list[torch.Tensor], layouts: list[PromptLayout]) -> PrefillState:
        """Embed each sequence's `ids` (prompt, then query suffix) at positions 0..n-1, left-padded to one batch."""
        arch = runtime.arch
        positions = left_pad([torch.arange(sequence.shape[0], device=sequence.device) for sequence in ids])
        hidden = arch.decoder.embed_tokens(left_pad(ids))
        candidates = left_pad(
            [layout.candidates().to(sequence.device) for sequence, layout in zip(ids, layouts)], False
        )
        return cls(
            runtime,
            layouts,
            hidden,
            positions,
            [sequence.shape[0] for sequence in ids],
            arch.position_embeddings(hidden, positions),
            candidates,
            [layout.num_prunable for layout in layouts],
            stage_kept=[[] for _ in ids],
            scores=[None for _ in ids],
        )

    @property
    def pads(self) -> list[int]:
        return [self.hidden.shape[1] - n for n in self.lengths]

    def run_layer(self, i: int) -> torch.Tensor:
        """Run decoder layer `i` over the current tokens; returns its input (for scoring)."""
        arch, layer_input = self.runtime.arch, self.hidden
        window = arch.windows[i]
        if window not in self.masks:
            self.masks[window] = arch.attention_mask(
                i,
                self.positions,
                self.positions,
                padding(self.pads, self.hidden.device),
                self._last_position(),
                self.hidden.dtype,
            )
        self.hidden = arch.run_layer(i, self.hidden, self.masks[window], self.positions, self.cache, self.cos_sin)
        self.key_positions.append(self.positions)
        self.key_lengths.append(list(self.lengths))
        return layer_input

    def real_tokens(self, b: int) -> slice:
        """Sequence `b`'s real tokens (the last `lengths[b]`)."""
        return slice(self.hidden.shape[1] - self.lengths[b], None)

    def query_head_scores(self, selector: Selector, i: int, layer_input: torch.Tensor, b: int) -> torch.Tensor:
        """Per-head scores [H, real tokens] of sequence `b`'s real tokens by its query tokens' attention at layer
        `i`."""
        arch, real = self.runtime.arch, self.real_tokens(b)
        query = slice(self.hidden.shape[1] - self.layouts[b].query_tokens, None)
        cos, sin = self.cos_sin[arch.layer_types[i]]
        queries = arch.query_states(i, layer_input[b : b + 1, query], (cos[b : b + 1, query], sin[b : b + 1, query]))
        return selector.head_scores(
            arch,
            i,
            queries,
            self.cache.layers[i].keys[b : b + 1, :, real],
            self.positions[b, query],
            self.positions[b, real],
        )

    def units(self, b: int) -> torch.Tensor | None:
        """Span unit id of each of sequence `b`'s real tokens, or None for token-level selection."""
        units = self.layouts[b].units
        return None if units is None else units.to(self.positions.device)[self.positions[b, self.real_tokens(b)]]

    def gather(self, keeps: list[torch.Tensor | None], truncated: range) -> None:
        """Keep, per sequence, the real tokens `keeps[b]` (sorted indices into them; None: all), and gather the KV of
        the `truncated` layers (already run) the same way."""
        index, self.lengths = _padded_index(self.hidden.shape[1], self.lengths, keeps, self.hidden.device)
        self.hidden = _gather_tokens(self.hidden, index, 1)
        self.positions = _gather_tokens(self.positions, index, 1)
        self.candidates = _gather_tokens(self.candidates, index, 1)
        self.cos_sin = {
            kind: (_gather_tokens(cos, index, 1), _gather_tokens(sin, index, 1))
            for kind, (cos, sin) in self.cos_sin.items()
        }
        self.masks = {}
        for j in truncated:
            layer = self.cache.layers[j]
            layer.keys, layer.values = _gather_tokens(layer.keys, index, 2), _gather_tokens(layer.values, index, 2)
            self.key_positions[j], self.key_lengths[j] = self.positions, list(self.lengths)

    def drop_query_suffix(self, through_layer: int, truncated: range) -> None:
        """Remove the query suffix tokens (each sequence's last ones): they only score selection. The `truncated`
        layers lose them with the tokens; the other layers up to `through_layer` drop them too (a crop when every
        sequence's query suffix is as long)."""
        suffixes = [len(layout.query_suffix_ids) for layout in self.layouts]
        if not any(suffixes):
            return
        device = self.hidden.device
        self.gather([torch.arange(n - p, device=device) for n, p in zip(self.lengths, suffixes)], truncated)
        for j in (j for j in range(through_layer + 1) if j not in truncated):
            layer = self.cache.layers[j]
            if len(set(suffixes)) == 1:
                layer.crop(-suffixes[0])
                self.key_positions[j] = self.key_positions[j][:, : -suffixes[0]]
                self.key_lengths[j] = [n - suffixes[0] for n in self.key_lengths[j]]
                continue
            index, self.key_lengths[j] = _padded_index(
                layer.keys.shape[2],
                self.key_lengths[j],
                [torch.arange(n - p, device=device) for n, p in zip(self.key_lengths[j], suffixes)],
                device,
            )
            layer.keys, layer.values = _gather_tokens(layer.keys, index, 2), _gather_tokens(layer.values, index, 2)
            self.key_positions[j] = _gather_tokens(self.key_positions[j], index, 1)

    def finish(self, with_logits: bool = True) -> Prefill:
        """The prefill result; without logits (a scout pass that stops early) its logits are empty."""
        arch = self.runtime.arch
        logits = arch.logits(self.hidden[:, -1]) if with_logits else torch.empty(0)
        widths = [layer.keys.shape[2] for layer in self.cache.layers]
        pads = [[width - n for n in lengths] for width, lengths in zip(widths, self.key_lengths)]
        sequences = []
        for b, layout in enumerate(self.layouts):
            kv_bytes = sum(
                lengths[b] * (layer.keys[:1, :, :1].nbytes + layer.values[:1, :, :1].nbytes)
                for lengths, layer in zip(self.key_lengths, self.cache.layers)
            )
            sequences.append(
                PrefillSequence(
                    layout,
                    self.positions[b, self.real_tokens(b)],
                    self.stage_kept[b],
                    self.scores[b],
                    len(layout.prunable),
                    kv_bytes,
                )
            )
        return Prefill(self.cache, self.key_positions, pads, logits, sequences)

    def _last_position(self) -> int:
        # A host int (no device sync): tells the mask whether a sliding window can exclude anything yet.
        return max(len(layout.prunable) + len(layout.query_suffix_ids) for layout in self.layouts) - 1


@dataclass(frozen=True)
class CostedPrompt:
    """What the cost model prices a prefill by: the model's layers, the prompt's tokens, how many of them are not
    prunable, and one layer's cost over a number of tokens."""

    num_layers: int
    prompt_tokens: int
    protected_tokens: int
    layer_cost: Callable[[int], float]


class PrefillMethod:
    """One way to prefill a batch of prompts: the layer loop, with `after_layer` for what a method does between
    layers.

    A registered method (see `methods.registry`) owns its settings through class-level hooks: `name` (the
    `config.method` that selects it), `prunes` (whether the engine lays out prunable context for it),
    `check_config` (what it refuses), `resolve` (where its unset fields come from), `from_config` (the method for
    a batch) and `cost` (its prefill's price in the cost model). Subclasses override `after_layer` or, for passes of
    their own, `prefill`.
    """

    name: ClassVar[str] = ""
    prunes: ClassVar[bool] = False

    @classmethod
    def check_config(cls, config: PromptDistillConfig) -> None:
        """Raise `ValueError` naming the field for settings this method cannot run; the checks every config passes
        (`PromptDistillConfig`) have run already. The base method refuses nothing."""

    @classmethod
    def resolve(cls, config: PromptDistillConfig, sources: list[dict]) -> PromptDistillConfig:
        """`config` with its unset fields filled from the settings dicts `sources`, first source first (for a method
        that prunes: the model's profile, then the fallback rule; see `config.resolve_config`), then the package
        `DEFAULTS` (`config.fill_unset`). Raises `ValueError` for a filled config that does not validate."""
        return fill_unset(config, sources)

    @classmethod
    def from_config(cls, config: PromptDistillConfig, layouts: list[PromptLayout]) -> PrefillMethod:
        """The method for a batch of sequences with `layouts` under the resolved `config`; the base method needs
        neither."""
        return cls()

    @classmethod
    def cost(cls, config: PromptDistillConfig, prompt: CostedPrompt) -> float | None:
        """The cost model's prefill time for `prompt` under the resolved `config`, over full attention's
        (`calibration.cost.predicted_ratio_of` calls it). None for the base method: it is full attention, every layer
        over every token, the prefill the ratio is taken against."""
        return None

    def prefill(
        self, runtime: Runtime, ids: list[torch.Tensor], layouts: list[PromptLayout], last_layer: int | None = None
    ) -> Prefill:
        """Run each sequence's `ids` (prompt, then query suffix) through layers 0..`last_layer` (default: all) as one
        batch; returns the `Prefill`, with empty logits when it stops early."""
        state = PrefillState.start(runtime, ids, layouts)
        layers = runtime.arch.num_layers if last_layer is None else last_layer + 1
        for i in range(layers):
            layer_input = state.run_layer(i)
            self.after_layer(state, i, layer_input)
        return state.finish(with_logits=last_layer is None)

    def after_layer(self, state: PrefillState, i: int, layer_input: torch.Tensor) -> None:
        """Called after layer `i` with that layer's input hidden states; the base method does nothing."""


class FullAttention(PrefillMethod):
    """The unmodified model: every token through every layer.

    Nothing is selected, so its config resolves to no stages (`selection_layers`, `budgets` and `heads` are empty
    whatever was given) and the profile is not read; the scoring fields get the package `DEFAULTS` (the fallback
    rule's scoring), of which only `PromptDistillEngine.query_attention` reads one (the aggregation)."""

    name = "full"

    @classmethod
    def resolve(cls, config: PromptDistillConfig, sources: list[dict]) -> PromptDistillConfig:
        return fill_unset(config.replace(selection_layers=(), budgets=(), heads=()), sources)
