"""The CPU speed-ups: the bfloat16 kernels against what they replace (HF's SDPA attention and
`F.linear`), malloc keeping freed memory, and a thread giving its OpenMP team back."""

from __future__ import annotations

import os
import platform
import resource
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pd_integrations.cpu_kernels import (
    DECODE_KEY_CHUNK,
    FUSED_KEY_TOKENS,
    KEEP_FREED_MEMORY_VARIABLE,
    PREFILL_BLOCK_TOKENS,
    PackedLinear,
    _pause_openmp,
    attention_kernels,
    blocked_prefill_attention,
    cpu_half_attention,
    fused_decode_attention,
    fused_prefill_attention,
    keep_freed_memory,
    onednn_runs_bfloat16,
    release_openmp_threads,
    speed_up_cpu_model,
)

needs_fused_kernel = pytest.mark.skipif(
    attention_kernels() is None, reason="the fused attention kernels need AVX512-BF16 and a C++ compiler"
)


class _Module(torch.nn.Module):
    """What HF's attention functions read from the attention module."""

    is_causal = True

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


@pytest.mark.parametrize(
    "path", [pytest.param("fused kernel", marks=needs_fused_kernel), "float32", "bfloat16 matmuls"]
)
@pytest.mark.parametrize("masked", [False, True])
def test_one_query_token_matches_sdpa(masked, path, monkeypatch):
    """A batch of two with 9 query heads on 3 key heads, keys and values the front of longer buffers (as a
    `GrowingLayer` holds them), and a left-padding mask: the output equals SDPA's on the same bfloat16 inputs within
    bfloat16 rounding, in the fused kernel and, without it, on the short cache's float32 path and on the long
    cache's bfloat16 matmuls."""
    from pd_integrations import cpu_kernels

    if path != "fused kernel":
        monkeypatch.setattr(cpu_kernels, "attention_kernels", lambda: None)
    monkeypatch.setattr(cpu_kernels, "FLOAT32_DECODE_KEYS", 64 if path == "float32" else 16)
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


@needs_fused_kernel
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (8, 1), (12, 2)])
@pytest.mark.parametrize("dim", [16, 48, 64, 128])
@pytest.mark.parametrize("length", [1, 17, DECODE_KEY_CHUNK, 2 * DECODE_KEY_CHUNK + 37])
def test_fused_decode_attention_matches_sdpa(heads, kv_heads, dim, length):
    """Over caches of one key up to several chunks, with the second sequence's first keys padded away (a whole
    chunk when the cache is long), `fused_decode_attention` equals float32 SDPA on the same inputs within bfloat16
    rounding of the output; changing a padded key's value changes nothing."""
    torch.manual_seed(0)
    query = torch.randn(2, heads, 1, dim).to(torch.bfloat16)
    keys = (2 * torch.randn(2, kv_heads, length + 5, dim)).to(torch.bfloat16)[:, :, :length]
    values = torch.randn(2, kv_heads, length + 5, dim).to(torch.bfloat16)[:, :, :length]
    pads = min(length - 1, DECODE_KEY_CHUNK + 3)
    mask = torch.zeros(2, 1, 1, length + 2, dtype=torch.bfloat16)  # wider than the cache, as a batch's mask can be
    mask[1, :, :, :pads] = torch.finfo(torch.bfloat16).min
    ours = fused_decode_attention(query, keys, values, mask, dim**-0.5)
    expected = F.scaled_dot_product_attention(
        query.float(),
        keys.float(),
        values.float(),
        attn_mask=mask[..., :length].float(),
        scale=dim**-0.5,
        enable_gqa=True,
    ).transpose(1, 2)
    assert ours.shape == (2, 1, heads, dim) and ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), expected, atol=1e-2, rtol=1e-2)
    if pads:
        values[1, :, :pads] = 100.0
        torch.testing.assert_close(fused_decode_attention(query, keys, values, mask, dim**-0.5), ours, atol=0, rtol=0)


def _padded_causal_mask(length: int, pads: list[int]) -> torch.Tensor:
    """Additive bfloat16 mask [B, 1, q, k] as `Architecture.attention_mask` builds it: causal, each sequence's first
    `pads[b]` keys blocked, and its padding queries seeing every key."""
    index = torch.arange(length)
    allowed = (index[None, :] <= index[:, None]) & (index[None, None, :] >= torch.tensor(pads)[:, None, None])
    allowed |= index[None, :, None] < torch.tensor(pads)[:, None, None]
    blocked = torch.finfo(torch.bfloat16).min
    return torch.where(allowed, 0.0, blocked).to(torch.bfloat16)[:, None]


@pytest.mark.parametrize("masked", [False, True])
def test_blocked_prefill_attention_matches_sdpa(masked):
    """Two sequences of two full blocks and a ragged third, 9 query heads on 3 key heads, queries in HF's memory
    layout and keys the front of longer buffers: the output equals float32 SDPA's on the same bfloat16 inputs within
    bfloat16 rounding, causal without a mask and with a padding mask."""
    torch.manual_seed(0)
    batch, heads, kv_heads, dim = 2, 9, 3, 16
    length = 2 * PREFILL_BLOCK_TOKENS + 45
    query = torch.randn(batch, length, heads, dim).to(torch.bfloat16).transpose(1, 2)
    keys = torch.randn(batch, kv_heads, length + 11, dim).to(torch.bfloat16)[:, :, :length]
    values = torch.randn(batch, kv_heads, length + 11, dim).to(torch.bfloat16)[:, :, :length]
    mask = _padded_causal_mask(length, [0, 5]) if masked else None
    ours = blocked_prefill_attention(query, keys, values, mask, dim**-0.5)
    expected, _ = sdpa_attention_forward(
        _Module(heads // kv_heads),
        query.float(),
        keys.float(),
        values.float(),
        None if mask is None else mask.float(),
        scaling=dim**-0.5,
    )
    assert ours.shape == (batch, length, heads, dim) and ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "kernel",
    [
        lambda q, k, v: blocked_prefill_attention(q, k, v, None, 0.25),
        pytest.param(lambda q, k, v: fused_prefill_attention(q, k, v, 0.25), marks=needs_fused_kernel),
    ],
    ids=["blocked", "fused"],
)
def test_prefill_attention_never_reads_later_keys(kernel):
    """Causal, in both prefill kernels: changing the last 45 tokens' keys and values changes nothing before them."""
    torch.manual_seed(0)
    length = 2 * PREFILL_BLOCK_TOKENS + 45
    query = torch.randn(1, 4, length, 16).to(torch.bfloat16)
    keys, values = (torch.randn(1, 2, length, 16).to(torch.bfloat16) for _ in range(2))
    before = kernel(query, keys, values)
    keys[:, :, -45:], values[:, :, -45:] = 50.0, 50.0
    after = kernel(query, keys, values)
    torch.testing.assert_close(after[:, :-45], before[:, :-45], atol=0, rtol=0)
    assert not torch.equal(after[:, -45:], before[:, -45:])


@needs_fused_kernel
@pytest.mark.parametrize(
    "batch, heads, kv_heads, length, dim",
    [
        (2, 9, 3, 2 * FUSED_KEY_TOKENS + 45, 64),
        (1, 4, 2, 5, 16),
        (1, 8, 8, FUSED_KEY_TOKENS + 1, 32),
        (1, 12, 2, 70, 128),
    ],
)
def test_fused_prefill_attention_matches_sdpa(batch, heads, kv_heads, length, dim):
    """Grouped and plain multi-head attention, head sizes 16-128, prompts shorter than a key block, of whole blocks
    plus one token and ragged; queries in HF's memory layout and keys the front of longer buffers: the output
    equals float32 SDPA's on the same bfloat16 inputs within bfloat16 rounding, closer than the blocked kernel's."""
    torch.manual_seed(0)
    query = torch.randn(batch, length, heads, dim).to(torch.bfloat16).transpose(1, 2)
    keys = torch.randn(batch, kv_heads, length + 11, dim).to(torch.bfloat16)[:, :, :length]
    values = torch.randn(batch, kv_heads, length + 11, dim).to(torch.bfloat16)[:, :, :length]
    ours = fused_prefill_attention(query, keys, values, dim**-0.5)
    expected, _ = sdpa_attention_forward(
        _Module(heads // kv_heads), query.float(), keys.float(), values.float(), None, scaling=dim**-0.5
    )
    assert ours.shape == (batch, length, heads, dim) and ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), expected, atol=1e-2, rtol=1e-2)
    blocked = blocked_prefill_attention(query, keys, values, None, dim**-0.5)
    assert (ours.float() - expected).abs().mean() <= (blocked.float() - expected).abs().mean()


def test_a_kernel_that_does_not_build_warns_and_falls_back(monkeypatch):
    """Where the C++ extension fails to build, `attention_kernels` warns once, naming the error, and is None."""
    import torch.utils.cpp_extension

    from pd_integrations import cpu_kernels

    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    cpu_kernels.attention_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="slower PyTorch paths: Ninja is required"):
            assert cpu_kernels.attention_kernels() is None
    finally:
        cpu_kernels.attention_kernels.cache_clear()


@pytest.mark.parametrize("age, removed", [(3600, True), (5, False)])
def test_a_lock_left_by_a_killed_build_is_removed(age, removed, tmp_path, monkeypatch):
    """PyTorch's loader waits for the build lock to go away: one older than `STALE_BUILD_LOCK_SECONDS` (a killed
    build) is removed with a warning; a recent one (a build under way in another process) is left."""
    import torch.utils.cpp_extension

    from pd_integrations import cpu_kernels

    monkeypatch.setattr(torch.utils.cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    lock = tmp_path / "lock"
    lock.touch()
    os.utime(lock, (time.time() - age, time.time() - age))
    if removed:
        with pytest.warns(UserWarning, match="did not finish"):
            cpu_kernels._remove_stale_build_lock("pd_attention_test")
    else:
        cpu_kernels._remove_stale_build_lock("pd_attention_test")
    assert lock.exists() != removed


@pytest.mark.parametrize(
    "case, served_by",
    [
        ("causal, no mask", "fused"),
        ("causal, no fused kernel", "blocked"),
        ("causal, head size not a multiple of 16", "blocked"),
        ("additive mask", "blocked"),
        ("AMX", None),
        ("float16", None),
        ("not causal", None),
        ("boolean mask", None),
        ("fewer queries than keys", None),
        ("one query token", "decode"),
        ("one query token, AMX", "decode"),
        ("one query token, no fused kernel", None),
        ("one query token, head size not a multiple of 16", None),
        ("one query token, head size above 256", None),
        ("one query token, float16", None),
    ],
)
def test_which_calls_the_kernels_serve(case, served_by, monkeypatch):
    """Prompts: bfloat16 queries on a CPU without AMX go to `fused_prefill_attention` when causal with no mask and
    a head size it takes, else to `blocked_prefill_attention` when causal or with an additive mask. One query token
    in bfloat16 goes to `fused_decode_attention` where the kernels exist and take the head size. Every other call
    keeps SDPA (or the one-token paths in PyTorch)."""
    from pd_integrations import cpu_kernels

    calls = []
    monkeypatch.setattr(cpu_kernels, "cpu_has_amx", lambda: "AMX" in case)
    kernel = None if "no fused kernel" in case else object()
    monkeypatch.setattr(cpu_kernels, "attention_kernels", lambda: kernel)
    monkeypatch.setattr(cpu_kernels, "fused_prefill_attention", lambda *args: calls.append("fused") or args[0])
    monkeypatch.setattr(cpu_kernels, "blocked_prefill_attention", lambda *args: calls.append("blocked") or args[0])
    monkeypatch.setattr(cpu_kernels, "fused_decode_attention", lambda *args: calls.append("decode") or args[0])
    dtype = torch.float16 if "float16" in case else torch.bfloat16
    queries = 1 if case.startswith("one query token") else 6
    keys = 9 if case == "fewer queries than keys" else queries
    dim = 272 if "above 256" in case else 24 if "head size" in case else 16
    query = torch.randn(1, 4, queries, dim).to(dtype)
    key, value = (torch.randn(1, 2, keys, dim).to(dtype) for _ in range(2))
    mask = None
    if case == "additive mask":
        mask = torch.zeros(1, 1, queries, keys, dtype=dtype)
    elif case == "boolean mask":
        mask = torch.ones(1, 1, queries, keys, dtype=torch.bool)
    module = _Module(2)
    module.is_causal = case != "not causal"
    cpu_half_attention(module, query, key, value, mask, scaling=dim**-0.5)
    assert calls == ([served_by] if served_by else [])


needs_onednn_bfloat16 = pytest.mark.skipif(
    not onednn_runs_bfloat16(), reason="this CPU's oneDNN does not run bfloat16 linear layers"
)


@needs_onednn_bfloat16
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 48), (48,), (1, 48), (2, 3, 48), (300, 48)])
def test_packed_linear_equals_f_linear(bias, shape):
    """Any leading shape, one row or many, gives `F.linear`'s result in bfloat16; the weight is packed."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias).to(torch.bfloat16)
    x = torch.randn(shape).to(torch.bfloat16)
    expected = layer(x)
    PackedLinear.pack(layer)
    assert layer.weight.is_mkldnn
    ours = layer(x)
    assert ours.shape == expected.shape == (*shape[:-1], 80)
    torch.testing.assert_close(ours, expected)


@needs_onednn_bfloat16
def test_moving_a_packed_linear_unpacks_it():
    """`.to(float32)` turns the layer back into a plain `nn.Linear` with the same weights, cast."""
    layer = torch.nn.Linear(48, 80).to(torch.bfloat16)
    weight = layer.weight.detach().clone()
    PackedLinear.pack(layer)
    layer.to(torch.float32)
    assert type(layer) is torch.nn.Linear and not layer.weight.is_mkldnn
    torch.testing.assert_close(layer.weight, weight.float(), rtol=0, atol=0)


@needs_onednn_bfloat16
def test_the_kernels_go_only_on_half_precision_cpu_models():
    """A float32 model keeps `nn.Linear` and its attention; a bfloat16 one gets the attention kernel and
    `PackedLinear` layers, and its tied input embeddings keep their plain weight."""
    from pd_integrations.cpu_kernels import CPU_HALF_ATTENTION, use_cpu_half_kernels

    from .conftest import tiny_model

    model = tiny_model("llama", "sdpa")
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in the default model
    use_cpu_half_kernels(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    model = model.to(torch.bfloat16)
    ids = torch.arange(12)[None]
    model.set_attn_implementation(CPU_HALF_ATTENTION)  # the same attention either way: only the linears change
    with torch.inference_mode():
        expected = model(ids).logits
    model.set_attn_implementation("sdpa")
    use_cpu_half_kernels(model)
    assert model.config._attn_implementation == CPU_HALF_ATTENTION
    assert type(model.lm_head) is PackedLinear and type(model.model.layers[0].mlp.up_proj) is PackedLinear
    assert not model.model.embed_tokens.weight.is_mkldnn
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, expected)


@pytest.fixture
def fresh_keep_freed_memory():
    keep_freed_memory.cache_clear()
    yield
    keep_freed_memory.cache_clear()


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_keep_freed_memory_refuses_other_values(monkeypatch, fresh_keep_freed_memory, value):
    monkeypatch.setenv(KEEP_FREED_MEMORY_VARIABLE, value)
    with pytest.raises(ValueError, match=f"{KEEP_FREED_MEMORY_VARIABLE} must be '0' or '1'"):
        keep_freed_memory()


def test_keep_freed_memory_can_be_turned_off(monkeypatch, fresh_keep_freed_memory):
    monkeypatch.setenv(KEEP_FREED_MEMORY_VARIABLE, "0")
    assert keep_freed_memory() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_large_tensor_stays_in_the_heap_for_reuse(monkeypatch, fresh_keep_freed_memory):
    """A freed 64 MiB block (above glibc's largest automatic mmap threshold, 32 MiB) stays mapped in the heap for
    the next one, instead of being unmapped (and its 16,384 pages faulted in again when the next comes)."""
    monkeypatch.delenv(KEEP_FREED_MEMORY_VARIABLE, raising=False)
    assert keep_freed_memory() is True
    block = torch.ones(16 * 2**20)  # 64 MiB, every page touched
    resident = _resident_bytes()
    del block
    assert resident - _resident_bytes() < 16 * 2**20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def os_thread_ids() -> set[int]:
    """The process's OS threads, OpenMP workers included."""
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def still_running(threads: set[int]) -> set[int]:
    """Those of `threads` still running once they are all gone (released workers exit just after the release
    returns), or after a second."""
    deadline = time.monotonic() + 1
    while (alive := threads & os_thread_ids()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return alive


needs_openmp_team = pytest.mark.skipif(
    _pause_openmp() is None or torch.get_num_threads() < 2, reason="needs libgomp and at least two torch threads"
)


def in_new_thread(work):
    """`work()`'s result, run in a new thread (which owns no OpenMP team yet)."""
    results = []
    thread = threading.Thread(target=lambda: results.append(work()))
    thread.start()
    thread.join()
    return results[0]


def start_openmp_team() -> None:
    """Run a parallel region in this thread, so that it owns an OpenMP team."""
    torch.ones(1 << 22).mul_(2)


@needs_openmp_team
def test_a_thread_that_releases_its_openmp_team_leaves_no_workers():
    def work():
        before = os_thread_ids()
        start_openmp_team()
        workers = os_thread_ids() - before
        release_openmp_threads()
        return workers, still_running(workers)

    workers, left = in_new_thread(work)
    assert len(workers) == torch.get_num_threads() - 1 and not left


@needs_openmp_team
def test_loading_onto_the_cpu_gives_the_loading_threads_openmp_team_back():
    from .conftest import tiny_model

    model = tiny_model("llama")

    def work():
        before = os_thread_ids()
        start_openmp_team()
        workers = os_thread_ids() - before
        speed_up_cpu_model(model)
        return workers, still_running(workers)

    workers, left = in_new_thread(work)
    assert workers and not left
