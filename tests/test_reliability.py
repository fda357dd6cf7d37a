"""Concurrency and abandoned streams: many threads and tasks over engines that share one runtime get the same
outputs as sequential calls and never deadlock; a stream that is broken off, dropped, cancelled or timed out leaves
the lock free and the next call working."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.langchain import ChatPromptDistill
from pd_integrations.llama_index import PromptDistillLLM

from .test_layout import PASSAGES, QUESTION

CONTEXT = "\n\n".join(PASSAGES[:6])
CONFIGS = {
    "full": PromptDistillConfig(method="full"),
    "promptdistill": PromptDistillConfig(selection_layers=(1,), budgets=(0.25,), context_min_tokens=32),
    "gemfilter": PromptDistillConfig(method="gemfilter", selection_layers=(1,), budgets=(48,), context_min_tokens=32),
}
# Bounded: a deadlock fails the test instead of hanging CI.
DEADLINE_S = 300


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    base = PromptDistillEngine.from_pretrained(tiny_model_dir, CONFIGS["full"], device="cpu", dtype="float32")
    return {name: base.with_config(config) for name, config in CONFIGS.items()}


def requests() -> list[tuple[str, dict]]:
    """32 (engine name, generate arguments) pairs: every method, prompt and message input, question last and
    first, streamed and not."""
    shapes = [
        {"prompt": f"{CONTEXT}\n\nQuestion: {QUESTION}\nAnswer:"},
        {"messages": [{"role": "user", "content": f"Question: {QUESTION}\nContext: {CONTEXT}\nAnswer:"}]},
        {"messages": [{"role": "system", "content": CONTEXT}, {"role": "user", "content": QUESTION}]},
        {"prompt": f"Passage {QUESTION}", "max_new_tokens": 3},
    ]
    return [(name, {"max_new_tokens": 6, **shapes[k % 4]}) for k, name in enumerate(list(CONFIGS) * 11) if k < 32]


def run(engine: PromptDistillEngine, arguments: dict, streamed: bool) -> tuple[str, list[int]]:
    if streamed:
        stream = engine.stream(**arguments)
        text = "".join(stream)
        return text, stream.result.output_token_ids
    result = engine.generate(**arguments)
    return result.text, result.output_token_ids


def test_32_threads_equal_sequential_calls(engines):
    work = requests()
    sequential = [run(engines[name], arguments, streamed=False) for name, arguments in work]
    with ThreadPoolExecutor(max_workers=32) as pool:
        futures = [pool.submit(run, engines[name], arguments, k % 2 == 0) for k, (name, arguments) in enumerate(work)]
        concurrent = [future.result(timeout=DEADLINE_S) for future in futures]
    assert concurrent == sequential
    assert not engines["full"].runtime.lock.locked()


async def test_32_async_adapter_tasks_equal_sequential_calls(tiny_model_dir):
    settings = {
        "model": tiny_model_dir,
        "selection_layers": (1,),
        "budgets": 0.25,
        "context_min_tokens": 32,
        "device": "cpu",
        "dtype": "float32",
    }
    chat = ChatPromptDistill(**settings, max_tokens=5)
    llm = PromptDistillLLM(**settings, max_new_tokens=5)
    prompts = [f"{CONTEXT}\n\nQuestion {k}: {QUESTION}" for k in range(16)]
    sequential = [chat.invoke(p).content for p in prompts] + [llm.complete(p).text for p in prompts]

    async def streamed_chat(prompt: str) -> str:
        return "".join([chunk.content async for chunk in chat.astream(prompt)])

    async def streamed_llm(prompt: str) -> str:
        return "".join([chunk.delta async for chunk in await llm.astream_complete(prompt)])

    tasks = [chat.ainvoke(p) if k % 2 else streamed_chat(p) for k, p in enumerate(prompts)]
    tasks += [llm.acomplete(p) if k % 2 else streamed_llm(p) for k, p in enumerate(prompts)]
    results = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S)
    texts = [r if isinstance(r, str) else getattr(r, "content", None) or getattr(r, "text", "") for r in results]
    assert texts == sequential


def wait_idle(engine: PromptDistillEngine) -> None:
    """Wait (bounded) until the scheduler's worker has let abandoned rows go and exited."""
    deadline = time.monotonic() + 30
    while not engine.scheduler.is_idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.is_idle() and not engine.runtime.lock.locked()


def assert_engine_free(engine: PromptDistillEngine) -> None:
    """The scheduler lets go of abandoned rows and the lock, and a new call works."""
    wait_idle(engine)
    assert engine.generate("Hello there", max_new_tokens=2).output_tokens >= 1


def test_a_stream_broken_off_or_dropped_leaves_the_engine_free(engines):
    engine = engines["promptdistill"]
    arguments = {"prompt": f"{CONTEXT}\n\nQuestion: {QUESTION}", "max_new_tokens": 12}
    expected = engine.generate(**arguments).text
    for delta in engine.stream(**arguments):
        assert delta
        break
    assert_engine_free(engine)
    stream = iter(engine.stream(**arguments))
    next(stream)
    del stream
    gc.collect()
    assert_engine_free(engine)
    assert engine.generate(**arguments).text == expected  # no per-call state leaked into the next call


async def test_a_cancelled_astream_leaves_the_engine_free(tiny_model_dir, engines):
    llm = PromptDistillLLM(model=tiny_model_dir, max_new_tokens=40, device="cpu", dtype="float32")
    started = asyncio.Event()

    async def consume():
        async for _ in await llm.astream_complete(f"{CONTEXT}\n\nQuestion: {QUESTION}"):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), DEADLINE_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(assert_engine_free, engines["full"])


def test_a_langchain_timeout_leaves_the_engine_free(tiny_model_dir, engines):
    chat = ChatPromptDistill(model=tiny_model_dir, max_tokens=200, timeout=1e-6, device="cpu", dtype="float32")
    with pytest.raises(TimeoutError, match="timeout"):
        chat.invoke(f"{CONTEXT}\n\nQuestion: {QUESTION}")
    assert_engine_free(engines["full"])
    assert ChatPromptDistill(model=tiny_model_dir, max_tokens=2, device="cpu", dtype="float32").invoke("Hi").content


def rss_bytes() -> int:
    """Resident memory after a collection, with freed heap returned to the system."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def soak_call(engines: dict, k: int) -> None:
    """Call k of the soak: short, ~2k- and ~4k-token prompts; full attention and PromptDistill; generate, stream
    and a batch of two."""
    words = {0: 20, 1: 1300, 2: 20, 3: 2600}[k % 4]
    prompt = " ".join(" ".join(PASSAGES * 40).split()[:words]) + f"\n\nQuestion {k}: {QUESTION}"
    engine = engines["full" if k % 2 else "promptdistill"]
    mode = k % 3
    if mode == 0:
        assert engine.generate(prompt, max_new_tokens=4).output_tokens >= 1
    elif mode == 1:
        assert "".join(engine.stream(prompt, max_new_tokens=4)) is not None
    else:
        assert len(engine.generate_batch([prompt, f"Short question {k}?"], max_new_tokens=4)) == 2


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc (Linux)")
def test_soak_memory_and_threads_stay_flat(engines):
    """200 calls of mixed lengths, methods and kinds: after the first 20, resident memory grows by at most 5% and
    the thread count not at all."""
    for k in range(20):
        soak_call(engines, k)
    wait_idle(engines["full"])
    memory, threads = rss_bytes(), threading.active_count()
    for k in range(20, 200):
        soak_call(engines, k)
    wait_idle(engines["full"])
    assert threading.active_count() == threads
    assert rss_bytes() <= memory * 1.05, (rss_bytes(), memory)


def test_limits_refuse_requests_before_model_work(engines):
    engine = engines["full"]
    settings = engine.scheduler.settings
    forwards = sum(engine.scheduler.sequences_per_forward.values())
    try:
        engine.configure_scheduler(max_prompt_tokens=16)
        with pytest.raises(ValueError, match="over max_prompt_tokens=16"):
            engine.generate(f"{CONTEXT}\n\nQuestion: {QUESTION}")
        with pytest.raises(ValueError, match=r"row 1: .*max_prompt_tokens"):
            engine.generate_batch(["Hi", f"{CONTEXT}\n\nQuestion: {QUESTION}"])
        engine.configure_scheduler(max_prompt_tokens=None, max_kv_bytes=2**20)
        with pytest.raises(ValueError, match="max_kv_bytes=1048576.*lower max_new_tokens"):
            engine.generate("Hi", max_new_tokens=4000)
        assert sum(engine.scheduler.sequences_per_forward.values()) == forwards  # refused before any model work
        with pytest.raises(ValueError, match="max_kv_bytes must be None or an int >= 1"):
            engine.configure_scheduler(max_kv_bytes=0)
        with pytest.raises(TypeError, match="unknown scheduler settings.*max_batch_size"):
            engine.configure_scheduler(max_batch=3)
    finally:
        engine.scheduler.settings = settings


def test_a_kv_limit_queues_requests_instead_of_failing(engines):
    """With room for one request's cache, concurrent requests run one at a time, and all succeed."""
    engine = engines["full"]
    settings = engine.scheduler.settings
    prompt = f"{CONTEXT}\n\nQuestion: {QUESTION}"
    expected = engine.generate(prompt, max_new_tokens=6).output_token_ids
    try:
        engine.configure_scheduler(max_kv_bytes=engine.scheduler._kv_bytes_per_token * 600, batch_wait=0.05)
        engine.scheduler.sequences_per_forward.clear()
        with ThreadPoolExecutor(max_workers=4) as pool:
            outputs = list(
                pool.map(
                    lambda _: engine.generate(prompt, max_new_tokens=6).output_token_ids, range(4), timeout=DEADLINE_S
                )
            )
    finally:
        engine.scheduler.settings = settings
    assert outputs == [expected] * 4
    assert max(rows for _, rows in engine.scheduler.sequences_per_forward) == 1
