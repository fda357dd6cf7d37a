"""Bad input fails early with an error that names the parameter; nothing is clipped silently."""

from __future__ import annotations

import pytest
import transformers

from pd_integrations import (
    ModelNotAvailableError,
    PromptDistillConfig,
    PromptDistillEngine,
    UnsupportedArchitectureError,
    load_model,
)

from .conftest import tiny_model


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"method": "fast"}, "method must be one of"),
        ({"selection_layers": (3, 3), "budgets": (10, 5)}, "strictly increasing"),
        ({"selection_layers": (-1,)}, "selection_layers must be"),
        ({"budgets": (0,)}, "budgets must be ints >= 1"),
        ({"budgets": (-5,)}, "budgets must be ints >= 1"),
        ({"budgets": (1.5,)}, "fractions in (0, 1]"),
        ({"budgets": (10, 20)}, "non-increasing"),
        ({"budgets": (10, 0.5)}, "all ints or all fractions"),
        ({"selection_layers": (1, 2), "budgets": (10,)}, "one entry per stage"),
        ({"pool_kernel": 4}, "pool_kernel must be an odd int"),
        ({"aggregation": "sum"}, "aggregation must be one of"),
        ({"span": "paragraph"}, "span must be one of"),
        ({"protect_head": -1}, "protect_head must be an int >= 0"),
        ({"cache_truncation": "yes"}, "cache_truncation must be"),
        ({"method": "gemfilter", "selection_layers": (1, 2), "budgets": (9, 8)}, "gemfilter selects once"),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError) as error:
        PromptDistillConfig(**fields)
    assert message in str(error.value)


@pytest.fixture(scope="module")
def engine(tokenizer):
    return PromptDistillEngine(tiny_model("llama"), tokenizer, PromptDistillConfig(selection_layers=(1,), budgets=(8,)))


def test_selection_layer_out_of_range(tokenizer):
    for layer in (3, 7):  # the last layer of 4 cannot select; 7 does not exist
        with pytest.raises(ValueError, match=r"selection_layers entries must be in \[0, 2\]"):
            PromptDistillEngine(
                tiny_model("llama"), tokenizer, PromptDistillConfig(selection_layers=(layer,), budgets=(8,))
            )


NOT_DOCUMENTS = r"documents must be a list of str"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"prompt": ""}, ValueError, "prompt is empty"),
        ({"prompt": "   \n"}, ValueError, "prompt is empty"),
        ({}, ValueError, "pass exactly one of prompt, messages or input_ids"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, ValueError, "exactly one"),
        ({"messages": []}, ValueError, "messages must be a non-empty list"),
        ({"input_ids": []}, ValueError, "input_ids is empty"),
        ({"prompt": "hi", "stop": 5}, TypeError, "stop must be"),
        ({"prompt": "hi", "stop": ["ok", 3]}, TypeError, "stop must be"),
        ({"prompt": "hi", "stop": [""]}, TypeError, "stop must be"),
        ({"prompt": "hi", "max_new_tokens": 0}, ValueError, "max_new_tokens must be"),
        ({"prompt": "hi", "temperature": -1}, ValueError, "temperature must be"),
        ({"prompt": "hi", "top_p": 0}, ValueError, "top_p must be"),
        ({"prompt": "hi", "top_k": -2}, ValueError, "top_k must be"),
        ({"prompt": "hi", "query": ""}, ValueError, "query must be a non-empty str"),
        ({"prompt": "alpha beta", "documents": "alpha"}, TypeError, NOT_DOCUMENTS),
        ({"prompt": "alpha beta", "documents": [3]}, TypeError, NOT_DOCUMENTS),
        ({"prompt": "alpha beta", "documents": ["alpha", "gamma"]}, ValueError, r"documents\[1\] is empty or does not"),
        ({"prompt": "alpha beta", "documents": ["  "]}, ValueError, r"documents\[0\] is empty"),
        ({"prompt": "alpha beta", "documents": []}, ValueError, "documents is empty"),
        ({"prompt": "alpha beta", "documents": ["alpha", "alpha"]}, ValueError, r"documents\[1\] is empty or does not"),
    ],
)
def test_generate_rejects_bad_arguments(engine, kwargs, error, message):
    with pytest.raises(error, match=message):
        engine.generate(**kwargs)


def test_document_spans_need_documents(engine):
    with pytest.raises(ValueError, match=r'span="document" needs documents=\[...\]'):
        engine.with_config(engine.config.replace(span="document")).generate("alpha beta", max_new_tokens=1)


def test_prompt_longer_than_context_window(engine):
    too_long = list(range(3, 3 + 513))  # tiny models have a 512-token window
    with pytest.raises(ValueError, match=r"513 tokens .* context window is 512"):
        engine.generate(input_ids=too_long)


def test_probe_that_overflows_the_window(engine, tokenizer):
    ids = list(range(3, 3 + 510))
    with pytest.raises(ValueError, match="including the query, appended to score selection"):
        engine.generate(input_ids=ids, query="what is the secret pass code of the vault")


def test_unknown_model_offline():
    with pytest.raises(ModelNotAvailableError, match="nobody-here/no-such-model"):
        load_model("nobody-here/no-such-model")


def test_unsupported_architecture(tokenizer):
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=49152)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*supported: llama, mistral, qwen2, qwen3, phi3"):
        PromptDistillEngine(model, tokenizer)
