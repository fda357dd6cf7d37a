"""pd-serve as OpenAI documents its API, through the official `openai` client: `n`, list prompts, `/v1/models/{id}`,
`system_fingerprint`, OpenAI's range checks, repetition penalties and logit bias, tools together with
`response_format`, every field the server does not implement refused with a 400 naming it, and every
`PromptDistillConfig` field settable per request, a bad value a 400 naming it and what it allows.

The server runs a tiny random model with full attention (a fraction of a second per request): greedy, it repeats
itself, which is what the penalties must change."""

from __future__ import annotations

import dataclasses
import json
import re

import httpx
import openai
import pytest
import torch

from pd_integrations import PromptDistillConfig
from pd_integrations.inputs import SAMPLING_SETTINGS
from pd_integrations.serve.openai_schema import SAMPLING_FIELDS, ChatCompletionRequest

from .test_arguments import SHORTCUTS
from .test_serve_tools import ALARM, MODEL, TICKET, WAKE, check_alarm


@pytest.fixture(scope="module")
def client(tiny_url):
    return openai.OpenAI(base_url=f"{tiny_url}/v1", api_key="unused", max_retries=0)


def chat(client, **fields):
    return client.chat.completions.create(**{"model": MODEL, "messages": WAKE, "max_tokens": 16, **fields})


def test_n_returns_that_many_choices_each_a_batch_row(client, tiny_engine):
    greedy = chat(client, n=2)
    assert [choice.index for choice in greedy.choices] == [0, 1]
    alone = tiny_engine.generate(messages=WAKE, max_new_tokens=16).text
    assert [choice.message.content for choice in greedy.choices] == [alone, alone]
    assert greedy.usage.completion_tokens == 2 * chat(client).usage.completion_tokens
    sampled = chat(client, n=3, temperature=1.0, max_tokens=12)
    assert len({choice.message.content for choice in sampled.choices}) > 1  # each row samples on its own


def test_streamed_choices_are_numbered_and_each_finishes(client):
    chunks = list(chat(client, n=2, stream=True, stream_options={"include_usage": True}))
    texts, finished = {0: "", 1: ""}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    whole = chat(client, n=2)
    assert texts == {c.index: c.message.content for c in whole.choices} and set(finished) == {0, 1}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(chunk.system_fingerprint == whole.system_fingerprint for chunk in chunks)


def test_a_list_of_prompts_gets_n_choices_each_in_openais_order(client, tiny_engine):
    prompts = ["The harbour at dawn", "Seven ships"]
    response = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=8)
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    expected = [tiny_engine.generate(prompt, max_new_tokens=8).text for prompt in prompts]
    assert [choice.text for choice in response.choices] == [expected[0]] * 2 + [expected[1]] * 2
    prompt_tokens = sum(len(tiny_engine.tokenizer(p)["input_ids"]) for p in prompts)
    assert response.usage.prompt_tokens == prompt_tokens  # each prompt counted once, whatever n


def test_models_retrieve_returns_the_served_model_and_404s_others(client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as refused:
        client.models.retrieve("gpt-4o")
    assert refused.value.body["code"] == "model_not_found"


def test_every_response_carries_a_stable_system_fingerprint(client):
    fingerprints = {
        chat(client).system_fingerprint,
        chat(client, max_tokens=4).system_fingerprint,
        client.completions.create(model=MODEL, prompt="x", max_tokens=2).system_fingerprint,
    }
    assert len(fingerprints) == 1 and next(iter(fingerprints)).startswith("fp_")


def test_frequency_and_presence_penalties_change_a_repetitive_output(client):
    plain = chat(client, max_tokens=24).choices[0].message.content
    for penalty in ({"frequency_penalty": 1.0}, {"presence_penalty": 1.0}, {"extra_body": {"repetition_penalty": 1.5}}):
        assert chat(client, max_tokens=24, **penalty).choices[0].message.content != plain, penalty


def test_every_sampling_setting_is_a_request_field():
    assert {*SAMPLING_FIELDS.values(), "logprobs"} == set(SAMPLING_SETTINGS)  # logprobs: OpenAI's own shape


def test_top_k_one_is_greedy_and_minus_one_is_off(client):
    greedy = chat(client, max_tokens=8).choices[0].message.content
    hot = {"temperature": 2.0, "seed": 3, "max_tokens": 8}
    assert chat(client, **hot, extra_body={"top_k": 1}).choices[0].message.content == greedy
    sampled = chat(client, **hot).choices[0].message.content
    assert sampled != greedy  # without top_k, sampling this hot leaves the greedy path
    assert chat(client, **hot, extra_body={"top_k": -1}).choices[0].message.content == sampled  # vLLM's off


def test_logit_bias_forces_a_token(client, tiny_engine):
    token = tiny_engine.tokenizer(" harbour", add_special_tokens=False)["input_ids"][0]
    text = chat(client, max_tokens=3, logit_bias={str(token): 100}).choices[0].message.content
    assert text == tiny_engine.tokenizer.decode([token] * 3)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": 5}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"logit_bias": {"5": 150}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": True, "stream": True}, "logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"extra_body": {"functions": [{"name": "f"}]}}, "functions"),
        ({"extra_body": {"top_k": -2}}, "top_k"),
        # This package's names where OpenAI's API has none: refused, not ignored as other unknown fields are.
        ({"extra_body": {"max_new_tokens": 3}}, "max_new_tokens"),
        ({"extra_body": {"budgets": [8]}}, "budgets"),
        ({"extra_body": {"documents": ["Wake me"]}}, "documents"),
    ],
)
def test_out_of_range_and_unimplemented_fields_are_a_400_naming_them(client, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, **fields)
    assert refused.value.body["param"] == param, refused.value.body


def test_best_of_and_echo_in_completions_are_refused_by_name(client):
    for fields, param in (({"best_of": 2}, "best_of"), ({"echo": True}, "echo")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, **fields)
        assert refused.value.body["param"] == param


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_without_a_json_content_type_gets_the_openai_error_shape(tiny_url, content_type):
    body = json.dumps({"model": MODEL, "messages": WAKE}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = httpx.post(f"{tiny_url}/v1/chat/completions", content=body, headers=headers, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_content_type" and "application/json" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_tools_with_response_format_answer_with_a_call_or_the_formatted_reply(client):
    schema = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": TICKET}}
    for seed in range(4):
        response = chat(client, tools=[ALARM], response_format=schema, max_tokens=120, temperature=1.0, seed=seed)
        message = response.choices[0].message
        if message.tool_calls:
            check_alarm(message.tool_calls[0].function.arguments)
            assert response.choices[0].finish_reason == "tool_calls"
        else:
            ticket = json.loads(message.content)
            assert set(ticket) == {"priority", "code", "urgent"}
    forced = chat(client, tools=[ALARM], tool_choice="required", response_format=schema, max_tokens=120)
    check_alarm(forced.choices[0].message.tool_calls[0].function.arguments)


def test_chat_logprobs_report_each_token_and_its_top_alternatives(client, tiny_engine):
    response = chat(client, logprobs=True, top_logprobs=3, max_tokens=6)
    content = response.choices[0].logprobs.content
    result = tiny_engine.generate(messages=WAKE, max_new_tokens=6, logprobs=3)
    assert "".join(entry.token for entry in content) == response.choices[0].message.content == result.text
    for entry, expected in zip(content, result.token_logprobs):
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(expected.logprob)
        assert entry.top_logprobs[0].logprob >= entry.logprob  # greedy picks the top token, others rank below
        assert entry.bytes == list(entry.token.encode())
    assert chat(client, logprobs=True, max_tokens=2).choices[0].logprobs.content[0].top_logprobs == []
    assert chat(client, max_tokens=2).choices[0].logprobs is None


def test_completion_logprobs_use_the_completions_shape(client):
    choice = client.completions.create(model=MODEL, prompt="The harbour", max_tokens=5, logprobs=2).choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.token_logprobs) == len(logprobs.tokens)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]


def test_logprobs_are_exactly_the_models_log_softmax(tiny_engine):
    result = tiny_engine.generate("The harbour", max_new_tokens=3, logprobs=2)
    prefill = tiny_engine.prefill("The harbour")
    logprobs = torch.log_softmax(prefill.logits[0].float(), -1)
    first = result.token_logprobs[0]
    assert first.token == result.output_token_ids[0] and first.logprob == pytest.approx(float(logprobs[first.token]))
    assert [token for token, _ in first.top] == logprobs.topk(2).indices.tolist()


# ---------------------------------------------------------------- PromptDistillConfig fields per request

# Every `PromptDistillConfig` field, each set to a value that fits the tiny model (4 layers, 4 heads), mostly
# other than its default.
EVERY_CONFIG_FIELD = {
    "method": "promptdistill",
    "selection_layers": [1],
    "budgets": [0.5],
    "pool_kernel": 3,
    "cache_truncation": "after_first_stage",
    "query_source": "last_token",
    "tail_tokens": 8,
    "protect_head": 2,
    "aggregation": "softmax_max",
    "span": "sentence",
    "chunk_size": 16,
    "heads": [[0, 1]],
    "unit_score": "topk_mean",
    "unit_topk": 4,
    "detrend_window": 8,
    "protect_recent": 8,
    "protect_structure": True,
    "max_probe_tokens": 64,
    "context_min_tokens": 32,
}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(PromptDistillConfig)])
def test_every_config_field_is_a_per_request_setting(field):
    assert field in EVERY_CONFIG_FIELD, f"add a value for {field} to EVERY_CONFIG_FIELD"
    value = EVERY_CONFIG_FIELD[field]
    request = ChatCompletionRequest(model=MODEL, messages=WAKE, promptdistill={field: value})
    assert request.promptdistill.config() == PromptDistillConfig(**{field: value})


@pytest.mark.parametrize("field, value, stored, bad, message", SHORTCUTS, ids=[f"{c[0]}={c[1]!r}" for c in SHORTCUTS])
def test_config_fields_are_checked_as_the_config_checks_them(field, value, stored, bad, message):
    request = ChatCompletionRequest(model=MODEL, messages=WAKE, promptdistill={field: value})
    assert getattr(request.promptdistill.config(), field) == stored
    with pytest.raises(ValueError, match=re.escape(message)):
        ChatCompletionRequest(model=MODEL, messages=WAKE, promptdistill={field: bad})


def test_every_config_field_of_a_request_reaches_the_engine(client, tiny_engine, monkeypatch):
    configs, with_config = [], tiny_engine.with_config
    monkeypatch.setattr(tiny_engine, "with_config", lambda config: configs.append(config) or with_config(config))
    response = chat(client, max_tokens=2, extra_body={"promptdistill": EVERY_CONFIG_FIELD})
    assert configs == [PromptDistillConfig(**EVERY_CONFIG_FIELD)]
    assert response.promptdistill["method"] == "promptdistill" and response.promptdistill["selection_layers"] == [1]
    assert chat(client, max_tokens=2).promptdistill["method"] == "full" and len(configs) == 1  # unset: the server's


@pytest.mark.parametrize("field, bad, message", [(c[0], c[3], c[4]) for c in SHORTCUTS], ids=[c[0] for c in SHORTCUTS])
def test_a_bad_config_field_is_a_400_naming_it_and_its_allowed_values(tiny_url, field, bad, message):
    body = {"model": MODEL, "messages": WAKE, "promptdistill": {field: bad}}
    response = httpx.post(f"{tiny_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (f"promptdistill.{field}", "invalid_value")
    assert message in error["message"]


def test_config_fields_that_do_not_go_together_are_a_400_naming_one(tiny_url):
    body = {"model": MODEL, "messages": WAKE, "promptdistill": {"selection_layers": [1, 2], "budgets": [8]}}
    response = httpx.post(f"{tiny_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "promptdistill.selection_layers" and "one entry per stage" in error["message"]
