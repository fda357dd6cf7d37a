"""The pruned path against an independent reference: HF's own decoder layers in a plain loop (one prompt, no cache,
no masks of ours) that keeps the engine's kept tokens after each stage, and HF's own `model(...)` decoding from the
cache the engine returns. Exactness with nothing pruned (test_engine.py) cannot see a bug in truncation or
protection; this can."""

from __future__ import annotations

import pytest
import torch

from pd_integrations import PromptDistillConfig, PromptDistillEngine

from .conftest import random_ids, tiny_model

N = 96
TRUNCATIONS = [True, "after_first_stage", False]


def reference_logits(model, ids: torch.Tensor, stage_layers: tuple[int, ...], stage_kept: list[torch.Tensor]):
    """Next-token logits of `ids` when, after each layer in `stage_layers`, only the tokens at the matching
    `stage_kept` positions go on (at their original RoPE positions)."""
    decoder = model.model
    hidden, positions = decoder.embed_tokens(ids[None]), torch.arange(ids.shape[0])[None]
    kept = dict(zip(stage_layers, stage_kept))
    for i, layer in enumerate(decoder.layers):
        # Kept tokens stay in order, so SDPA's causal-by-index mask is causal by position too.
        hidden = layer(hidden, position_ids=positions, position_embeddings=decoder.rotary_emb(hidden, positions))
        if i in kept:
            rows = torch.searchsorted(positions[0], kept[i])
            hidden, positions = hidden[:, rows], positions[:, rows]
    return model.lm_head(decoder.norm(hidden[:, -1]))[0]


def hf_decode(model, prefill, first_token: int, start: int, steps: int) -> list[int]:
    """Greedy tokens from HF's own forward over the engine's returned cache, at positions `start`, `start + 1`..."""
    tokens, cache = [first_token], prefill.cache
    for step in range(steps - 1):
        out = model(
            torch.tensor([[tokens[-1]]]), position_ids=torch.tensor([[start + step]]), cache=cache, use_cache=True
        )
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("truncation", TRUNCATIONS, ids=[str(t) for t in TRUNCATIONS])
def test_pruned_prefill_and_decode_match_hf_layers(family, truncation, tokenizer):
    model = tiny_model(family, "sdpa")
    config = PromptDistillConfig(
        selection_layers=(1, 2),
        budgets=(40, 20),
        span="token",
        pool_kernel=1,
        query_source="auto",
        aggregation="softmax_mean",
        cache_truncation=truncation,
    )
    engine = PromptDistillEngine(model, tokenizer, config)
    ids = random_ids(N, seed=5)
    with torch.inference_mode():
        prefill = engine.prefill(input_ids=ids)
        row = prefill.sequences[0]
        assert row.kept_indices.shape[0] < N  # something was pruned
        expected = reference_logits(model, ids, config.selection_layers, row.stage_kept)
        torch.testing.assert_close(prefill.logits[0], expected, atol=1e-4, rtol=0)
        widths = [layer.keys.shape[2] for layer in prefill.cache.layers]
        full_kv_layers = {True: 0, "after_first_stage": 2, False: 2}[truncation]
        assert widths[:full_kv_layers] == [N] * full_kv_layers  # layers that keep every token's KV
        result = engine.generate(input_ids=ids, max_new_tokens=8)
        decoded = hf_decode(model, engine.prefill(input_ids=ids), result.output_token_ids[0], N, 8)
    assert result.output_token_ids == decoded[: len(result.output_token_ids)]
