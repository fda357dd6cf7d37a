"""`PromptInput` and `SamplingParams`: checked once when built, taken by every engine call as objects or as keyword
arguments, with the same results either way."""

from __future__ import annotations

import pytest

from pd_integrations import PromptDistillConfig, PromptDistillEngine, PromptInput, SamplingParams
from pd_integrations.adapter_settings import sampling_fields
from pd_integrations.inputs import SAMPLING_SETTINGS

from .conftest import tiny_model

CONTEXT = "Context: the lighthouse keeper is Ada.\n\nThe ferry leaves at noon.\n\nQuestion: who keeps the lighthouse?"


@pytest.fixture(scope="module")
def engine(tokenizer):
    return PromptDistillEngine(tiny_model("llama"), tokenizer, PromptDistillConfig(selection_layers=(1,), budgets=(8,)))


@pytest.mark.parametrize(
    "fields, error, message",
    [
        ({"max_new_tokens": True}, ValueError, "max_new_tokens must be an int >= 1"),
        ({"temperature": 1e-5}, ValueError, r"temperature must be 0 \(greedy\) or a number in \[0.001, 100.0\]"),
        ({"top_k": 1.0}, ValueError, "top_k must be an int >= 0"),
        ({"seed": -1}, ValueError, "seed must be None or an int"),
        ({"stop": ["ok", ""]}, TypeError, "stop must be a non-empty str"),
        ({"frequency_penalty": 2.5}, ValueError, r"frequency_penalty must be a number in \[-2.0, 2.0\]"),
        ({"repetition_penalty": 0}, ValueError, "repetition_penalty must be a number > 0"),
        ({"logit_bias": {"x": 1}}, ValueError, r"logit_bias keys must be token ids"),
        ({"logit_bias": {3: 101}}, ValueError, r"logit_bias values must be numbers in \[-100.0, 100.0\]"),
        ({"logprobs": 21}, ValueError, r"logprobs must be None \(off\) or an int in \[0, 20\]"),
    ],
)
def test_sampling_params_name_the_bad_field_when_built(fields, error, message):
    with pytest.raises(error, match=message):
        SamplingParams(**fields)


def test_sampling_params_normalise_stop_and_logit_bias():
    params = SamplingParams(stop="END", logit_bias={"12": -5})
    assert params.stop == ("END",) and params.stops == ["END"] and params.logit_bias == {12: -5.0}
    with pytest.raises(ValueError, match=r"logit_bias keys must be token ids in \[0, 10\), got 12"):
        params.penalties(vocab_size=10)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "pass exactly one of prompt, messages or input_ids"),
        ({"prompt": "hi", "tool_format": "xml"}, "tool_format"),
        ({"prompt": "hi", "tools": [{"type": "function"}]}, "tools need messages"),
        ({"prompt": "hi", "query": " "}, "query must be a non-empty str"),
    ],
)
def test_prompt_input_names_the_bad_field_when_built(fields, message):
    with pytest.raises(ValueError, match=message):
        PromptInput(**fields)


def test_objects_and_keyword_arguments_generate_the_same(engine):
    by_name = engine.generate(CONTEXT, query="who keeps the lighthouse?", max_new_tokens=4, stop=["\n\n\n"])
    prompt = PromptInput(CONTEXT, query="who keeps the lighthouse?")
    as_objects = engine.generate(prompt, sampling=SamplingParams(max_new_tokens=4, stop="\n\n\n"))
    mixed = engine.generate(prompt, sampling=SamplingParams(max_new_tokens=9), max_new_tokens=4, stop="\n\n\n")
    assert by_name.output_token_ids == as_objects.output_token_ids == mixed.output_token_ids
    assert by_name.kept_token_indices == as_objects.kept_token_indices == mixed.kept_token_indices


def test_a_batch_of_prompt_inputs_equals_the_rows_alone(engine):
    rows = [PromptInput(CONTEXT, query="who keeps the lighthouse?"), PromptInput("The ferry leaves at noon.")]
    batched = engine.generate_batch(rows, max_new_tokens=3)
    alone = [engine.generate(row, max_new_tokens=3) for row in rows]
    assert [r.output_token_ids for r in batched] == [r.output_token_ids for r in alone]
    with pytest.raises(TypeError, match=r"got PromptInputs and \['queries'\]"):
        engine.generate_batch(rows, queries=["x", "y"])


def test_one_constraint_object_is_not_shared_by_rows(engine):
    class Anything:
        def mask(self, scores):
            return scores

        def advance(self, token):
            pass

        def is_finished(self):
            return False

    with pytest.raises(ValueError, match="constraint is one generation's"):
        engine.generate_batch(["a", "b"], constraint=Anything(), max_new_tokens=1)


def test_a_constraint_that_wraps_another_is_a_constraint_and_a_grammar_makes_one_per_generation(engine):
    """A constraint holding the one it wraps under `.constraint` (as `pd_integrations.bench.structured` times one)
    is used as it is, not called as a factory; a `Grammar`-like factory gives every generation a fresh one."""

    class Only:  # allows one token, then finishes
        def mask(self, scores):
            allowed = scores.clone().fill_(float("-inf"))
            allowed[..., 7] = 0.0
            return allowed

        def advance(self, token):
            self.finished = True

        def is_finished(self):
            return getattr(self, "finished", False)

    class Wrapping(Only):
        def __init__(self):
            self.constraint, self.masks = Only(), 0

        def mask(self, scores):
            self.masks += 1
            return self.constraint.mask(scores)

    wrapping = Wrapping()
    assert engine.generate("Hi", constraint=wrapping, max_new_tokens=4).output_token_ids == [7]
    assert wrapping.masks == 1

    made = []

    class Factory:
        def constraint(self):
            made.append(Only())
            return made[-1]

    results = engine.generate_batch(["a", "b"], constraint=Factory(), max_new_tokens=4)
    assert [r.output_token_ids for r in results] == [[7], [7]] and len(made) == 2


def test_unknown_engine_arguments_are_named(engine):
    with pytest.raises(TypeError, match=r"stream\(\) got an unexpected keyword argument 'max_tokens' "):
        engine.generate("hi", max_tokens=3)
    with pytest.raises(TypeError, match=r"check\(\) got an unexpected keyword argument 'temperature'"):
        engine.check("hi", temperature=0.5)


def test_request_models_declare_the_dataclass_fields():
    fields = sampling_fields({name: name for name in SAMPLING_SETTINGS}, optional=True)
    assert set(fields) == set(SAMPLING_SETTINGS)
    assert all(info.default is None and info.description for _, info in fields.values())
