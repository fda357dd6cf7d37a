"""Batched and continuous generation: rows prefilled and decoded together, each selecting on its own, equal the
same rows run alone; concurrent callers are batched without asking; bad rows fail before any model work."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.decode import DecodeBatch
from pd_integrations.inputs import PromptInput
from pd_integrations.langchain import ChatPromptDistill, PromptDistillLLM
from pd_integrations.llama_index import PromptDistillLLM as LlamaIndexLLM
from pd_integrations.methods import method_for

from .conftest import TINY_CONFIGS, tiny_model
from .test_cpu_kernels import in_new_thread, needs_openmp_team, os_thread_ids, start_openmp_team, still_running
from .test_layout import PASSAGES, QUESTION

SELECTION = dict(
    protect_head=2, tail_tokens=4, aggregation="softmax_mean", pool_kernel=1, span="sentence", context_min_tokens=32
)
CONFIGS = {
    "full": PromptDistillConfig(method="full"),
    "gemfilter": PromptDistillConfig(method="gemfilter", selection_layers=(1,), budgets=(0.3,), **SELECTION),
    "single-stage": PromptDistillConfig(selection_layers=(1,), budgets=(0.3,), **SELECTION),
    "two-stage": PromptDistillConfig(selection_layers=(1, 2), budgets=(0.5, 0.25), **SELECTION),
    "two-stage, no truncation": PromptDistillConfig(
        selection_layers=(1, 2), budgets=(0.5, 0.25), cache_truncation=False, **SELECTION
    ),
}
CONTEXT = "\n\n".join(PASSAGES[:5])  # ~400 tokens: the tiny models' window is 512
DOCUMENTS = PASSAGES[:3]
# Rows of very different lengths and shapes: a short prompt with nothing to prune, a long question-first prompt
# (selection seeded by a probe), a question-last prompt, and one that names its documents.
ROWS = [
    dict(prompt=f"Answer briefly. {QUESTION}", query=None, documents=None),
    dict(prompt=f"Question: {QUESTION}\nContext:\n{CONTEXT}\nAnswer:", query=QUESTION, documents=None),
    dict(prompt=f"{CONTEXT}\n\nQuestion: {QUESTION}\nAnswer:", query=None, documents=None),
    dict(
        prompt="Context:\n" + "\n\n".join(DOCUMENTS) + f"\n\nQuestion: {QUESTION}", query=QUESTION, documents=DOCUMENTS
    ),
]


def batch_arguments(rows: list[dict]) -> dict:
    return {
        "prompts": [r["prompt"] for r in rows],
        "queries": [r["query"] for r in rows],
        "documents": [r["documents"] for r in rows],
    }


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_rows_equal_rows_alone(family, name, tokenizer):
    engine = PromptDistillEngine(tiny_model(family), tokenizer, CONFIGS[name])
    alone = [engine.generate(**row, max_new_tokens=8) for row in ROWS]
    batched = engine.generate_batch(**batch_arguments(ROWS), max_new_tokens=8)
    assert [r.output_token_ids for r in batched] == [r.output_token_ids for r in alone]
    assert [r.kept_token_indices for r in batched] == [r.kept_token_indices for r in alone]
    assert [r.decode_start_position for r in batched] == [r.decode_start_position for r in alone]
    assert len({r.prompt_tokens for r in batched}) == len(ROWS)  # the rows really differ in length
    if name != "full":
        assert len({r.kept_tokens for r in batched}) > 1 and batched[1].kept_tokens < batched[1].prompt_tokens
    # The same rows' next-token logits from one batched prefill and from prefills of their own.
    prepared = [engine._prepare(PromptInput(r["prompt"], query=r["query"], documents=r["documents"])) for r in ROWS]
    ids = [engine._ids(*p) for p in prepared]
    layouts = [layout for _, layout in prepared]
    with torch.inference_mode():
        together = method_for(engine.config, layouts).prefill(engine.runtime, ids, layouts).logits
        apart = [
            method_for(engine.config, [layout]).prefill(engine.runtime, [row], [layout]).logits[0]
            for row, layout in zip(ids, layouts)
        ]
    torch.testing.assert_close(together, torch.stack(apart), atol=1e-4, rtol=0)


def test_batched_rows_of_the_default_model_equal_rows_alone(default_engine):
    """40- and ~900-token rows of the real model: a question-first row beside a question-last one."""
    engine = default_engine.with_config(PromptDistillConfig(selection_layers=(8,), budgets=(0.25,), span="sentence"))
    rows = [
        dict(prompt=f"Answer in one word. {QUESTION}", query=None, documents=None),
        dict(
            prompt=f"Question: {QUESTION}\nContext:\n" + "\n\n".join(PASSAGES) + "\nAnswer:",
            query=QUESTION,
            documents=None,
        ),
        ROWS[2],
    ]
    alone = [engine.generate(**row, max_new_tokens=12) for row in rows]
    batched = engine.generate_batch(**batch_arguments(rows), max_new_tokens=12)
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.prompt_tokens < 60 for r in batched] == [True, False, False] and batched[1].prompt_tokens > 800
    assert batched[1].kept_tokens < batched[1].prompt_tokens


def test_stream_batch_yields_every_rows_text(tokenizer):
    engine = PromptDistillEngine(tiny_model("llama"), tokenizer, CONFIGS["single-stage"])
    stream = engine.stream_batch(**batch_arguments(ROWS), max_new_tokens=6, stop=["zzz"])
    texts = [""] * len(ROWS)
    for row, delta in stream:
        texts[row] += delta
    assert texts == [r.text for r in stream.result]
    assert [r.finish_reason for r in stream.result] == ["length"] * len(ROWS)


def test_concurrent_threads_are_batched_and_equal_sequential_calls(tokenizer):
    engine = PromptDistillEngine(tiny_model("qwen2"), tokenizer, CONFIGS["two-stage"])
    engine.configure_scheduler(batch_wait=0.05)
    work = [ROWS[k % len(ROWS)] for k in range(16)]
    sequential = [engine.generate(**row, max_new_tokens=10).output_token_ids for row in work]
    engine.scheduler.sequences_per_forward.clear()
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(
            pool.map(lambda row: engine.generate(**row, max_new_tokens=10).output_token_ids, work, timeout=120)
        )
    assert concurrent == sequential
    counts = engine.scheduler.sequences_per_forward
    assert max(rows for kind, rows in counts if kind == "decode") > 1
    assert max(rows for kind, rows in counts if kind == "prefill") > 1
    assert sum(rows * n for (kind, rows), n in counts.items() if kind == "prefill") == 16


def test_a_row_joining_a_running_decode_gets_its_own_tokens(tokenizer):
    engine = PromptDistillEngine(tiny_model("gemma3_text"), tokenizer, CONFIGS["single-stage"])
    first, second = ROWS[1], ROWS[2]
    alone = [engine.generate(**row, max_new_tokens=n).output_token_ids for row, n in ((first, 40), (second, 8))]
    engine.scheduler.sequences_per_forward.clear()
    stream = engine.stream(**first, max_new_tokens=40)
    deltas = iter(stream)
    next(deltas)  # the first row is decoding
    joined = {}
    thread = threading.Thread(target=lambda: joined.update(r=engine.generate(**second, max_new_tokens=8)))
    thread.start()
    for _ in deltas:
        pass
    thread.join(60)
    assert [stream.result.output_token_ids, joined["r"].output_token_ids] == alone
    counts = engine.scheduler.sequences_per_forward
    assert counts["prefill", 1] == 2 and counts["decode", 2] > 0  # prefilled apart, decoded together


def test_batch_limits_split_prefills(tokenizer):
    engine = PromptDistillEngine(tiny_model("llama"), tokenizer, CONFIGS["full"])
    engine.configure_scheduler(max_batch_size=2)
    results = engine.generate_batch(prompts=[f"Row {k}: {QUESTION}" for k in range(5)], max_new_tokens=4)
    assert len(results) == 5
    counts = engine.scheduler.sequences_per_forward
    assert max(rows for _, rows in counts) == 2
    with pytest.raises(ValueError, match="max_batch_tokens"):
        engine.configure_scheduler(max_batch_tokens=0)
    with pytest.raises(ValueError, match="batch_wait"):
        engine.configure_scheduler(batch_wait=5)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(prompts=[]), "prompts must be a non-empty list"),
        (dict(prompts="one string"), "prompts must be a non-empty list"),
        (dict(prompts=["a", "b"], queries=["a"]), r"queries must be None or a list with one entry per row"),
        (dict(prompts=["a"], documents=[["x"], ["y"]]), r"documents must be None or a list"),
        (dict(prompts=["a"], messages=[[{"role": "user", "content": "a"}]]), "exactly one of prompts, messages"),
        (dict(), "exactly one of"),
        (dict(prompts=["fine", "x " * 600]), r"row 1: .*context window"),
        (dict(prompts=["fine", "Context: abc"], documents=[None, ["not there"]]), r"row 1: .*document"),
        (dict(prompts=["fine"], queries=[3]), r"row 0: .*query"),
        (dict(prompts=["fine"], max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_batches_fail_before_model_work(tokenizer, arguments, message):
    engine = PromptDistillEngine(tiny_model("llama"), tokenizer, CONFIGS["full"])
    with pytest.raises((ValueError, TypeError), match=message):
        engine.generate_batch(**arguments)
    assert not engine.scheduler.sequences_per_forward


def test_a_failing_caller_never_fails_the_others(tokenizer):
    engine = PromptDistillEngine(tiny_model("llama"), tokenizer, CONFIGS["single-stage"])
    engine.configure_scheduler(batch_wait=0.05)
    good = ROWS[2]
    expected = engine.generate(**good, max_new_tokens=6).output_token_ids

    def call(k: int):
        if k % 4 == 3:
            with pytest.raises(ValueError, match="context window"):
                engine.generate("x " * 600)
            return None
        return engine.generate(**good, max_new_tokens=6).output_token_ids

    with ThreadPoolExecutor(max_workers=8) as pool:
        outputs = list(pool.map(call, range(8), timeout=120))
    assert [o for o in outputs if o is not None] == [expected] * 6


def test_adapter_batches_share_forwards(tiny_model_dir):
    """LangChain `batch` (both classes) and `abatch`, and concurrent LlamaIndex `acomplete`, go through the
    scheduler: equal to sequential calls, with several rows per decode step, and per-input metadata."""
    settings = dict(
        model=tiny_model_dir, selection_layers=(1,), budgets=0.25, context_min_tokens=32, device="cpu", dtype="float32"
    )
    prompts = [f"{CONTEXT}\n\nQuestion {k}: {QUESTION}" for k in range(16)]
    scheduler = PromptDistillEngine.from_pretrained(tiny_model_dir, device="cpu", dtype="float32").scheduler
    chat, llm = ChatPromptDistill(max_tokens=6, **settings), PromptDistillLLM(max_tokens=6, **settings)
    index_llm = LlamaIndexLLM(max_new_tokens=6, **settings)
    texts = [llm.invoke(p) for p in prompts]
    chat_texts = [chat.invoke(p).content for p in prompts]
    index_texts = [index_llm.complete(p).text for p in prompts]
    for run, sequential in (
        (lambda: llm.batch(prompts), texts),
        (lambda: [m.content for m in chat.batch(prompts)], chat_texts),
        (lambda: [m.content for m in asyncio.run(chat.abatch(prompts))], chat_texts),
        (lambda: asyncio.run(_gather(index_llm, prompts)), index_texts),
    ):
        scheduler.sequences_per_forward.clear()
        assert run() == sequential
        assert max(rows for kind, rows in scheduler.sequences_per_forward if kind == "decode") > 1
    results = llm.generate(prompts[:2]).generations
    assert [r[0].generation_info["promptdistill"]["prompt_tokens"] for r in results] == [
        len(llm.get_token_ids(p)) for p in prompts[:2]
    ]


async def _gather(llm, prompts: list[str]) -> list[str]:
    return [r.text for r in await asyncio.gather(*(llm.acomplete(p) for p in prompts))]


@pytest.mark.parametrize("driver", ["caller", "thread"])
def test_the_driver_setting_says_which_thread_runs_the_forwards(tokenizer, monkeypatch, driver):
    """With "caller", every forward of a call runs in the calling thread and no worker thread starts; with
    "thread", they run in the scheduler's worker. The tokens are the same either way."""
    engine = PromptDistillEngine(tiny_model("llama"), tokenizer, CONFIGS["single-stage"])
    expected = engine.generate(**ROWS[1], max_new_tokens=6).output_token_ids
    engine.configure_scheduler(driver=driver)
    threads = set()
    step = DecodeBatch.step

    def recording_step(self, tokens):
        threads.add(threading.current_thread().name)
        return step(self, tokens)

    monkeypatch.setattr(DecodeBatch, "step", recording_step)
    assert engine.generate(**ROWS[1], max_new_tokens=6).output_token_ids == expected
    assert threads == ({threading.current_thread().name} if driver == "caller" else {"pd-scheduler"})


@needs_openmp_team
@pytest.mark.parametrize("started", ["before the call", "building its result"])
def test_a_call_leaves_its_thread_without_an_openmp_team(tokenizer, monkeypatch, started):
    """On CPU, a call gives back the OpenMP team of its thread, whether it came from the caller's own torch work,
    the rounds it ran or building its result, so that the next thread to run the model owns the only team (with
    two, libgomp's workers sleep between parallel regions)."""
    engine = PromptDistillEngine(tiny_model("llama"), tokenizer, CONFIGS["single-stage"])
    engine.generate(**ROWS[1], max_new_tokens=3)  # the tokenizer's own thread pool starts on first use
    if started == "building its result":
        result = PromptDistillEngine._result
        monkeypatch.setattr(PromptDistillEngine, "_result", lambda *a: start_openmp_team() or result(*a))

    def work():
        before = os_thread_ids()
        if started == "before the call":
            start_openmp_team()
        engine.generate(**ROWS[1], max_new_tokens=3)
        return still_running(os_thread_ids() - before)

    assert not in_new_thread(work)


def test_a_bad_driver_is_refused(tokenizer):
    engine = PromptDistillEngine(tiny_model("llama"), tokenizer, CONFIGS["full"])
    with pytest.raises(ValueError, match="driver must be one of 'caller', 'thread', got 'process'"):
        engine.configure_scheduler(driver="process")


def test_a_stopped_scheduler_tells_a_caller_that_runs_the_rounds(tokenizer):
    """`stop()` (at interpreter exit) while a call drives its own rounds: the call raises instead of waiting for
    tokens that never come."""
    engine = PromptDistillEngine(tiny_model("llama"), tokenizer, CONFIGS["full"])
    deltas = iter(engine.stream(**ROWS[0], max_new_tokens=200))
    next(deltas)
    engine.scheduler.stop()
    raised = []

    def consume():
        try:
            for _ in deltas:
                pass
        except RuntimeError as error:
            raised.append(str(error))

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(30)
    assert raised == ["the scheduler has stopped: the interpreter is exiting"]
