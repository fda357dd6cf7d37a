"""Repetition controls and logit bias in the engine's sampler (`pd_integrations.sampling.Penalties`): exact to their
definitions, validated with errors naming the parameter, and changing what the engine generates."""

from __future__ import annotations

import math

import pytest
import torch

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.inputs import SamplingParams
from pd_integrations.sampling import LogitBiasLogitsProcessor, OutputPenaltyLogitsProcessor

from .conftest import tiny_model


@pytest.fixture(scope="module")
def engine(tokenizer):
    return PromptDistillEngine(tiny_model("llama"), tokenizer, PromptDistillConfig(method="full"))


def test_frequency_and_presence_penalties_follow_openais_definition():
    processor = OutputPenaltyLogitsProcessor(frequency_penalty=0.5, presence_penalty=0.25)
    prompt = torch.tensor([[5, 6, 7]])
    logits = torch.randn(1, 10)
    assert torch.equal(processor(prompt, logits), logits)  # the prompt is not counted
    sequence = torch.cat([prompt, torch.tensor([[7, 7, 8]])], dim=1)
    expected = logits.clone()
    expected[0, 7] -= 2 * 0.5 + 0.25  # c = 2 in the output (its prompt occurrence does not count)
    expected[0, 8] -= 1 * 0.5 + 0.25
    assert torch.allclose(processor(sequence, logits), expected)


def test_logit_bias_adds_to_the_chosen_logits_only():
    logits = torch.randn(1, 10)
    biased = LogitBiasLogitsProcessor({3: 5.0, 9: -100.0})(torch.tensor([[1]]), logits)
    expected = logits.clone()
    expected[0, 3] += 5.0
    expected[0, 9] -= 100.0
    assert torch.equal(biased, expected)


def test_zero_penalties_generate_exactly_what_no_penalties_do(engine):
    plain = engine.generate("The harbour at dawn", max_new_tokens=12)
    off = engine.generate(
        "The harbour at dawn",
        max_new_tokens=12,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        repetition_penalty=1.0,
        logit_bias={},
    )
    assert off.output_token_ids == plain.output_token_ids


@pytest.mark.parametrize(
    "penalty", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 3.0}]
)
def test_each_penalty_changes_a_repetitive_output_and_repeats_less(engine, penalty):
    plain = engine.generate("The harbour at dawn", max_new_tokens=24)
    assert len(set(plain.output_token_ids)) < len(plain.output_token_ids), "the random model must repeat itself"
    penalised = engine.generate("The harbour at dawn", max_new_tokens=24, **penalty)
    assert penalised.output_token_ids != plain.output_token_ids
    assert len(set(penalised.output_token_ids)) > len(set(plain.output_token_ids))


def test_a_large_logit_bias_forces_its_token_and_a_negative_one_bans_it(engine):
    plain = engine.generate("The harbour at dawn", max_new_tokens=6)
    token = 1234
    assert (
        engine.generate("The harbour at dawn", max_new_tokens=6, logit_bias={token: 100}).output_token_ids
        == [token] * 6
    )
    banned = engine.generate("The harbour at dawn", max_new_tokens=6, logit_bias={str(plain.output_token_ids[0]): -100})
    assert banned.output_token_ids[0] != plain.output_token_ids[0]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"presence_penalty": True}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logit_bias": {49152: 1}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"logit_bias": {5: "1"}}, "logit_bias"),
    ],
)
def test_bad_penalties_name_the_parameter_before_any_model_work(engine, kwargs, name):
    with pytest.raises(ValueError, match=name):
        engine.generate("x", max_new_tokens=1, **kwargs)
    with pytest.raises(ValueError, match=name):
        engine.generate_batch(["x"], max_new_tokens=1, **kwargs)


def test_logit_bias_reads_json_token_ids():
    assert SamplingParams(logit_bias={"12": -5}).penalties(vocab_size=100).logit_bias == {12: -5.0}


def test_langchain_models_take_the_penalties_at_construction_and_per_call(tiny_model_dir):
    from pd_integrations.langchain import ChatPromptDistill

    chat = ChatPromptDistill(model=tiny_model_dir, method="full", max_tokens=24)
    plain = chat.invoke("The harbour at dawn").content
    assert (
        ChatPromptDistill(model=tiny_model_dir, method="full", max_tokens=24, frequency_penalty=2.0)
        .invoke("The harbour at dawn")
        .content
        != plain
    )
    assert chat.invoke("The harbour at dawn", presence_penalty=2.0).content != plain
    assert chat.bind(repetition_penalty=3.0).invoke("The harbour at dawn").content != plain
    with pytest.raises(ValueError, match="frequency_penalty"):
        ChatPromptDistill(model=tiny_model_dir, frequency_penalty=5)
    with pytest.raises(ValueError, match="logit_bias"):
        chat.invoke("x", logit_bias={10**9: 1.0})
