"""CPU speed-ups: what `load_model` applies (`speed_up_cpu_model`) to a model it loads onto the CPU, and what the
scheduler does after each round.

- One OpenMP team at a time (`release_openmp_threads`): a thread done with the model gives its OpenMP worker
  threads back, so that the next thread to run it (another caller, a server's worker) does not run beside a
  second, idle team, which makes libgomp's workers sleep between parallel regions.
- Freed memory kept for reuse (`keep_freed_memory`): a prefill allocates and frees tensors of tens of megabytes in
  every layer. glibc's malloc hands blocks that large back to the kernel on free, so each new one is faulted in
  again page by page; at 8k tokens that was about 0.5-0.75 million page faults and 1-3 s of kernel time per
  prefill here. Kept in the heap, they are reused.

For a bfloat16/float16 model, `use_cpu_half_kernels`:

- Attention, registered with transformers as `CPU_HALF_ATTENTION`: on CPU, PyTorch's SDPA runs a single query token
  in bfloat16 about six times slower than in float32 (its kernels upcast per block), so a bfloat16 decode step would
  cost more than a float32 one. For one query token in bfloat16 on CPUs with AVX512-BF16, `cpu_half_attention`
  runs `fused_decode_attention`, a C++ kernel that reads the cache once (`attention_kernels`). Elsewhere (float16,
  head sizes above `DECODE_MAX_HEAD_DIM`, or no kernel) it upcasts a short cache (up to `FLOAT32_DECODE_KEYS`
  keys) to float32 for SDPA, and over a longer one matches each key head with its query heads in two bfloat16
  matmuls (no repeated keys), with the softmax in float32 as HF's eager attention does.
- Prefill attention in bfloat16 on CPUs without AMX: there, PyTorch's flash kernel multiplies bfloat16 in float32,
  at about 140 GFLOPS on two AMD EPYC cores against oneDNN's bfloat16 matmuls at 300-400. Causal attention with
  no mask runs `fused_prefill_attention`, a small C++ flash kernel on oneDNN's bfloat16 GEMMs, compiled once on
  CPUs with AVX512-BF16 (`attention_kernels`); a masked call, or any call where that kernel is missing, runs
  `blocked_prefill_attention`, from PyTorch matmuls. With AMX, PyTorch's kernel multiplies in bfloat16 itself
  and stays. Every other call is HF's own SDPA attention.
- Linear layers with prepacked weights (`PackedLinear`), in bfloat16 where oneDNN runs it: `F.linear` hands
  oneDNN a plain weight, which it reorders into its blocked layout on every call. Packed once at load, the
  layers give the same results (bit for bit on the AMD EPYC here) in less time: a single row 576 -> 1536 in 54
  against 124 microseconds, the 49152-row output layer in 2.1 against 5.6 ms, a 2000-row prefill 5% faster.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import os
import re
import subprocess
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

CPU_HALF_ATTENTION = "pd_cpu_half_sdpa"
log = logging.getLogger(__name__)


def cpu_half_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface signature: query [B, H, q, d], key/value [B, KV, k, d], additive mask [B, 1, q, k]
    or None; returns the output [B, q, H, d] and no weights."""
    plain = (
        query.device.type == "cpu"
        and query.dtype != torch.float32
        and not dropout
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
    )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if plain and query.shape[2] > 1 and _blocked_prefill_applies(module, query, key, attention_mask, kwargs):
        if attention_mask is None and query.shape[-1] % 16 == 0 and attention_kernels() is not None:
            return fused_prefill_attention(query, key, value, scale), None
        return blocked_prefill_attention(query, key, value, attention_mask, scale), None
    if not plain or query.shape[2] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    dim = query.shape[-1]
    fused = query.dtype == torch.bfloat16 and dim % 16 == 0 and dim <= DECODE_MAX_HEAD_DIM
    if fused and attention_kernels() is not None:
        return fused_decode_attention(query, key, value, attention_mask, scale), None
    if key.shape[2] <= FLOAT32_DECODE_KEYS:
        return _float32_decode_attention(query, key, value, attention_mask, scale), None
    return _grouped_decode_attention(query, key, value, attention_mask, scale), None


# Keys per work item of `fused_decode_attention`: at 8k keys and three key heads, 96 items for two threads; 128, 512
# and 1024 measured no better.
DECODE_KEY_CHUNK = 256
# The largest head size the decode kernel takes (its queries and accumulators sit in registers); larger ones keep the
# PyTorch paths.
DECODE_MAX_HEAD_DIM = 256
_NO_MASK = torch.empty(0)  # what the kernel takes for "no mask", made once rather than in every layer of every step


def fused_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One query token per sequence over its cache, in `attention_kernels`' C++ kernel: each key head's cache in
    chunks of `DECODE_KEY_CHUNK` keys across the threads, the logits in float32 from bfloat16 dot-product
    instructions, the softmax and the weighted values in float32. One decode step of the default model over 8k keys
    (30 layers) takes about 10 ms on two AMD EPYC cores against 25 ms as bfloat16 matmuls per key head.

    Args:
        query: [B, H, 1, d] in bfloat16, d a multiple of 16 up to `DECODE_MAX_HEAD_DIM`.
        key, value: [B, KV, k, d], each head's rows contiguous (a prefix of a longer buffer, as `GrowingLayer`'s,
            is read in place).
        attention_mask: None, or an additive mask [B, 1, q, >= k] whose last query row applies.
        scale: the logits' scale.

    Returns:
        The output [B, 1, H, d].
    """
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    key, value = (t if t.stride(-1) == 1 and t.stride(-2) == dim else t.contiguous() for t in (key, value))
    mask = _NO_MASK if attention_mask is None else attention_mask[:, 0, -1, :length].float().contiguous()
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # one query token: a group's heads as rows
    output = attention_kernels().decode_attention(grouped, key, value, mask, scale, DECODE_KEY_CHUNK)
    return output.view(batch, 1, heads, dim)


# Up to this many keys, a decode step's attention is cheaper upcast to float32 through SDPA (one call per layer) than
# as bfloat16 matmuls per key head, whose oneDNN calls cost about 25 us each however few the keys. Over 30 layers of
# the default model on an AMD EPYC: 200 keys 9.8 -> 2.6 ms, 1000 keys 9.4 -> 5.0, 2000 keys 11.9 -> 9.8; from
# about 3000 keys on, the float32 copy of the cache costs more than it saves.
FLOAT32_DECODE_KEYS = 2048


def _float32_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One query token [B, H, 1, d] over keys/values [B, KV, k, d], in float32 through SDPA; returns [B, 1, H, d].
    SDPA is called directly with `enable_gqa`: HF's `sdpa_attention_forward` repeats the keys per query head
    whenever there is a mask (a padded batch)."""
    mask = None if attention_mask is None else attention_mask[:, :, -1:, : key.shape[2]].float()
    output = F.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return output.to(query.dtype).transpose(1, 2)


def _grouped_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One query token [B, H, 1, d] over keys/values [B, KV, k, d] in bfloat16 matmuls, each key head against its
    group of query heads (no repeated keys), the softmax in float32; returns [B, 1, H, d]."""
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # one query token: a group's heads as rows
    # One matmul per sequence and key head: the cache's keys are a prefix of a longer buffer (`GrowingLayer`), and a
    # batched matmul over such views copies the whole cache first; each head's [length, d] block is contiguous.
    logits = query.new_empty(batch, kv_heads, heads // kv_heads, length)
    for b in range(batch):
        for h in range(kv_heads):
            torch.mm(grouped[b, h], key[b, h].t(), out=logits[b, h])
    logits = logits.float() * scale
    if attention_mask is not None:
        logits = logits + attention_mask[:, :, -1:, :length]
    probs = torch.softmax(logits, dim=-1).to(value.dtype)
    output = query.new_empty(batch, kv_heads, heads // kv_heads, dim)
    for b in range(batch):
        for h in range(kv_heads):
            torch.mm(probs[b, h], value[b, h], out=output[b, h])
    return output.reshape(batch, 1, heads, dim)


def _blocked_prefill_applies(module, query, key, attention_mask, kwargs) -> bool:
    """Whether `blocked_prefill_attention` serves this call: bfloat16 on a CPU without AMX, and either no mask on a
    causal layer whose queries are its keys, or an additive mask in the query's dtype."""
    if query.dtype != torch.bfloat16 or cpu_has_amx():
        return False
    if attention_mask is None:
        causal = kwargs.get("is_causal")
        return (getattr(module, "is_causal", True) if causal is None else causal) and query.shape[2] == key.shape[2]
    return attention_mask.dtype == query.dtype


PREFILL_BLOCK_TOKENS = 128


def blocked_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention over many query tokens, `PREFILL_BLOCK_TOKENS` at a time, from bfloat16 matmuls and a softmax, as
    HF's eager attention computes it. Without AMX, PyTorch's flash kernel multiplies bfloat16 in float32; oneDNN's
    bfloat16 matmuls are about 2.5x as fast (on an AMD EPYC with AVX512-BF16).

    Args:
        query: [B, H, q, d]; key, value: [B, KV, k, d].
        attention_mask: None for causal attention with q == k (keys past a query's block are never computed), or
            an additive mask [B or 1, 1, q, >= k] in the query's dtype.
        scale: the logits' scale.

    Returns:
        The output [B, q, H, d].
    """
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group, block = heads // kv_heads, PREFILL_BLOCK_TOKENS
    grouped = _queries_by_key_head(query, kv_heads, scale)
    future = _future_bias(block, group, query.dtype)
    output = query.new_empty(batch, length, heads, dim)
    for b in range(batch):
        mask = None if attention_mask is None else attention_mask[b if attention_mask.shape[0] > 1 else 0, 0]
        for h in range(kv_heads):
            for start in range(0, length, block):
                end = min(start + block, length)
                rows, width = end - start, end if mask is None else keys
                logits = torch.mm(grouped[b, h, start:end].view(rows * group, dim), key[b, h, :width].t())
                if mask is None:
                    logits[:, start:end].add_(future[: rows * group, :rows])
                else:
                    logits.view(rows, group, width).add_(mask[start:end, None, :width])
                heads_out = torch.mm(torch.softmax(logits, dim=-1), value[b, h, :width])
                output[b, start:end, h * group : (h + 1) * group] = heads_out.view(rows, group, dim)
    return output


def _queries_by_key_head(query: torch.Tensor, kv_heads: int, scale: float) -> torch.Tensor:
    """Scaled queries [B, KV, q, group, d]: for each key head, its query heads' rows of one token side by side, so
    one matmul serves the whole group."""
    batch, heads, length, dim = query.shape
    grouped = query.new_empty(batch, kv_heads, length, heads // kv_heads, dim)
    by_token = query.transpose(1, 2).reshape(batch, length, kv_heads, heads // kv_heads, dim)  # HF's: a view of this
    return torch.mul(by_token.permute(0, 2, 1, 3, 4), scale, out=grouped)


@functools.cache
def _future_bias(block: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """[block·group, block] additive mask: -inf where a block's (token, head) row would see a later key of its
    block, else 0. Adding it gives what `masked_fill_` would, in half the time."""
    future = torch.ones(block, block, dtype=torch.bool).triu(1).repeat_interleave(group, 0)
    return torch.zeros(future.shape, dtype=dtype).masked_fill_(future, -math.inf)


# The fused kernel's tiles: a block of query tokens (times the query heads of one key head) against a block of keys.
FUSED_QUERY_TOKENS, FUSED_KEY_TOKENS = 32, 128


def fused_prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over a whole prompt (queries are the keys), in `attention_kernels`'s C++ flash kernel:
    the logits of one block of keys at a time go through an online softmax in float32 into the output, on oneDNN's
    bfloat16 GEMMs. On two AMD EPYC cores, one layer of the default model: 2060 tokens 20-25 against
    `blocked_prefill_attention`'s 27-36 ms, 8192 tokens 0.27-0.35 against 0.39-0.42 s, and closer to float32 SDPA.

    Args:
        query: [B, H, n, d] in bfloat16, d a multiple of 16; key, value: [B, KV, n, d].
        scale: the logits' scale.

    Returns:
        The output [B, n, H, d].
    """
    batch, _, length, dim = query.shape
    kv_heads, block = key.shape[1], FUSED_KEY_TOKENS
    blocks = -(-length // block)
    padded = (0, 0, 0, blocks * block - length)  # zero keys past the end, which causality hides from every query
    # oneDNN's bfloat16 kernels read the second operand in VNNI layout: pairs along the summed dimension side by side.
    keys = F.pad(key, padded).view(batch, kv_heads, blocks, block, dim // 2, 2).permute(0, 1, 2, 4, 3, 5)
    values = F.pad(value, padded).view(batch, kv_heads, blocks * block // 2, 2, dim).transpose(-1, -2)
    queries = _queries_by_key_head(query, kv_heads, scale)
    return attention_kernels().causal_attention(queries, keys.contiguous(), values.contiguous(), FUSED_QUERY_TOKENS)


_KERNEL_SOURCE = Path(__file__).parent / "csrc" / "attention.cpp"
_KERNEL_FLAGS = ["-O3", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-fopenmp"] + [
    f"-mavx512{part}" for part in ("f", "bw", "vl", "dq", "bf16")
]


@functools.cache
def attention_kernels():
    """The compiled extension `csrc/attention.cpp` (the kernels of `fused_prefill_attention` and
    `fused_decode_attention`), or None on a CPU without AVX512-BF16. The first call compiles it (about 30 s; PyTorch
    keeps it under ~/.cache/torch_extensions). Where it cannot be built (no C++ compiler or Python headers), a
    warning says so once and None falls back: prefills to `blocked_prefill_attention`, decode steps to SDPA or
    matmuls."""
    if not torch.cpu._is_avx512_bf16_supported():
        return None
    from torch.utils.cpp_extension import load

    log.info("building (once per machine) or loading the fused attention kernels")
    # One build per PyTorch version: an extension built against another one may not load or may misbehave.
    name = "pd_attention_" + re.sub(r"\W", "_", torch.__version__)
    try:
        _remove_stale_build_lock(name)
        return load(
            name=name,
            sources=[str(_KERNEL_SOURCE)],
            extra_cflags=_KERNEL_FLAGS,
            extra_ldflags=["-fopenmp"],
        )
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as error:
        warnings.warn(
            f"the fused attention kernels did not build, so bfloat16 prefills and decode steps use slower "
            f"PyTorch paths: {error}",
            stacklevel=2,
        )
        return None


# A build takes well under a minute; a lock file older than this was left by a build that was killed.
STALE_BUILD_LOCK_SECONDS = 600


def _remove_stale_build_lock(name: str) -> None:
    """Remove the lock file of extension `name`'s build directory if a killed build left it: PyTorch's loader waits
    for it to go away, so every later load would hang."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: a PyTorch without it just waits
    except ImportError:
        return
    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_BUILD_LOCK_SECONDS:
        warnings.warn(
            f"removing {lock}, left {age:.0f} s ago by a build of the attention kernels that did not finish",
            stacklevel=3,
        )
        lock.unlink(missing_ok=True)


class PackedLinear(torch.nn.Linear):
    """`nn.Linear` whose weight is held in oneDNN's blocked layout (an MKLDNN tensor), reordered once instead of on
    every call. Moving or casting it (`.to`, `.float`, ...) first turns it back into a plain `nn.Linear`."""

    @classmethod
    def pack(cls, layer: torch.nn.Linear) -> None:
        """Turn `layer` into a `PackedLinear` in place. A weight it shares (tied input embeddings) stays as it was
        for the other module: the layer gets its own packed copy."""
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 1)  # 1: laid out for decode steps
        layer.weight = torch.nn.Parameter(packed, requires_grad=False)
        layer.__class__ = cls

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(input, self.weight, self.bias, "none", [], "")

    def _apply(self, fn, recurse=True):
        # MKLDNN tensors support almost no operations, so `Module.to` and friends would fail on the packed weight.
        self.weight = torch.nn.Parameter(self.weight.to_dense(), requires_grad=False)
        self.__class__ = torch.nn.Linear
        return torch.nn.Linear._apply(self, fn, recurse)


def onednn_runs_bfloat16() -> bool:
    """Whether this PyTorch build's oneDNN runs bfloat16 linear layers on this CPU (`PackedLinear`'s condition)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, where PyTorch's own prefill attention is fast."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def use_cpu_half_kernels(model: torch.nn.Module) -> None:
    """On a CPU model in bfloat16/float16: its attention, if SDPA, becomes `cpu_half_attention`, and in bfloat16,
    where oneDNN runs it, its plain `nn.Linear` layers become `PackedLinear` and the fused attention kernels are
    built. Other models are left as they are."""
    if model.device.type != "cpu" or model.dtype == torch.float32:
        return
    if model.dtype == torch.bfloat16 and onednn_runs_bfloat16():
        for module in model.modules():
            if type(module) is torch.nn.Linear:
                PackedLinear.pack(module)
    if model.dtype == torch.bfloat16:
        attention_kernels()  # built now, not in the first request
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(CPU_HALF_ATTENTION)


KEEP_FREED_MEMORY_VARIABLE = "PD_INTEGRATIONS_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve blocks up to 1 GiB from its heap and never to shrink it, once per process, so a
    prefill's large tensors reuse memory already faulted in; the process keeps its peak heap. Off when the
    environment sets `PD_INTEGRATIONS_KEEP_FREED_MEMORY=0`.

    Returns:
        Whether malloc now keeps freed memory: False when turned off or when the C library is not glibc.

    Raises:
        ValueError: the environment variable is set to something other than "0" or "1".
    """
    setting = os.environ.get(KEEP_FREED_MEMORY_VARIABLE, "1").strip()
    if setting not in {"0", "1"}:
        raise ValueError(f"{KEEP_FREED_MEMORY_VARIABLE} must be '0' or '1', got {setting!r}")
    if setting == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    # Setting the mmap threshold also stops glibc from adapting it; the trim threshold keeps the top of the heap.
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t's omp_pause_soft (omp.h)


@functools.cache
def _pause_openmp():
    """libgomp's `omp_pause_resource_all` if this process loaded libgomp (torch's Linux wheels), else None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {fields[5] for line in maps if len(fields := line.split(maxsplit=5)) == 6}
    except OSError:  # no procfs (macOS): nothing to release
        return None
    for path in sorted(p.strip() for p in paths):
        if os.path.basename(path).startswith("libgomp"):
            return getattr(ctypes.CDLL(path), "omp_pause_resource_all", None)
    return None


def release_openmp_threads() -> None:
    """Give the calling thread's OpenMP team back to libgomp; its next parallel region starts a new one.

    While two threads each own a team on a machine with no spare cores, libgomp's workers stop spinning between
    parallel regions and sleep, and each of a decode step's many small regions waits for them to wake: a decode
    step ran about twice as slow in a second thread as in the first. A thread that is done running the model
    for now calls this, so that the one that runs it next owns the only team. A no-op where the OpenMP runtime is
    not libgomp (LLVM's and Intel's pause the whole process, not one thread's team).
    """
    pause = _pause_openmp()
    if pause is not None:
        pause(_OMP_PAUSE_SOFT)


def speed_up_cpu_model(model: torch.nn.Module) -> None:
    """On a CPU model: keep freed memory (`keep_freed_memory`), in bfloat16/float16 `use_cpu_half_kernels`, and
    release the loading thread's OpenMP team (`release_openmp_threads`), since calls may come from other threads."""
    if model.device.type == "cpu":
        keep_freed_memory()
        use_cpu_half_kernels(model)
        release_openmp_threads()


AttentionInterface.register(CPU_HALF_ATTENTION, cpu_half_attention)
# HF's own forward (`model.generate`) builds the masks it builds for SDPA, which this function takes.
AttentionMaskInterface.register(CPU_HALF_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
