"""Concurrency and abandoned streams: many threads and tasks over engines that share one runtime get the same
outputs as sequential calls and never deadlock; a stream that is broken off, dropped, cancelled or timed out leaves
the lock free and the next call working."""

from __future__ import annotations

import asyncio
import gc
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.langchain import ChatPromptDistill
from pd_integrations.llama_index import PromptDistillLLM

from .test_layout import PASSAGES, QUESTION

CONTEXT = "\n\n".join(PASSAGES[:6])
CONFIGS = {
    "full": PromptDistillConfig(method="full"),
    "promptdistill": PromptDistillConfig(selection_layers=(1,), budgets=(0.25,), context_min_tokens=32),
    "gemfilter": PromptDistillConfig(method="gemfilter", selection_layers=(1,), budgets=(48,),
                                     context_min_tokens=32),
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
    shapes = [{"prompt": f"{CONTEXT}\n\nQuestion: {QUESTION}\nAnswer:"},
              {"messages": [{"role": "user", "content": f"Question: {QUESTION}\nContext: {CONTEXT}\nAnswer:"}]},
              {"messages": [{"role": "system", "content": CONTEXT}, {"role": "user", "content": QUESTION}]},
              {"prompt": f"Passage {QUESTION}", "max_new_tokens": 3}]
    return [(name, {"max_new_tokens": 6, **shapes[k % 4]}) for k, name in
            enumerate(list(CONFIGS) * 11) if k < 32]


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
    chat = ChatPromptDistill(model=tiny_model_dir, selection_layers=(1,), budgets=0.25, context_min_tokens=32,
                             max_tokens=5, device="cpu", dtype="float32")
    llm = PromptDistillLLM(model=tiny_model_dir, selection_layers=(1,), budgets=0.25, context_min_tokens=32,
                           max_new_tokens=5, device="cpu", dtype="float32")
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


def assert_engine_free(engine: PromptDistillEngine) -> None:
    """The lock is released (waiting briefly for a worker thread's step in flight) and a new call works."""
    deadline = time.monotonic() + 30
    while engine.runtime.lock.locked() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.runtime.lock.locked()
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
