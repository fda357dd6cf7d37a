"""`cpu_half_attention`, the bfloat16 decode-step attention on CPU, against HF's SDPA attention."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pd_integrations.attention import cpu_half_attention


class _Module(torch.nn.Module):
    """What HF's attention functions read from the attention module."""

    is_causal = True

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


@pytest.mark.parametrize("masked", [False, True])
def test_one_query_token_matches_sdpa(masked):
    """A batch of two with 9 query heads on 3 key heads, keys and values the front of longer buffers (as a
    `GrowingLayer` holds them), and a left-padding mask: the output equals SDPA's on the same bfloat16 inputs within
    bfloat16 rounding."""
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 9, 3, 37, 16
    query = torch.randn(batch, heads, 1, dim).to(torch.bfloat16)
    keys = torch.randn(batch, kv_heads, length + 11, dim).to(torch.bfloat16)[:, :, :length]
    values = torch.randn(batch, kv_heads, length + 11, dim).to(torch.bfloat16)[:, :, :length]
    assert not keys.is_contiguous()
    mask = None
    if masked:  # the second sequence is left-padded by 5 keys
        mask = torch.zeros(batch, 1, 1, length, dtype=torch.bfloat16)
        mask[1, :, :, :5] = torch.finfo(torch.bfloat16).min
    module = _Module(heads // kv_heads)
    ours, _ = cpu_half_attention(module, query, keys, values, mask, scaling=dim**-0.5)
    expected, _ = sdpa_attention_forward(
        module, query.float(), keys.float(), values.float(), None if mask is None else mask.float(), scaling=dim**-0.5
    )
    assert ours.shape == (batch, 1, heads, dim) and ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), expected, atol=2e-2, rtol=2e-2)
    if masked:  # the padded keys take no part: changing them changes nothing
        values[1, :, :5] = 100.0
        again, _ = cpu_half_attention(module, query, keys, values, mask, scaling=dim**-0.5)
        torch.testing.assert_close(again, ours, atol=0, rtol=0)
