"""The running decode batch: every generating sequence's cache, advanced one token per sequence per step.

Sequences come from prefills (each a batch of its own), join the running batch at a step boundary and leave it when
done: iteration-level ("continuous") batching. Every layer's keys are left-padded per sequence (`key_pads`), so a
sequence's real keys are a suffix and each step's new key lands at the end for every sequence; masks come from the
pads and each key's original position. Each sequence continues at its own original position (its prompt's length
plus the tokens generated so far), whatever it kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .arch import padding
from .methods import Prefill
from .runtime import Runtime


def _pad_front(tensor: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """`tensor` zero-padded at the front of `dim` to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class GrowingLayer(DynamicLayer):
    """A cache layer with room to grow: its keys and values are the front of longer buffers, so a decode step
    writes its new key in place instead of copying the whole cache, as `DynamicLayer`'s concatenation does (for
    a batch of long sequences that copy is most of a CPU decode step). Assigning `keys`/`values` (sequences joining
    or leaving) replaces the buffers; the next step makes room again, a quarter more at a time."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        if keys is not None:
            self.keys, self.values, self.is_initialized, self.device = keys, values, True, keys.device

    # Each of keys and values knows its own length: callers assign one, then the other.
    keys = property(
        lambda self: self._keys[:, :, : self._key_length],
        lambda self, keys: self._replace(keys, "_keys", "_key_length"),
    )
    values = property(
        lambda self: self._values[:, :, : self._value_length],
        lambda self, values: self._replace(values, "_values", "_value_length"),
    )

    def _replace(self, tensor: torch.Tensor | None, buffer: str, length: str) -> None:
        setattr(self, buffer, tensor)
        setattr(self, length, 0 if tensor is None else tensor.shape[2])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = self._key_length
        end = start + key_states.shape[2]
        if end > self._keys.shape[2]:
            room = end + max(128, end // 4)
            self._keys, self._values = _pad_back(self.keys, room), _pad_back(self.values, room)
        self._keys[:, :, start:end] = key_states
        self._values[:, :, start:end] = value_states
        self._key_length = self._value_length = end
        return self.keys, self.values


def _pad_back(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` in a new buffer `width` long along dim 2 (the rest uninitialised)."""
    buffer = tensor.new_empty((*tensor.shape[:2], width, *tensor.shape[3:]))
    buffer[:, :, : tensor.shape[2]] = tensor
    return buffer


@dataclass
class DecodeBatch:
    """The caches of the sequences being decoded: per layer, keys/values [B, kv heads, K, d] left-padded by
    `key_pads[layer][b]` keys and their original positions [B, K]; and each sequence's next position."""

    runtime: Runtime
    cache: DynamicCache
    key_positions: list[torch.Tensor]
    key_pads: list[list[int]]
    positions: list[int]

    @classmethod
    def after(cls, runtime: Runtime, prefill: Prefill) -> DecodeBatch:
        """The sequences of `prefill`, ready to decode (the batch takes over its cache)."""
        prefill.cache.layers = [GrowingLayer(layer.keys, layer.values) for layer in prefill.cache.layers]
        return cls(
            runtime,
            prefill.cache,
            list(prefill.key_positions),
            [list(p) for p in prefill.key_pads],
            [sequence.next_position for sequence in prefill.sequences],
        )

    def __len__(self) -> int:
        return len(self.positions)

    def join(self, other: DecodeBatch) -> None:
        """Append `other`'s sequences (after this batch's), left-padding each layer's keys to the longer of the two."""
        for i, (mine, theirs) in enumerate(zip(self.cache.layers, other.cache.layers)):
            ours, new = mine.keys.shape[2], theirs.keys.shape[2]
            width = max(ours, new)
            mine.keys = torch.cat([_pad_front(mine.keys, 2, width), _pad_front(theirs.keys, 2, width)])
            mine.values = torch.cat([_pad_front(mine.values, 2, width), _pad_front(theirs.values, 2, width)])
            self.key_positions[i] = torch.cat(
                [_pad_front(self.key_positions[i], 1, width), _pad_front(other.key_positions[i], 1, width)]
            )
            self.key_pads[i] = [p + width - ours for p in self.key_pads[i]] + [
                p + width - new for p in other.key_pads[i]
            ]
        self.positions += other.positions

    def keep(self, indices: list[int]) -> None:
        """Keep only the sequences at `indices` (in that order), then drop the padding every remaining sequence
        has."""
        index = torch.tensor(indices, dtype=torch.long, device=self.key_positions[0].device)
        for i, layer in enumerate(self.cache.layers):
            layer.batch_select_indices(index)
            pads = [self.key_pads[i][b] for b in indices]
            common = min(pads)
            layer.keys, layer.values = layer.keys[:, :, common:], layer.values[:, :, common:]
            self.key_positions[i] = self.key_positions[i][index, common:]
            self.key_pads[i] = [p - common for p in pads]
        self.positions = [self.positions[b] for b in indices]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run one token per sequence (`tokens` [B]) at each sequence's position through every layer, extending the
        caches; returns next-token logits [B, vocab]."""
        arch = self.runtime.arch
        hidden = arch.decoder.embed_tokens(tokens.view(-1, 1))
        positions = torch.tensor(self.positions, device=tokens.device)[:, None]
        cos_sin = arch.position_embeddings(hidden, positions)
        masks, pads = {}, {}  # layers whose keys share width, pads and window share a mask; pads, one copy each
        for i in range(arch.num_layers):
            self.key_positions[i] = torch.cat([self.key_positions[i], positions], dim=1)
            window, layer_pads = arch.windows[i], tuple(self.key_pads[i])
            shape = (window, self.key_positions[i].shape[1], layer_pads)
            if window is not None or shape not in masks:
                if layer_pads not in pads:
                    pads[layer_pads] = padding(layer_pads, tokens.device)
                masks[shape] = arch.attention_mask(
                    i, positions, self.key_positions[i], pads[layer_pads], max(self.positions), hidden.dtype
                )
            hidden = arch.run_layer(i, hidden, masks[shape], positions, self.cache, cos_sin)
        self.positions = [p + 1 for p in self.positions]
        return arch.logits(hidden[:, -1])
