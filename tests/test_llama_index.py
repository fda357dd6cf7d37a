"""`PromptDistillLLM` as a LlamaIndex LLM: settings, rendering, responses, streaming, async, the query channel and
token counting. Prompts are short and outputs a few tokens, so each call takes well under a second on CPU."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.prompts import PromptTemplate
from llama_index.core.prompts.default_prompt_selectors import DEFAULT_TEXT_QA_PROMPT_SEL
from llama_index.core.prompts.default_prompts import DEFAULT_REFINE_PROMPT
from llama_index.core.schema import NodeWithScore, TextNode

from pd_integrations import ModelNotAvailableError, PromptDistillConfig, PromptDistillEngine
from pd_integrations.inputs import SAMPLING_SETTINGS, call_inputs
from pd_integrations.llama_index import PromptDistillLLM
from pd_integrations.probes import needle_probe

PROMPT = "What is the capital of France? Answer in one word."
CONTEXT = "The secret pass code for the vault is 48213. The vault is in the basement."
QUESTION = "What is the secret pass code for the vault?"
STATS_KEYS = {
    "prompt_tokens",
    "kept_tokens",
    "kept_ratio",
    "prefill_seconds",
    "selection_layers",
    "kept_char_spans",
    "method",
    "prompt_text",
    "context_source",
    "protected_tokens",
    "prunable_tokens",
    "kept_prunable_tokens",
    "protected_char_spans",
    "query_free",
}


@pytest.fixture(scope="module")
def llm():
    return PromptDistillLLM(max_new_tokens=8)


def user_turn(llm: PromptDistillLLM, *messages: dict) -> str:
    """The prompt as the model's chat template renders `messages`, generation prompt included."""
    return llm.engine.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def usage(response) -> tuple[int, int]:
    return response.raw["usage"]["prompt_tokens"], response.raw["usage"]["completion_tokens"]


def kept_of(response) -> tuple[int, int]:
    stats = response.additional_kwargs["promptdistill"]
    return stats["kept_tokens"], stats["prompt_tokens"]


# ---------------------------------------------------------------- settings


def test_construction_loads_no_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llm = PromptDistillLLM(model="pd-integrations-tests/no-such-model")
    assert llm.model == "pd-integrations-tests/no-such-model"
    with pytest.raises(ModelNotAvailableError):
        llm.complete(PROMPT)


@pytest.mark.parametrize(
    "settings",
    [
        {"budgets": (0,)},
        {"method": "magic"},
        {"selection_layers": (5, 3)},
        {"quantization": "3bit"},
        {"dtype": "int8"},
        {"device": "tpu"},
    ],
)
def test_invalid_settings_raise_at_construction(settings):
    with pytest.raises(ValueError):
        PromptDistillLLM(**settings)


def test_shortcuts_override_config():
    llm = PromptDistillLLM(config=PromptDistillConfig(budgets=(512,), chunk_size=32), budgets=(64,), method="gemfilter")
    assert llm.distill_config() == PromptDistillConfig(method="gemfilter", budgets=(64,), chunk_size=32)


def test_metadata_reports_the_raw_context_window(llm):
    metadata = llm.metadata
    assert metadata.context_window == llm.engine.arch.max_positions == 8192
    assert (metadata.num_output, metadata.model_name, metadata.is_chat_model) == (8, "smollm2-135m-instruct", False)
    assert PromptDistillLLM(context_window=2048, is_chat_model=True).metadata.context_window == 2048


# ---------------------------------------------------------------- completion and chat


def test_complete_sends_one_user_turn_and_reports_usage_and_stats(llm):
    response = llm.complete(PROMPT)
    assert "Paris" in response.text
    stats = response.additional_kwargs["promptdistill"]
    assert set(stats) == STATS_KEYS
    assert stats["prompt_text"] == user_turn(llm, {"role": "user", "content": PROMPT})
    assert stats["kept_ratio"] == stats["kept_tokens"] / stats["prompt_tokens"]
    prompt_tokens, completion_tokens = usage(response)
    assert prompt_tokens == stats["prompt_tokens"]
    assert 1 <= completion_tokens <= 8
    assert response.raw["usage"]["total_tokens"] == prompt_tokens + completion_tokens


def test_use_chat_template_false_sends_the_prompt_as_is():
    response = PromptDistillLLM(use_chat_template=False, max_new_tokens=1).complete(PROMPT)
    assert response.additional_kwargs["promptdistill"]["prompt_text"] == PROMPT


def test_completion_to_prompt_and_system_prompt_apply_unless_formatted():
    llm = PromptDistillLLM(system_prompt="Be brief.", completion_to_prompt=lambda p: f"Q: {p}", max_new_tokens=1)
    rendered = llm.complete(PROMPT).additional_kwargs["promptdistill"]["prompt_text"]
    assert rendered == user_turn(llm, {"role": "user", "content": f"Be brief.\n\nQ: {PROMPT}"})
    formatted = llm.complete(PROMPT, formatted=True).additional_kwargs["promptdistill"]["prompt_text"]
    assert formatted == user_turn(llm, {"role": "user", "content": PROMPT})


def test_stream_complete_yields_cumulative_text_and_matches_complete(llm):
    chunks = list(llm.stream_complete(PROMPT))
    deltas = [chunk.delta for chunk in chunks]
    assert [chunk.text for chunk in chunks] == ["".join(deltas[: i + 1]) for i in range(len(chunks))]
    complete = llm.complete(PROMPT)
    assert chunks[-1].text == complete.text
    # Statistics arrive once, on the last chunk, whose delta is empty.
    assert chunks[-1].delta == "" and all(chunk.raw is None for chunk in chunks[:-1])
    assert usage(chunks[-1]) == usage(complete)


def test_chat_renders_messages_with_the_chat_template(llm):
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="You answer in one word."),
        ChatMessage(role=MessageRole.USER, content="What is the capital of Italy?"),
    ]
    response = llm.chat(messages)
    assert response.message.role == MessageRole.ASSISTANT and "Rome" in response.message.content
    assert response.additional_kwargs["promptdistill"]["prompt_text"] == user_turn(
        llm,
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is the capital of Italy?"},
    )
    chunks = list(llm.stream_chat(messages))
    assert "".join(chunk.delta for chunk in chunks) == chunks[-1].message.content == response.message.content
    assert usage(chunks[-1]) == usage(response)


async def test_async_methods_equal_sync(llm):
    messages = [ChatMessage(role=MessageRole.USER, content=PROMPT)]
    expected = llm.complete(PROMPT).text
    assert (await llm.acomplete(PROMPT)).text == expected
    assert "".join([chunk.delta async for chunk in await llm.astream_complete(PROMPT)]) == expected
    assert (await llm.achat(messages)).message.content == expected
    chunks = [chunk async for chunk in await llm.astream_chat(messages)]
    assert chunks[-1].message.content == expected
    assert usage(chunks[-1]) == usage(llm.complete(PROMPT))


def test_stop_strings_cut_the_output_also_when_streaming(llm):
    prompt = "List the days of the week, separated by commas."
    unstopped = llm.complete(prompt, max_new_tokens=16).text
    stop = unstopped.split()[2]
    expected = unstopped[: unstopped.find(stop)]
    stopped = llm.complete(prompt, max_new_tokens=16, stop=[stop])
    assert stopped.text == expected and stopped.raw["finish_reason"] == "stop"
    assert "".join(chunk.delta for chunk in llm.stream_complete(prompt, max_new_tokens=16, stop=stop)) == expected


def test_max_new_tokens_and_sampling_settings_apply(llm):
    response = llm.complete("Write a long story about a dragon.", max_new_tokens=5)
    assert usage(response)[1] == 5 and response.raw["finish_reason"] == "length"
    sampled = [llm.complete(PROMPT, temperature=1.5, seed=seed, max_new_tokens=5).text for seed in range(3)]
    assert llm.complete(PROMPT, temperature=1.5, seed=0, max_new_tokens=5).text == sampled[0]
    assert len(set(sampled)) > 1


def test_unknown_keyword_arguments_raise(llm):
    with pytest.raises(TypeError, match="max_token.*did you mean 'max_tokens'"):
        llm.complete(PROMPT, max_token=3)


def test_every_sampling_setting_but_logprobs_is_a_setting_and_logprobs_raises():
    assert set(PromptDistillLLM.SAMPLING_FIELDS.values()) == set(SAMPLING_SETTINGS) - {"logprobs"}
    llm = PromptDistillLLM(repetition_penalty=1.2, logit_bias={"5": 1})
    assert (llm.repetition_penalty, llm.logit_bias) == (1.2, {5: 1.0})
    with pytest.raises(TypeError, match="unexpected keyword argument 'logprobs'"):
        PromptDistillLLM(logprobs=2)
    with pytest.raises(TypeError, match="call got an unexpected keyword argument 'logprobs'"):
        llm.complete(PROMPT, logprobs=2)


def test_penalties_and_logit_bias_apply_at_construction_and_per_call(tiny_model_dir):
    # The tiny random model repeats itself greedily, which is what the penalties must change.
    llm = PromptDistillLLM(model=tiny_model_dir, method="full", max_new_tokens=24, device="cpu", dtype="float32")
    prompt = "The harbour at dawn"
    plain = llm.complete(prompt).text
    penalised = PromptDistillLLM(
        model=tiny_model_dir, method="full", max_new_tokens=24, frequency_penalty=2.0, device="cpu", dtype="float32"
    )
    assert penalised.complete(prompt).text != plain
    assert llm.complete(prompt, presence_penalty=2.0).text != plain
    assert llm.complete(prompt, repetition_penalty=3.0).text != plain
    token = llm.engine.tokenizer(" harbour", add_special_tokens=False)["input_ids"][0]
    assert llm.complete(prompt, logit_bias={token: 100}, max_new_tokens=3).text == llm.engine.tokenizer.decode(
        [token] * 3
    )
    with pytest.raises(ValueError, match="frequency_penalty"):
        PromptDistillLLM(frequency_penalty=5)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.complete(prompt, logit_bias={10**9: 1.0})


async def test_concurrent_acomplete_equals_sequential():
    # A 16-token budget prunes these ~80-token prompts (short, so the context minimum is lowered), so concurrent
    # calls run selection, not just decoding.
    llm = PromptDistillLLM(
        config=PromptDistillConfig(selection_layers=(14,), budgets=(16,), span="token", context_min_tokens=32),
        max_new_tokens=6,
        dtype="float32",
    )  # concurrent (batched) equals sequential exactly in float32
    probes = [
        needle_probe(llm.engine.tokenizer, 48, depth=i / 15, kind=kind, seed=i)
        for i, kind in enumerate(["passcode", "city", "magic_word", "date"] * 4)
    ]
    prompts = [f"{probe.context}\n\nAnswer briefly. {probe.question}" for probe in probes]
    sequential = [llm.complete(prompt) for prompt in prompts]
    concurrent = await asyncio.gather(*(llm.acomplete(prompt) for prompt in prompts))
    assert [r.text for r in concurrent] == [r.text for r in sequential]
    assert [kept_of(r) for r in concurrent] == [kept_of(r) for r in sequential]
    assert all(kept < prompt for kept, prompt in map(kept_of, sequential))


# ---------------------------------------------------------------- token counting


def test_token_counting_handler_reads_usage():
    counter = TokenCountingHandler()
    llm = PromptDistillLLM(max_new_tokens=8, callback_manager=CallbackManager([counter]))
    completed = llm.complete(PROMPT)
    streamed = list(llm.stream_complete(PROMPT))[-1]
    chatted = llm.chat([ChatMessage(role=MessageRole.USER, content=PROMPT)])
    counted = [(event.prompt_token_count, event.completion_token_count) for event in counter.llm_token_counts]
    assert counted == [usage(completed), usage(streamed), usage(chatted)]
    # The prompt count is the model's, chat template included, not an estimate from LlamaIndex's tokenizer.
    assert counted[0][0] == completed.additional_kwargs["promptdistill"]["prompt_tokens"]


# ---------------------------------------------------------------- the query channel


@pytest.fixture(params=[False, True], ids=["completion", "chat"])
def recorded(request, monkeypatch):
    """(llm, calls): a one-token LLM (completion or chat model) and the `PromptInput` of each engine call."""
    llm = PromptDistillLLM(max_new_tokens=1, is_chat_model=request.param)
    calls = []
    stream = PromptDistillEngine.stream

    def recording_stream(engine, prompt=None, *, sampling=None, **arguments):
        calls.append(call_inputs("stream", prompt, sampling, arguments)[0])
        return stream(engine, prompt, sampling=sampling, **arguments)

    # The adapter builds a (cheap) engine per call over the shared runtime, so the method is patched on the class.
    monkeypatch.setattr(PromptDistillEngine, "stream", recording_stream)
    return llm, calls


def test_predict_seeds_selection_with_query_str(recorded):
    llm, calls = recorded
    llm.predict(DEFAULT_TEXT_QA_PROMPT_SEL, context_str=CONTEXT, query_str=QUESTION)
    # As the refine synthesizer does: the question is bound first. In this (completion) template it precedes the
    # context.
    refine = DEFAULT_REFINE_PROMPT.partial_format(query_str=QUESTION)
    llm.predict(refine, existing_answer="It is 48213.", context_msg=CONTEXT)
    llm.predict(PromptTemplate("Summarize in one line: {text}"), text=CONTEXT)
    llm.complete(PROMPT)
    assert [call.query for call in calls] == [QUESTION, QUESTION, None, None]
    refine_prompt = calls[1].messages[-1]["content"]
    assert refine_prompt.index(QUESTION) < refine_prompt.index(CONTEXT)


async def test_stream_and_async_predict_seed_selection_with_query_str(recorded):
    llm, calls = recorded
    template = DEFAULT_TEXT_QA_PROMPT_SEL.partial_format(query_str=QUESTION)
    assert "".join(llm.stream(template, context_str=CONTEXT)) == llm.predict(template, context_str=CONTEXT)
    await llm.apredict(template, context_str=CONTEXT)
    async for _ in await llm.astream(template, context_str=CONTEXT):
        pass
    assert [call.query for call in calls] == [QUESTION] * 4


async def test_concurrent_predicts_keep_their_own_query(recorded):
    llm, calls = recorded
    questions = [f"What is the secret pass code for vault number {i}?" for i in range(4)]
    await asyncio.gather(
        *(llm.apredict(DEFAULT_TEXT_QA_PROMPT_SEL, context_str=CONTEXT, query_str=question) for question in questions)
    )
    assert sorted(call.query for call in calls) == questions
    assert all(call.query in call.messages[-1]["content"] for call in calls)


def test_pd_query_argument_overrides_the_template_question(recorded):
    llm, calls = recorded
    llm.complete(f"{CONTEXT}\n{QUESTION}", pd_query=QUESTION)
    assert calls[-1].query == QUESTION


def test_pd_documents_reach_the_engine_as_nodes_or_texts(recorded):
    llm, calls = recorded
    sentences = CONTEXT.split(". ")
    nodes = [NodeWithScore(node=TextNode(text=s)) for s in sentences]
    response = llm.complete(f"{CONTEXT}\n{QUESTION}", pd_documents=nodes)
    assert list(calls[-1].documents) == sentences  # the adapter unwraps nodes; the engine takes texts
    assert len(response.additional_kwargs["promptdistill"]["document_retention"]) == len(nodes)
    # The engine reads the nodes' text; one that is not in the prompt is named in the error.
    with pytest.raises(ValueError, match=r"documents\[1\] is empty or does not appear"):
        llm.complete(f"{CONTEXT}\n{QUESTION}", pd_documents=[sentences[0], "not in the prompt"])
