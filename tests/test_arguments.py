"""Misspelled, foreign and malformed arguments fail loudly, naming the argument and what is allowed.

Before, `ChatPromptDistill(budget=(256,))` ran with nothing pruned and `max_token=3` generated 256 tokens: pydantic
dropped unknown constructor arguments silently. Now every unknown argument, to a constructor or to a call, of the
LangChain and LlamaIndex adapters is a `TypeError` naming it and the closest valid name; the other framework's name
of a setting (`max_tokens` / `max_new_tokens`, `model_name`) works in both; every `PromptDistillConfig` field is a
constructor shortcut in both; and bad `input_ids` are refused before any model work.

Generation runs a tiny random Llama saved with the default model's tokenizer, so each call takes milliseconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.langchain import ChatPromptDistill
from pd_integrations.langchain import PromptDistillLLM as LangChainLLM
from pd_integrations.llama_index import PromptDistillLLM as LlamaIndexLLM

from .conftest import TINY, tiny_model

LANGCHAIN = [ChatPromptDistill, LangChainLLM]
ADAPTERS = [ChatPromptDistill, LangChainLLM, LlamaIndexLLM]
# Each adapter's name for the output length; the other framework's name is accepted too.
OWN_MAX = {
    ChatPromptDistill: ("max_tokens", "max_new_tokens"),
    LangChainLLM: ("max_tokens", "max_new_tokens"),
    LlamaIndexLLM: ("max_new_tokens", "max_tokens"),
}


def own_max(cls):
    return OWN_MAX[cls][0]


def other_max(cls):
    return OWN_MAX[cls][1]


def distill_config(llm) -> PromptDistillConfig:
    """The PromptDistillConfig an adapter instance hands its engine (before profile resolution; None, i.e. unset,
    as the default)."""
    return llm.distill_config() or PromptDistillConfig()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the default model's tokenizer and chat template, saved like a user's model."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-arguments")
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------- constructors: unknown and misspelled arguments

MISSPELLED = [
    ("budget", (256,), "budgets"),
    ("max_token", 3, "max_tokens"),  # accepted by both adapters (LlamaIndex: the alias of max_new_tokens)
    ("selection_layer", 3, "selection_layers"),
    ("temprature", 0.5, "temperature"),
    ("chunksize", 32, "chunk_size"),
    ("aggregate", "softmax_max", "aggregation"),
    ("quantisation", "4bit", "quantization"),
    ("cache_truncate", False, "cache_truncation"),
]


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: f"{c.__module__.split('.')[1]}.{c.__name__}")
@pytest.mark.parametrize("name, value, closest", MISSPELLED, ids=[m[0] for m in MISSPELLED])
def test_constructor_names_a_misspelled_argument_and_its_closest_name(cls, name, value, closest):
    with pytest.raises(TypeError) as error:
        cls(**{name: value})
    message = str(error.value)
    assert f"unexpected keyword argument {name!r} (did you mean {closest!r}?)" in message
    assert cls.__name__ in message


@pytest.mark.parametrize("cls", ADAPTERS)
def test_constructor_lists_the_arguments_when_nothing_is_close(cls):
    with pytest.raises(TypeError) as error:
        cls(xyzzy=1, model_kwargs={"trust_remote_code": True})
    message = str(error.value)
    assert "unexpected keyword arguments 'xyzzy', 'model_kwargs'" in message
    assert "it takes " in message and "budgets" in message and "temperature" in message


@pytest.mark.parametrize("cls", ADAPTERS)
def test_constructor_points_per_call_options_to_the_call(cls):
    with pytest.raises(TypeError, match=r"'pd_query' \(a per-call option: "):
        cls(pd_query="Who keeps the lighthouse?")


@pytest.mark.parametrize("cls", LANGCHAIN)
def test_langchain_base_fields_are_still_accepted(cls):
    """LangChain's own model fields are arguments too, and so are the standard ones API-backed models take."""
    chat_only = {"disable_streaming": "tool_calling", "output_version": "v1", "rate_limiter": None}
    llm = cls(
        callbacks=None,
        tags=["rag"],
        metadata={"run": 1},
        cache=False,
        verbose=False,
        custom_get_token_ids=len,
        name="pd",
        timeout=30,
        max_retries=1,
        streaming=True,
        api_key="unused",
        **(chat_only if cls is ChatPromptDistill else {}),
    )
    assert (llm.tags, llm.metadata["run"], llm.name, llm.timeout, llm.streaming) == (["rag"], 1, "pd", 30, True)
    assert "api_key" not in llm.model_dump()  # accepted for compatibility, never serialised


def test_llama_index_base_fields_are_still_accepted():
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.types import PydanticProgramMode

    llm = LlamaIndexLLM(
        callback_manager=CallbackManager([]),
        system_prompt="Be brief.",
        messages_to_prompt=lambda messages: "x",
        completion_to_prompt=lambda prompt: f"Q: {prompt}",
        output_parser=None,
        pydantic_program_mode=PydanticProgramMode.DEFAULT,
        query_wrapper_prompt=None,
        context_window=1024,
        is_chat_model=True,
    )
    assert (llm.system_prompt, llm.completion_to_prompt("a"), llm.context_window) == ("Be brief.", "Q: a", 1024)


def test_llama_index_serialisation_round_trips():
    """`to_dict()` writes `class_name`; `from_dict` and the constructor take what it writes."""
    llm = LlamaIndexLLM(budgets=64, span="sentence", max_tokens=5, config={"chunk_size": 16})
    data = llm.to_dict()
    assert data["class_name"] == "PromptDistillLLM"
    for copy in (LlamaIndexLLM.from_dict(dict(data)), LlamaIndexLLM(**data)):
        assert (
            copy.distill_config()
            == llm.distill_config()
            == PromptDistillConfig(budgets=(64,), span="sentence", chunk_size=16)
        )
        assert copy.max_new_tokens == 5


# ---------------------------------------------------------------- the other framework's names


@pytest.mark.parametrize("cls", ADAPTERS)
def test_both_names_of_the_output_length_are_accepted(cls):
    assert getattr(cls(**{other_max(cls): 3}), own_max(cls)) == 3
    assert getattr(cls(**{own_max(cls): 4}), own_max(cls)) == 4


@pytest.mark.parametrize("cls", ADAPTERS)
def test_giving_both_names_of_one_setting_is_an_error(cls):
    with pytest.raises(
        TypeError, match="got both .*max_tokens.* and .*max_new_tokens|got both .*max_new_tokens.* and .*max_tokens"
    ):
        cls(max_tokens=3, max_new_tokens=3)
    with pytest.raises(TypeError, match="got both model= and model_name="):
        cls(model="a/b", model_name="a/b")


@pytest.mark.parametrize("cls", ADAPTERS)
def test_model_name_is_the_model(cls):
    llm = cls(model_name="does-not-exist/xyz")
    assert llm.model == "does-not-exist/xyz"  # not dropped: the first call fails to load it (tests below)


@pytest.mark.parametrize("cls", ADAPTERS)
def test_bad_output_length_names_the_setting(cls):
    for name in OWN_MAX[cls]:
        with pytest.raises(ValueError, match=own_max(cls)):
            cls(**{name: 0})


# ---------------------------------------------------------------- config fields as constructor shortcuts

# (field, a valid value, what the config holds, an invalid value, the start of its message)
SHORTCUTS = [
    ("method", "gemfilter", "gemfilter", "fast", "method must be one of"),
    ("selection_layers", 7, (7,), (3, 3), "selection_layers must be strictly increasing"),
    ("budgets", 256, (256,), 0, "budgets must be ints >= 1 or fractions in (0, 1]"),
    ("budgets", [0.25], (0.25,), 1.5, "budgets must be ints >= 1 or fractions in (0, 1]"),
    ("span", "document", "document", "paragraph", "span must be one of"),
    ("chunk_size", 16, 16, 0, "chunk_size must be an int >= 1"),
    ("aggregation", "softmax_max", "softmax_max", "sum", "aggregation must be one of"),
    ("heads", [[0, 2]], ((0, 2),), 5, "heads must be a list with one entry"),
    ("pool_kernel", 5, 5, 4, "pool_kernel must be an odd int >= 1"),
    ("query_source", "last_token", "last_token", "first_token", "query_source must be one of"),
    ("tail_tokens", 8, 8, 0, "tail_tokens must be an int >= 1"),
    ("max_probe_tokens", 64, 64, -1, "max_probe_tokens must be an int >= 1"),
    ("protect_head", 0, 0, -1, "protect_head must be an int >= 0"),
    (
        "cache_truncation",
        "after_first_stage",
        "after_first_stage",
        "no",
        "cache_truncation must be True, False or 'after_first_stage'",
    ),
    ("context_min_tokens", 32, 32, 0, "context_min_tokens must be an int >= 1"),
    ("unit_score", "topk_mean", "topk_mean", "sum", "unit_score must be one of"),
    ("unit_topk", 4, 4, 0, "unit_topk must be an int >= 1"),
    ("detrend_window", 1024, 1024, -1, "detrend_window must be an int >= 0"),
    ("protect_recent", 64, 64, -1, "protect_recent must be an int >= 0"),
    ("protect_structure", True, True, "yes", "protect_structure must be True or False"),
]


def test_every_config_field_has_a_shortcut_case():
    import dataclasses

    assert {case[0] for case in SHORTCUTS} == {f.name for f in dataclasses.fields(PromptDistillConfig)}


@pytest.mark.parametrize("cls", ADAPTERS)
@pytest.mark.parametrize("field, value, stored, bad, message", SHORTCUTS, ids=[f"{c[0]}={c[1]!r}" for c in SHORTCUTS])
def test_config_fields_are_constructor_shortcuts(cls, field, value, stored, bad, message):
    assert getattr(distill_config(cls(**{field: value})), field) == stored
    assert getattr(PromptDistillConfig(**{field: value}), field) == stored
    with pytest.raises(ValueError) as error:
        cls(**{field: bad})
    assert message in str(error.value)
    assert "Input should be" not in str(error.value)  # the config's message, not pydantic's type coercion
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        PromptDistillConfig(**{field: bad})


@pytest.mark.parametrize("cls", ADAPTERS)
def test_shortcuts_override_config_and_cross_checks_apply(cls):
    llm = cls(config=PromptDistillConfig(budgets=(512,), chunk_size=32), budgets=64, span="token")
    assert distill_config(llm) == PromptDistillConfig(budgets=(64,), chunk_size=32, span="token")
    with pytest.raises(ValueError, match="one entry per stage"):
        cls(selection_layers=(1, 2), budgets=8)


@pytest.mark.parametrize("cls", ADAPTERS)
def test_config_as_a_dict(cls):
    assert distill_config(cls(config={"budgets": 32, "span": "sentence"})) == PromptDistillConfig(
        budgets=(32,), span="sentence"
    )
    with pytest.raises(
        TypeError,
        match=r"PromptDistillConfig got an unexpected keyword argument 'budget' "
        r"\(did you mean 'budgets'\?\)",
    ):
        cls(config={"budget": 32})
    with pytest.raises(ValueError, match=r"budgets must be ints >= 1 or fractions in \(0, 1\], got 0"):
        cls(config={"budgets": 0})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"budgets": ()}, r"budgets must be one or more ints >= 1"),
        ({"heads": [[]]}, r"heads entries must be None or non-empty lists of ints >= 0"),
        ({"heads": [[-1]]}, r"heads entries must be None or non-empty lists of ints >= 0"),
        ({"heads": [3, 4]}, r"heads must be a list with one entry"),
        ({"heads": "0,1"}, r"heads must be a list with one entry"),
        ({"selection_layers": "7"}, r"selection_layers must be one or more ints >= 0"),
        ({"budgets": "256"}, r"budgets must be ints >= 1 or fractions in \(0, 1\], got '256'"),
    ],
)
def test_config_coercion_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        PromptDistillConfig(**fields)


def test_config_scalar_and_list_stages():
    assert PromptDistillConfig(budgets=256, selection_layers=7) == PromptDistillConfig(
        budgets=(256,), selection_layers=(7,)
    )
    assert PromptDistillConfig(budgets=[0.5, 0.25], selection_layers=range(2, 4)).budgets == (0.5, 0.25)
    assert PromptDistillConfig(heads=[[0, 1], None]).heads == ((0, 1), None)


# ---------------------------------------------------------------- per-call arguments


@pytest.mark.parametrize("cls", LANGCHAIN)
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pd_querry": "x"}, r"call got an unexpected keyword argument 'pd_querry' \(did you mean 'pd_query'\?\)"),
        ({"query": "x"}, r"'query' \(did you mean 'pd_query'\?\)"),
        ({"documents": ["x"]}, r"'documents' \(did you mean 'pd_documents'\?\)"),
        ({"max_token": 3}, r"'max_token' \(did you mean 'max_tokens'\?\)"),
        ({"model_name": "x"}, r"'model_name' \(did you mean 'model'\?\)"),
        ({"device": "cpu"}, r"'device' \(set it when constructing the model: \w+\(device=...\)\)"),
        (
            {"foo": 1, "bar": 2},
            r"unexpected keyword arguments 'foo', 'bar'; it takes aggregation, budgets, "
            r"cache_truncation, .*max_new_tokens, max_probe_tokens, max_tokens, method, model, "
            r"pd_documents, pd_query, .*top_k, top_p, unit_score, unit_topk",
        ),
    ],
)
def test_langchain_call_rejects_unknown_arguments(cls, kwargs, message):
    # Raised while the call's options are resolved, before the (default) model would load.
    with pytest.raises(TypeError, match=message):
        cls().invoke("Hello", **kwargs)
    with pytest.raises(TypeError, match=message):
        cls().bind(**kwargs).invoke("Hello")


@pytest.mark.parametrize("cls", LANGCHAIN)
def test_langchain_call_rejects_both_output_length_names(cls):
    with pytest.raises(TypeError, match="got both max_tokens= and max_new_tokens="):
        cls().invoke("Hello", max_tokens=3, max_new_tokens=3)
    with pytest.raises(ValueError, match="max_tokens"):
        cls().invoke("Hello", max_new_tokens=0)
    with pytest.raises(ValueError, match="top_k"):
        cls().invoke("Hello", top_k=-1)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"max_token": 3},
            TypeError,
            r"PromptDistillLLM call got an unexpected keyword argument 'max_token' "
            r"\(did you mean 'max_tokens'\?\)",
        ),
        ({"query": "x"}, TypeError, r"'query' \(did you mean 'pd_query'\?\)"),
        (
            {"xyzzy": "x"},
            TypeError,
            r"'xyzzy'; it takes aggregation, budgets, .*max_new_tokens, max_probe_tokens, "
            r"max_tokens, method, pd_documents, pd_query, .*stop, .*top_k, top_p, unit_score",
        ),
        (
            {"device": "cpu"},
            TypeError,
            r"'device' \(set it when constructing the model: PromptDistillLLM\(device=...\)\)",
        ),
        ({"max_tokens": 3, "max_new_tokens": 3}, TypeError, "got both max_new_tokens= and max_tokens="),
        ({"max_tokens": 0}, ValueError, r"max_tokens \(max_new_tokens\) must be an int >= 1, got 0"),
        ({"max_tokens": 2.0}, ValueError, r"max_tokens \(max_new_tokens\) must be an int >= 1, got 2.0"),
        ({"pd_query": "  "}, ValueError, "pd_query must be a non-empty str"),
    ],
)
def test_llama_index_call_rejects_bad_arguments(tiny_model_dir, kwargs, error, message):
    # LlamaIndex's callback decorator reads `metadata` (so loads the weights) before the call's arguments are read.
    llm = LlamaIndexLLM(model=tiny_model_dir)
    for call in (
        lambda: llm.complete("Hello", **kwargs),
        lambda: llm.stream_complete("Hello", **kwargs),
        lambda: llm.chat([], **kwargs),
    ):
        with pytest.raises(error, match=message):
            call()


# ---------------------------------------------------------------- what the accepted names do


def test_langchain_output_length_under_both_names(tiny_model_dir):
    for cls in LANGCHAIN:

        def output_tokens(llm, **kwargs):
            if cls is ChatPromptDistill:
                return llm.invoke("Hello there", **kwargs).usage_metadata["output_tokens"]
            result = llm.generate(["Hello there"], **kwargs)
            return result.generations[0][0].generation_info["usage_metadata"]["output_tokens"]

        assert output_tokens(cls(model=tiny_model_dir, max_new_tokens=3)) == 3
        assert output_tokens(cls(model=tiny_model_dir, max_tokens=3)) == 3
        assert output_tokens(cls(model=tiny_model_dir, max_tokens=9), max_new_tokens=2) == 2
        assert output_tokens(cls(model=tiny_model_dir, max_new_tokens=9), max_tokens=1) == 1
        assert output_tokens(cls(model_name=tiny_model_dir, max_tokens=2)) == 2


def test_llama_index_output_length_under_both_names(tiny_model_dir):
    def completion_tokens(llm, **kwargs):
        return llm.complete("Hello there", **kwargs).raw["usage"]["completion_tokens"]

    assert completion_tokens(LlamaIndexLLM(model=tiny_model_dir, max_tokens=3)) == 3
    assert completion_tokens(LlamaIndexLLM(model=tiny_model_dir, max_new_tokens=3)) == 3
    assert completion_tokens(LlamaIndexLLM(model=tiny_model_dir, max_new_tokens=9), max_tokens=2) == 2
    assert completion_tokens(LlamaIndexLLM(model_name=tiny_model_dir, max_new_tokens=9), max_new_tokens=1) == 1
    chunks = list(LlamaIndexLLM(model=tiny_model_dir).stream_complete("Hello there", max_tokens=2))
    assert chunks[-1].raw["usage"]["completion_tokens"] == 2


def test_top_k_one_is_greedy(tiny_model_dir):
    """`top_k` reaches the engine from both adapters: sampling hot from the top 1 token is greedy decoding."""
    greedy = ChatPromptDistill(model=tiny_model_dir, max_tokens=6).invoke("Hello there").content
    assert (
        ChatPromptDistill(model=tiny_model_dir, max_tokens=6, temperature=5.0, top_k=1, seed=3)
        .invoke("Hello there")
        .content
        == greedy
    )
    assert (
        ChatPromptDistill(model=tiny_model_dir, max_tokens=6, temperature=5.0, seed=3)
        .invoke("Hello there", top_k=1)
        .content
        == greedy
    )
    hot = ChatPromptDistill(model=tiny_model_dir, max_tokens=6, temperature=5.0, seed=3).invoke("Hello there")
    assert hot.content != greedy  # without top_k, sampling this hot leaves the greedy path
    llama = LlamaIndexLLM(model=tiny_model_dir, max_new_tokens=6, temperature=5.0, seed=3)
    greedy_llama = LlamaIndexLLM(model=tiny_model_dir, max_new_tokens=6).complete("Hello there").text
    assert llama.complete("Hello there", top_k=1).text == greedy_llama
    assert (
        LlamaIndexLLM(model=tiny_model_dir, max_new_tokens=6, temperature=5.0, seed=3, top_k=1)
        .complete("Hello there")
        .text
        == greedy_llama
    )


def test_span_shortcut_reaches_the_engine(tiny_model_dir):
    """`span="document"` given directly is used, not dropped: without documents the call says it needs them."""
    for llm, call in (
        (
            ChatPromptDistill(model=tiny_model_dir, span="document", max_tokens=1),
            lambda llm, **kw: llm.invoke("alpha beta", **kw),
        ),
        (
            LlamaIndexLLM(model=tiny_model_dir, span="document", max_new_tokens=1),
            lambda llm, **kw: llm.complete("alpha beta", **kw),
        ),
    ):
        with pytest.raises(ValueError, match=r'span="document" needs documents='):
            call(llm)
        call(llm, pd_documents=["alpha"])


def test_budgets_number_reaches_the_engine(tiny_model_dir):
    """`budgets=3` keeps 3 context tokens: a scalar budget is one stage, not ignored."""
    passages = [
        "The red fox jumps over the lazy dog near the river bank today.",
        "A quiet library opens early on weekdays and closes late on Fridays.",
    ]
    prompt = "Context:\n" + "\n\n".join(passages) + "\n\nQuestion: when does the library close?"
    chat = ChatPromptDistill(model=tiny_model_dir, selection_layers=1, budgets=3, span="token", max_tokens=1)
    stats = chat.invoke(prompt, pd_documents=passages).response_metadata["promptdistill"]
    assert stats["prunable_tokens"] > 3 and stats["kept_prunable_tokens"] == 3
    llm = LlamaIndexLLM(model=tiny_model_dir, selection_layers=1, budgets=3, span="token", max_new_tokens=1)
    stats = llm.complete(prompt, pd_documents=passages).additional_kwargs["promptdistill"]
    assert stats["prunable_tokens"] > 3 and stats["kept_prunable_tokens"] == 3


def test_model_name_loads_that_model(monkeypatch):
    from pd_integrations import ModelNotAvailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="does-not-exist/xyz"):
        ChatPromptDistill(model_name="does-not-exist/xyz").invoke("Hello")
    with pytest.raises(ModelNotAvailableError, match="does-not-exist/xyz"):
        LlamaIndexLLM(model_name="does-not-exist/xyz").complete("Hello")


# ---------------------------------------------------------------- input_ids


@pytest.fixture(scope="module")
def engine(tokenizer):
    return PromptDistillEngine(tiny_model("llama"), tokenizer, PromptDistillConfig(selection_layers=(1,), budgets=(8,)))


IDS = "input_ids must be a flat list of ints or a 1-D \\(or \\[1, n\\]\\) integer tensor of token ids in \\[0, 49151\\]"


@pytest.mark.parametrize(
    "input_ids, error, message",
    [
        ([1.0, 2.0], TypeError, IDS + ", got float 1.0 at position 0"),
        ([5, 6.5], TypeError, IDS + ", got float 6.5 at position 1"),
        ([5, True], TypeError, IDS + ", got bool True at position 1"),
        ([5, "6"], TypeError, IDS + ", got str '6' at position 1"),
        ([5, None], TypeError, IDS + ", got NoneType None at position 1"),
        ([[5, 6, 7]], TypeError, IDS + r" \(nested lists are not accepted: pass one sequence\), got list"),
        ([torch.tensor([5, 6])], TypeError, IDS + r" \(nested lists are not accepted"),
        (
            [5, -1, 7],
            ValueError,
            r"input_ids must be token ids in \[0, 49151\] \(the tokenizer's vocabulary\), got -1 "
            r"at position 1",
        ),
        ([5, 49152], ValueError, r"token ids in \[0, 49151\] .*got 49152 at position 1"),
        ([5, 2**70], ValueError, r"token ids in \[0, 49151\] .*got 1180591620717411303424 at position 1"),
        (
            torch.tensor([[5, 6, 7], [5, 6, 7]]),
            ValueError,
            IDS + r" \(one sequence: batches are not supported\), got "
            r"shape \[2, 3\]",
        ),
        (torch.tensor([[[5, 6, 7]]]), ValueError, IDS + r" .*got shape \[1, 1, 3\]"),
        (torch.tensor(5), ValueError, IDS + r" .*got shape \[\]"),
        (torch.tensor([5.0, 6.0]), TypeError, IDS + ", got a Tensor of dtype torch.float32"),
        (torch.tensor([True, False]), TypeError, IDS + ", got a Tensor of dtype torch.bool"),
        (torch.tensor([5, -3]), ValueError, r"token ids in \[0, 49151\] .*got -3 at position 1"),
        (torch.tensor([[5, 60000]]), ValueError, r"token ids in \[0, 49151\] .*got 60000 at position 1"),
        (np.array([5.0, 6.0]), TypeError, IDS + ", got a ndarray of dtype float64"),
        (np.array([[5, 6], [7, 8]]), ValueError, IDS + r" .*got shape \[2, 2\]"),
        ("hello", TypeError, IDS + ", got str"),
        (5, TypeError, IDS + ", got int"),
        ({"input_ids": [5, 6]}, TypeError, IDS + r", got dict \(pass encoding\['input_ids'\]\)"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "input_ids is empty"),
        ((), ValueError, "input_ids is empty"),
    ],
)
def test_bad_input_ids_are_refused_before_model_work(engine, input_ids, error, message):
    # `stream` renders and lays out the prompt eagerly; the model runs only when the stream is iterated.
    with pytest.raises(error, match=message):
        engine.stream(input_ids=input_ids, max_new_tokens=1)


def test_batch_encoding_gets_a_hint(engine, tokenizer):
    with pytest.raises(TypeError, match=r"got BatchEncoding \(pass encoding\['input_ids'\]\)"):
        engine.stream(input_ids=tokenizer("Hello there", return_tensors="pt"))


def test_accepted_input_id_forms_generate_the_same(engine, tokenizer):
    ids = tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]
    expected = engine.generate(input_ids=ids, max_new_tokens=3)
    for form in (
        tuple(ids),
        torch.tensor(ids),
        torch.tensor([ids]),
        torch.tensor(ids, dtype=torch.int32),
        np.array(ids),
        np.array([ids], dtype=np.uint16),
        [np.int64(i) for i in ids],
    ):
        result = engine.generate(input_ids=form, max_new_tokens=3)
        assert (result.output_token_ids, result.prompt_tokens, result.prompt_text) == (
            expected.output_token_ids,
            len(ids),
            expected.prompt_text,
        )


def test_vocabulary_bound_is_the_tokenizer(tokenizer):
    """A model whose embedding is padded past the tokenizer (49,216 rows for 49,152 tokens) still refuses ids the
    tokenizer doesn't have: they have no text, and render only knows the tokenizer."""
    torch.manual_seed(0)
    padded = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**TINY, "vocab_size": 49216}))
    engine = PromptDistillEngine(padded.eval(), tokenizer, PromptDistillConfig(method="full"))
    assert engine.generate(input_ids=[5, 49151], max_new_tokens=1).prompt_tokens == 2
    with pytest.raises(ValueError, match=r"token ids in \[0, 49151\] \(the tokenizer's vocabulary\), got 49200"):
        engine.stream(input_ids=[5, 49200])
