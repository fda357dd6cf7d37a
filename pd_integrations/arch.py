"""The few things that differ between model families. Everything else drives HF's own modules generically.

- query projection for scoring: fused `qkv_proj` (Phi-3) and per-head `q_norm` (Qwen3, Gemma3);
- rotary embeddings per layer type (Gemma3 has local and global RoPE);
- sliding-window layers (Mistral, Qwen2/3, Phi-3, Gemma2/3), masked by original positions;
- attention-logit and final-logit softcapping (Gemma2/3).
"""

from __future__ import annotations

import inspect

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .cpu_kernels import CPU_HALF_ATTENTION

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")

# Attention backends that apply causal masking themselves when given no mask; "eager" needs an explicit one.
_SELF_CAUSAL_BACKENDS = ("sdpa", CPU_HALF_ATTENTION, "flash_attention_2", "flash_attention_3", "flex_attention")


def padding(pads: list[int], device: torch.device) -> torch.Tensor | None:
    """Per-sequence left padding as `attention_mask` takes it: a tensor on `device`, or None when no sequence is padded
    (the host check keeps unpadded batches on the mask-free path)."""
    return torch.tensor(pads, device=device) if any(pads) else None


class UnsupportedArchitectureError(ValueError):
    """The model's family is not one PromptDistill knows how to drive."""


class Architecture:
    """Per-family adapter over an HF `*ForCausalLM`: its layers, rotary embedding, masks and scoring quirks."""

    def __init__(self, model):
        config = model.config.get_text_config(decoder=True)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"model type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.config = config
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        self.lm_head = model.lm_head
        self.num_layers = len(self.layers)
        self.num_heads = config.num_attention_heads
        self.max_positions = config.max_position_embeddings
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.attn_softcap = getattr(config, "attn_logit_softcapping", None)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * self.num_layers
        # Gemma3 keeps one rotary embedding with a layer-type argument; the others take positions only.
        rotary = self.decoder.rotary_emb
        self._rotary_by_type = "layer_type" in inspect.signature(rotary.forward).parameters
        self.layer_types = layer_types
        self.windows = [self._sliding_window(layer.self_attn) for layer in self.layers]
        # transformers 5.24 renamed the layers' `past_key_values` argument to `cache` (the old name goes in 5.40).
        parameters = inspect.signature(self.layers[0].forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def _sliding_window(self, attn) -> int | None:
        # Qwen2/3 and Gemma store the window on sliding layers only; Mistral and Phi-3 apply the config's everywhere.
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        return getattr(self.config, "sliding_window", None)

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation or "eager"

    def position_embeddings(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple]:
        """cos/sin for `positions` (original RoPE positions, shape [1, q]) per layer type."""
        rotary = self.decoder.rotary_emb
        if self._rotary_by_type:
            return {kind: rotary(hidden, positions, kind) for kind in set(self.layer_types)}
        shared = rotary(hidden, positions)
        return {kind: shared for kind in set(self.layer_types)}

    def attention_mask(
        self,
        layer_idx: int,
        query_positions: torch.Tensor,
        key_positions: torch.Tensor,
        key_pads: torch.Tensor | None,
        last_position: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """Additive mask [B, 1, q, k] built from original positions, or None when the backend needs none.

        `query_positions` [B, q] and `key_positions` [B, k] are the tokens' original positions; each sequence's keys
        are left-padded by `key_pads[b]` (see `padding`; None when no sequence is). Positions, not indices, decide
        causality and windows, because pruned sequences have gaps. `last_position` (a host int, so no device sync)
        tells whether a sliding window can exclude anything yet. Padding query tokens see every key, so no query is
        all masked.
        """
        if self.attn_implementation.startswith("flash"):
            return None  # flash kernels take no dense mask (the scheduler never pads sequences for them)
        window = self.windows[layer_idx]
        window_bites = window is not None and last_position >= window
        if (
            key_pads is None
            and not window_bites
            and (query_positions.shape[-1] == 1 or self.attn_implementation in _SELF_CAUSAL_BACKENDS)
        ):
            return None
        # Comparisons, not a position difference: an int64 [B, q, k] difference would be 8x the boolean mask.
        queries, keys = query_positions[:, :, None], key_positions[:, None, :]
        allowed = keys <= queries
        if window is not None:
            allowed &= keys > queries - window
        if key_pads is not None:
            device = key_pads.device
            allowed &= (torch.arange(key_positions.shape[1], device=device) >= key_pads[:, None])[:, None, :]
            query_pads = key_pads + query_positions.shape[1] - key_positions.shape[1]  # queries are the last tokens
            allowed |= (torch.arange(query_positions.shape[1], device=device) < query_pads[:, None])[:, :, None]
        blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), blocked)[:, None]

    def run_layer(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache,
        position_embeddings: dict,
    ) -> torch.Tensor:
        """Decoder layer `layer_idx` over `hidden` [B, q, h] at original `positions` [B, q], appending its keys and
        values to `cache`."""
        return self.layers[layer_idx](
            hidden,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            position_embeddings=position_embeddings[self.layer_types[layer_idx]],
            **{self._cache_argument: cache},
        )

    def query_states(self, layer_idx: int, layer_input: torch.Tensor, cos_sin: tuple) -> torch.Tensor:
        """Post-RoPE queries [1, heads, s, d] of the query tokens, from the layer's input hidden states [1, s, h]."""
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        x = layer.input_layernorm(layer_input)
        if hasattr(attn, "qkv_proj"):
            q = attn.qkv_proj(x)[..., : self.num_heads * attn.head_dim]
        else:
            q = attn.q_proj(x)
        q = q.view(*x.shape[:-1], -1, attn.head_dim)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        cos, sin = cos_sin
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        return q

    def attention_logits(self, layer_idx: int, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Scaled (and softcapped) q·k logits [1, heads, s, k] in float32, grouped-query aware: each key head is
        matched with its query heads without materialising repeated keys (which would be heads/kv-heads × the
        cache at long contexts)."""
        attn = self.layers[layer_idx].self_attn
        _, heads, tokens, dim = queries.shape
        kv_heads = keys.shape[1]
        grouped = queries.reshape(kv_heads, heads // kv_heads * tokens, dim)
        logits = torch.matmul(grouped, keys[0].transpose(-1, -2)).float() * attn.scaling
        logits = logits.view(1, heads, tokens, -1)
        if self.attn_softcap is not None:
            logits = torch.tanh(logits / self.attn_softcap) * self.attn_softcap
        return logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from final hidden states."""
        logits = self.lm_head(self.decoder.norm(hidden))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
