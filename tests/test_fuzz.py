"""Property-based fuzzing of every input: config fields, sampling arguments, prompts, messages, queries, documents,
stop lists, input_ids and adapter keyword arguments.

The property throughout: a call either works (and its result is self-consistent) or raises `ValueError`/`TypeError`
whose message names the offending parameter; never IndexError, RuntimeError, KeyError, a hang or a crash. Where an
independent oracle can say whether the arguments are valid, the property is exact: valid arguments must work and
invalid ones must fail naming the parameter.

A tiny random Llama (4 layers, 512 positions) with the real SmolLM2 tokenizer runs 1–3 new tokens per example, so a
few hundred examples per property take seconds. Examples are derandomized (the same every run, no example database),
so CI is reproducible. Counterexamples found while writing these properties are kept as explicit tests below.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from langchain_core.documents import Document
from llama_index.core.schema import TextNode

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.config import AGGREGATIONS, QUERY_SOURCES, SPANS
from pd_integrations.langchain import ChatPromptDistill
from pd_integrations.langchain import PromptDistillLLM as LangChainLLM
from pd_integrations.llama_index import PromptDistillLLM as LlamaIndexLLM
from pd_integrations.methods import METHODS
from pd_integrations.sampling import MAX_TEMPERATURE, MIN_TEMPERATURE

from .conftest import tiny_model

VOCAB = 49152  # len(tokenizer) of SmolLM2, = the tiny model's vocab_size
WINDOW = 512  # the tiny model's max_position_embeddings
NUM_LAYERS, NUM_HEADS = 4, 4


# A deeper, random search: PD_FUZZ_SCALE=10 PD_FUZZ_RANDOM=1 pytest tests/test_fuzz.py
SCALE = float(os.environ.get("PD_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("PD_FUZZ_RANDOM") == "1"


def fuzz(examples: int):
    """Hypothesis settings: `examples` derandomized examples, no deadline (the machine is shared), no database."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ---------------------------------------------------------------- engines

BASE = dict(selection_layers=(1,), budgets=(6,), chunk_size=4, context_min_tokens=4)
ENGINE_CONFIGS = {
    "token": PromptDistillConfig(**BASE, span="token"),
    "chunk": PromptDistillConfig(**BASE, span="chunk"),
    "sentence": PromptDistillConfig(**BASE, span="sentence", pool_kernel=3),
    "fraction-two-stage": PromptDistillConfig(
        selection_layers=(0, 2), budgets=(0.5, 0.25), span="token", context_min_tokens=4, heads=((0, 1), None)
    ),
    "last-token": PromptDistillConfig(**BASE, query_source="last_token", aggregation="logits_mean"),
    "gemfilter": PromptDistillConfig(method="gemfilter", **BASE),
    "full": PromptDistillConfig(method="full"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: a 64-wide model gains nothing from more, and on a busy shared CPU two threads spin-wait
    (calls went from ~8 ms to over a second under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tiny:
    """The tiny model and the real tokenizer (a short repr keeps Hypothesis' failure reports readable)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def __repr__(self) -> str:
        return "Tiny(llama, SmolLM2 tokenizer)"


class Engines(dict):
    def __repr__(self) -> str:
        return f"Engines({', '.join(self)})"


@pytest.fixture(scope="module")
def tiny(tokenizer) -> Tiny:
    return Tiny(tiny_model("llama"), tokenizer)


@pytest.fixture(scope="module")
def engines(tiny) -> dict[str, PromptDistillEngine]:
    return Engines(
        {name: PromptDistillEngine(tiny.model, tiny.tokenizer, config) for name, config in ENGINE_CONFIGS.items()}
    )


@pytest.fixture(scope="module")
def engine(engines) -> PromptDistillEngine:
    return engines["token"]


ENGINE_NAMES = st.sampled_from(sorted(ENGINE_CONFIGS))


# ---------------------------------------------------------------- helpers


def names_one_of(error: BaseException, names) -> bool:
    message = str(error)
    return any(name in message for name in names)


def expect_named_error(call, names):
    """Run `call`; if it raises, the error must be a ValueError/TypeError naming one of `names`. Returns the result
    or the error."""
    try:
        result = call()
    except (ValueError, TypeError) as error:
        assert names_one_of(error, names), f"{type(error).__name__} names none of {names}: {error}"
        event(f"{type(error).__name__}: {str(error)[:40]}")
        return error
    event("worked")
    return result


def check_result(result, max_new_tokens: int, documents=None) -> None:
    """What every successful generation must satisfy."""
    assert isinstance(result.text, str)
    assert 0 <= result.output_tokens <= max_new_tokens
    assert len(result.output_token_ids) == result.output_tokens
    assert 1 <= result.kept_tokens <= result.prompt_tokens <= WINDOW
    kept = result.kept_token_indices
    assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < result.prompt_tokens
    assert result.protected_tokens + result.prunable_tokens == result.prompt_tokens
    assert 0 <= result.kept_prunable_tokens <= result.prunable_tokens
    if result.method != "full":
        assert result.kept_tokens == result.protected_tokens + result.kept_prunable_tokens
    if documents is not None:
        assert len(result.document_retention) == len(documents)
        assert all(0.0 <= share <= 1.0 + 1e-9 for share in result.document_retention)
    if result.prompt_text is not None:
        assert all(0 <= a <= b <= len(result.prompt_text) for a, b in result.kept_char_spans)


# ---------------------------------------------------------------- text strategies

RTL_EMOJI = (
    "مرحبا بالعالم",
    "שלום עולם",
    "\u200f",
    "\u200e",
    "\u202e",
    "\u2067",
    "\u061c",
    "👨‍👩‍👧‍👦",
    "👍🏽",
    "🇯🇵",
    "🏳️‍🌈",
    "e\u0301",
    "\u0e01\u0e34",
    "𝕏",
    "\U0001f600",
    "\ufeff",
    "\u200b",
    "\u00a0",
    "한국어",
    "中文",
    "…",
)
CONTROL = st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"], codec="utf-8")  # NUL, ESC, \r, bidi marks...

# Any code point of any plane that UTF-8 can encode (lone surrogates have their own test below).
ANY_TEXT = st.text(st.characters(codec="utf-8"), max_size=30)
CONTROL_TEXT = st.text(CONTROL, min_size=1, max_size=12)
RTL_EMOJI_TEXT = st.lists(st.sampled_from(RTL_EMOJI), min_size=1, max_size=6).map("".join)
WORDS_TEXT = st.lists(
    st.sampled_from(
        ["the", "fox", "vault", "code", "is", "48213", ".", "?", "\n", "Question:", "é", "🙂", "\x00", "  "]
    ),
    min_size=1,
    max_size=25,
).map(" ".join)
# One huge run with no whitespace between tokens, or whitespace only: beyond the 512-token window, or empty.
HUGE_TEXT = st.builds(
    lambda unit, count: unit * count,
    st.sampled_from(["a", "é", "😀", "\x00", "ab1", "\u200b", " ", "\n", "\u3000"]),
    st.integers(300, 3000),
)
TEXT = st.one_of(ANY_TEXT, CONTROL_TEXT, RTL_EMOJI_TEXT, WORDS_TEXT, HUGE_TEXT)


# ---------------------------------------------------------------- 1. PromptDistillConfig fields


def mostly(valid, invalid, weight: int = 6):
    """`valid` about `weight` times as often as `invalid`, so that examples with every argument valid are common
    and each invalid value is met alone too."""
    return st.integers(0, weight).flatmap(lambda n: valid if n < weight else invalid)


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.lists(st.integers(-1, 3), max_size=2),
)
INT_FIELD = mostly(st.integers(1, 600), st.one_of(st.integers(-3, 0), JUNK))
CONFIG_FIELDS = {
    "method": mostly(st.sampled_from(METHODS), st.one_of(st.sampled_from(["fast", "", "Full"]), JUNK)),
    "selection_layers": mostly(
        st.one_of(st.integers(0, 5), st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True).map(sorted)),
        st.one_of(
            st.integers(-2, -1),
            st.lists(st.integers(-2, 5), max_size=3),
            st.lists(st.integers(0, 5), max_size=3).map(tuple),
            JUNK,
        ),
    ),
    "budgets": mostly(
        st.one_of(
            st.integers(1, 600),
            st.floats(0.001, 1.0),
            st.lists(st.integers(1, 300), min_size=1, max_size=2).map(lambda b: sorted(b)[::-1]),
        ),
        st.one_of(
            st.integers(-2, 0),
            st.floats(-0.5, 1.5),
            st.floats(allow_nan=True),
            st.lists(st.one_of(st.integers(-1, 300), st.floats(0, 1.2)), max_size=3),
            JUNK,
        ),
    ),
    "pool_kernel": mostly(st.integers(0, 5).map(lambda k: 2 * k + 1), st.one_of(st.integers(-3, 10), JUNK)),
    "cache_truncation": mostly(st.booleans(), st.one_of(st.integers(0, 1), JUNK)),
    "query_source": mostly(st.sampled_from(QUERY_SOURCES), st.one_of(st.sampled_from(["last", ""]), JUNK)),
    "tail_tokens": INT_FIELD,
    "protect_head": mostly(st.integers(0, 600), st.one_of(st.integers(-3, -1), JUNK)),
    "aggregation": mostly(st.sampled_from(AGGREGATIONS), st.one_of(st.sampled_from(["sum", ""]), JUNK)),
    "span": mostly(st.sampled_from(SPANS), st.one_of(st.sampled_from(["paragraph", "Token"]), JUNK)),
    "chunk_size": INT_FIELD,
    "heads": mostly(
        st.lists(st.one_of(st.none(), st.lists(st.integers(0, 5), min_size=1, max_size=3)), min_size=1, max_size=3),
        st.one_of(
            st.none(),
            st.integers(-1, 3),
            st.text(max_size=2),
            st.lists(
                st.one_of(
                    st.none(),
                    st.integers(0, 3),
                    st.text(max_size=1),
                    st.lists(st.one_of(st.integers(-1, 5), st.booleans()), max_size=3),
                ),
                max_size=3,
            ),
        ),
    ),
    "max_probe_tokens": INT_FIELD,
    "context_min_tokens": INT_FIELD,
}


def adapter_config(llm) -> PromptDistillConfig:
    """The config an adapter hands its engine before profile resolution (None, i.e. unset, as the default)."""
    return llm.distill_config() or PromptDistillConfig()


@fuzz(400)
@given(fields=st.fixed_dictionaries({}, optional=CONFIG_FIELDS))
def test_config_fields_and_adapter_shortcuts_agree(fields):
    """`PromptDistillConfig(**fields)` works or names a field; the adapters, given the same fields as constructor
    arguments (None = unset there), accept exactly the same settings and build the same config."""
    given_fields = {name: value for name, value in fields.items() if value is not None}
    outcome = expect_named_error(lambda: PromptDistillConfig(**given_fields), given_fields)
    if isinstance(outcome, PromptDistillConfig):
        assert hash(outcome) == hash(PromptDistillConfig(**dataclasses.asdict(outcome)))
        assert outcome == PromptDistillConfig(**dataclasses.asdict(outcome))
        assert all(
            isinstance(getattr(outcome, name), tuple)
            for name in ("selection_layers", "budgets", "heads")
            if getattr(outcome, name) is not None
        )
    for cls in (ChatPromptDistill, LlamaIndexLLM):
        adapted = expect_named_error(lambda: cls(**fields), given_fields)
        if isinstance(outcome, PromptDistillConfig):
            assert not isinstance(adapted, Exception), f"{cls.__name__} refused {fields}: {adapted}"
            assert adapter_config(adapted) == outcome
        else:
            assert isinstance(adapted, (ValueError, TypeError)), f"{cls.__name__} accepted {fields}"


@st.composite
def valid_configs(draw):
    """Configs that pass `PromptDistillConfig` validation; layers 3-4 and heads 4-5 don't fit the 4-layer,
    4-head model (a `ValueError` naming the field when the engine resolves it)."""
    method = draw(st.sampled_from(METHODS))
    stages = 1 if method == "gemfilter" else draw(st.integers(1, 2))
    layers = tuple(sorted(draw(st.sets(st.integers(0, 4), min_size=stages, max_size=stages))))
    if draw(st.booleans()):
        budgets = tuple(sorted(draw(st.lists(st.integers(1, 40), min_size=stages, max_size=stages)), reverse=True))
    else:
        budgets = tuple(sorted(draw(st.lists(st.floats(0.01, 1.0), min_size=stages, max_size=stages)), reverse=True))
    heads = draw(
        st.one_of(
            st.none(),
            st.lists(
                st.one_of(st.none(), st.lists(st.integers(0, 5), min_size=1, max_size=4)),
                min_size=stages,
                max_size=stages,
            ),
        )
    )
    optional = {
        "pool_kernel": st.integers(0, 4).map(lambda k: 2 * k + 1),
        "cache_truncation": st.booleans(),
        "query_source": st.sampled_from(QUERY_SOURCES),
        "tail_tokens": st.integers(1, 40),
        "protect_head": st.integers(0, 40),
        "aggregation": st.sampled_from(AGGREGATIONS),
        "span": st.sampled_from(SPANS),
        "chunk_size": st.integers(1, 12),
        "max_probe_tokens": st.integers(1, 30),
        "context_min_tokens": st.integers(1, 40),
    }
    extra = draw(st.fixed_dictionaries({}, optional=optional))
    return PromptDistillConfig(method=method, selection_layers=layers, budgets=budgets, heads=heads, **extra)


PASSAGES = [
    "The vault code is 48213. It opens at noon.",
    "Foxes sleep in dens! They hunt at night.",
    "Paris is in France.\nIt has a river.",
    "Emoji 🙂 and é accents, also \x00 NUL.",
]
QUESTION = "What is the vault code?"


@fuzz(200)
@given(
    config=valid_configs(),
    with_documents=st.booleans(),
    with_query=st.booleans(),
    as_messages=st.booleans(),
    max_new_tokens=st.integers(1, 3),
)
def test_valid_configs_run_on_the_model(tiny, config, with_documents, with_query, as_messages, max_new_tokens):
    """A valid config either doesn't fit the model (ValueError naming the field) or generates a consistent result,
    whatever its span, stages, heads, pooling, seeds and protected lengths."""
    engine = expect_named_error(
        lambda: PromptDistillEngine(tiny.model, tiny.tokenizer, config), ["selection_layers", "heads"]
    )
    if isinstance(engine, Exception):
        assert any(layer >= NUM_LAYERS - 1 for layer in config.selection_layers) or any(
            h >= NUM_HEADS for heads in config.heads or () for h in heads or ()
        )
        return
    text = "Context:\n" + "\n\n".join(PASSAGES) + f"\n\nQuestion: {QUESTION}"
    prompt = {"messages": [{"role": "user", "content": text}]} if as_messages else {"prompt": text}
    documents = PASSAGES if with_documents else None
    result = expect_named_error(
        lambda: engine.generate(
            **prompt, documents=documents, query=QUESTION if with_query else None, max_new_tokens=max_new_tokens
        ),
        ["span", "documents", "query", "max_probe_tokens"],
    )
    if isinstance(result, Exception):
        assert (
            config.span == "document"
            and not with_documents
            and config.method != "full"
            or "max_probe_tokens" in str(result)
        ), result
        return
    check_result(result, max_new_tokens, documents)
    if config.method == "full":
        assert result.kept_tokens == result.prompt_tokens and result.context_source == "none"
    else:
        assert result.context_source in (("documents",) if with_documents else ("heuristic", "none"))


# ---------------------------------------------------------------- 2. sampling arguments


def _valid_int(value, minimum):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _valid_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


SCALARS = st.one_of(st.booleans(), st.none(), st.text(max_size=2), st.lists(st.integers(0, 2), max_size=1))
MAX_NEW_TOKENS = mostly(st.integers(1, 3), st.one_of(st.integers(-3, 0), st.floats(-1, 4), SCALARS), weight=10)
# 0 (greedy) or [MIN_TEMPERATURE, MAX_TEMPERATURE], ints included; NaN, inf, tiny and negative ones are refused.
TEMPERATURE = mostly(
    st.one_of(st.just(0), st.just(0.0), st.floats(MIN_TEMPERATURE, MAX_TEMPERATURE), st.integers(1, 5)),
    st.one_of(
        st.floats(max_value=-1e-300),
        st.floats(1e-300, MIN_TEMPERATURE / 2),
        st.just(math.nan),
        st.just(math.inf),
        st.integers(-3, -1),
        SCALARS,
    ),
    weight=10,
)
TOP_P = mostly(
    st.one_of(st.floats(1e-300, 1), st.just(1)),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(max_value=0), st.integers(-1, 2), SCALARS),
    weight=10,
)
TOP_K = mostly(
    st.one_of(st.integers(0, 10), st.integers(10, 10**9)),
    st.one_of(st.integers(-3, -1), st.floats(0, 5), SCALARS),
    weight=10,
)
SEED = mostly(
    st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    st.one_of(st.integers(-(2**70), -1), st.integers(2**63, 2**70), st.floats(0, 10), SCALARS),
    weight=10,
)


def sampling_errors(max_new_tokens, temperature, top_p, top_k, seed) -> list[str]:
    """Which sampling arguments are invalid, by the documented rules."""
    bad = []
    if not _valid_int(max_new_tokens, 1):
        bad.append("max_new_tokens")
    if not (_valid_number(temperature) and (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE)):
        bad.append("temperature")
    if not (_valid_number(top_p) and 0 < top_p <= 1):
        bad.append("top_p")
    if not _valid_int(top_k, 0):
        bad.append("top_k")
    if seed is not None and not (_valid_int(seed, 0) and seed < 2**63):
        bad.append("seed")
    return bad


@fuzz(300)
@given(
    engine_name=ENGINE_NAMES,
    max_new_tokens=MAX_NEW_TOKENS,
    temperature=TEMPERATURE,
    top_p=TOP_P,
    top_k=TOP_K,
    seed=SEED,
)
def test_sampling_arguments(engines, engine_name, max_new_tokens, temperature, top_p, top_k, seed):
    """Valid sampling arguments generate; invalid ones raise naming one of the invalid arguments."""
    bad = sampling_errors(max_new_tokens, temperature, top_p, top_k, seed)
    outcome = expect_named_error(
        lambda: engines[engine_name].generate(
            "The vault code is 48213. What is the vault code?",
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
        ),
        bad or ["<no error expected>"],
    )
    if bad:
        assert isinstance(outcome, (ValueError, TypeError)), f"accepted invalid {bad}"
    else:
        check_result(outcome, max_new_tokens)


# ---------------------------------------------------------------- 3. prompts and messages

PROMPT_NAMES = ["prompt", "messages", "context window", "query"]


@fuzz(300)
@given(
    engine_name=ENGINE_NAMES,
    text=TEXT,
    mode=st.sampled_from(["prompt", "user", "system+user", "turns"]),
    max_new_tokens=st.integers(1, 3),
)
def test_any_text_as_prompt_or_messages(engines, tokenizer, engine_name, text, mode, max_new_tokens):
    """Unicode of every plane, right-to-left text, emoji, NUL and control characters, whitespace-only and huge
    token-less strings: generation works, or fails naming the prompt (empty, or longer than the window)."""
    if mode == "prompt":
        kwargs = {"prompt": text}
    elif mode == "user":
        kwargs = {"messages": [{"role": "user", "content": text}]}
    elif mode == "system+user":
        kwargs = {"messages": [{"role": "system", "content": text}, {"role": "user", "content": "Answer: " + text}]}
    else:
        kwargs = {
            "messages": [
                {"role": "user", "content": text},
                {"role": "assistant", "content": text},
                {"role": "user", "content": "and?"},
            ]
        }
    outcome = expect_named_error(
        lambda: engines[engine_name].generate(**kwargs, max_new_tokens=max_new_tokens), PROMPT_NAMES
    )
    if mode == "prompt" and not text.strip():
        assert isinstance(outcome, ValueError) and "prompt is empty" in str(outcome)
        return
    if isinstance(outcome, Exception):
        # The only other refusal: more tokens than the 512-position window.
        assert "context window is 512" in str(outcome), outcome
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) > WINDOW // 4
        return
    check_result(outcome, max_new_tokens)
    if mode == "prompt":
        assert outcome.prompt_text == text


@fuzz(250)
@given(
    engine_name=ENGINE_NAMES,
    query=st.one_of(
        st.none(),
        TEXT,
        st.sampled_from(["vault code", QUESTION, " ? "]),
        st.integers(),
        st.lists(st.text(max_size=3), max_size=2),
        st.binary(max_size=4),
    ),
    as_messages=st.booleans(),
)
def test_any_query(engines, engine_name, query, as_messages):
    """A query (seed of selection, never pruned) of any text works, or fails naming `query` (not a non-empty str,
    or too long to be a probe), or the window (a probe past 512 positions)."""
    text = "Context:\n" + "\n\n".join(PASSAGES) + f"\n\nQuestion: {QUESTION}"
    prompt = {"messages": [{"role": "user", "content": text}]} if as_messages else {"prompt": text}
    outcome = expect_named_error(
        lambda: engines[engine_name].generate(**prompt, query=query, max_new_tokens=1), ["query", "context window"]
    )
    valid = query is None or isinstance(query, str) and query.strip()
    if not valid and engine_name != "full":  # "full" ignores the query: see test_full_method_checks_the_query
        assert isinstance(outcome, (ValueError, TypeError)) and "query" in str(outcome)
    elif not isinstance(outcome, Exception):
        check_result(outcome, 1)


# ---------------------------------------------------------------- 4. documents


class Node:
    """Anything with `get_content()` (LlamaIndex's node interface)."""

    def __init__(self, text):
        self.text = text

    def get_content(self):
        return self.text


def _document_items(passages):
    exact = st.sampled_from(passages)
    found = st.one_of(
        exact,
        exact,
        exact,
        exact.map(lambda p: p[: max(1, len(p) // 2)]),  # a prefix: overlaps the passage
        exact.map(lambda p: p[len(p) // 3 : 2 * len(p) // 3 + 1]),  # a middle slice
        exact.map(lambda p: f"  {p}\n"),  # padded with whitespace (stripped to find it)
    )
    wrong = st.one_of(
        # Framework objects: the adapters turn them into texts; the engine takes them, or refuses naming documents.
        exact.map(lambda p: Document(page_content=p)),
        exact.map(lambda p: TextNode(text=p)),
        exact.map(Node),
        st.sampled_from(["", "   ", "\n", "not in the prompt", "Question", "\x00"]),
        ANY_TEXT,
        st.one_of(
            st.none(),
            st.integers(),
            st.binary(max_size=3),
            st.just({"text": "x"}),
            st.just(["nested"]),
            st.just(Node(5)),
        ),
    )
    return mostly(found, wrong, weight=8)


@fuzz(300)
@given(
    data=st.data(),
    engine_name=st.sampled_from(["token", "chunk", "sentence", "gemfilter", "full"]),
    span_document=st.booleans(),
)
def test_any_documents(engines, data, engine_name, span_document):
    """Missing, duplicated, overlapping, empty or non-str documents, in any container: generation works (each named
    document gets a retention share), or fails naming `documents`."""
    passages = data.draw(
        st.lists(st.sampled_from(PASSAGES + ["Short one.", "A second short one."]), min_size=1, max_size=4, unique=True)
    )
    prompt = "Context:\n" + "\n\n".join(passages) + f"\n\nQuestion: {QUESTION}"
    documents = data.draw(
        st.one_of(
            st.lists(_document_items(passages), min_size=1, max_size=5),
            st.lists(_document_items(passages), min_size=1, max_size=5),
            st.lists(_document_items(passages), max_size=3).map(tuple),
            st.permutations(passages),
            st.just(passages),
            st.just(passages + passages[:1]),
            st.sampled_from(passages),
            st.integers(),
            st.just({"a": "b"}),  # not a list
        )
    )
    engine = engines[engine_name]
    if span_document:
        engine = engine.with_config(engine.config.replace(span="document"))
    outcome = expect_named_error(lambda: engine.generate(prompt, documents=documents, max_new_tokens=1), ["documents"])
    if not isinstance(documents, (list, tuple)):
        assert isinstance(outcome, TypeError) and "documents" in str(outcome)
    elif (
        documents
        and all(isinstance(d, str) for d in documents)
        and sorted(documents) == sorted(set(documents))
        and set(documents) <= set(passages)
    ):
        # Distinct retrieved texts exactly as inserted, in any order: always located.
        assert not isinstance(outcome, Exception), outcome
    if not isinstance(outcome, Exception):
        check_result(outcome, 1, documents)
        assert outcome.context_source == ("none" if engine.config.method == "full" else "documents")


# ---------------------------------------------------------------- 5. stop lists

STOP_TEXT = st.one_of(
    st.sampled_from(["", " ", "e", "a", "\n", ".", "the", "😀", "\x00", "é", "\u200f"]),
    st.text(st.characters(codec="utf-8"), max_size=3),
)
STOP = st.one_of(
    st.none(),
    STOP_TEXT,
    st.lists(STOP_TEXT, max_size=4),
    st.lists(STOP_TEXT, max_size=3).map(tuple),
    st.integers(),
    st.lists(st.one_of(STOP_TEXT, st.integers(), st.none()), min_size=1, max_size=3),
    st.sets(STOP_TEXT, max_size=2),
    st.just([["nested"]]),
    st.binary(max_size=2),
)


def stop_valid(stop) -> bool:
    if stop is None:
        return True
    if isinstance(stop, str):
        return bool(stop)
    return isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop)


@fuzz(120)  # stop strings cost ~0.2 s a call (transformers' StopStringCriteria scans the vocabulary)
@given(engine_name=ENGINE_NAMES, stop=STOP, max_new_tokens=st.integers(1, 3), temperature=st.sampled_from([0, 1.5]))
def test_any_stop(engines, engine_name, stop, max_new_tokens, temperature):
    """Valid stop lists are honoured (no stop string survives in the text); invalid ones raise naming `stop`."""
    outcome = expect_named_error(
        lambda: engines[engine_name].generate(
            "Say something about foxes.", stop=stop, max_new_tokens=max_new_tokens, temperature=temperature, seed=0
        ),
        ["stop"],
    )
    if not stop_valid(stop):
        assert isinstance(outcome, (ValueError, TypeError)), f"accepted stop={stop!r}"
        return
    check_result(outcome, max_new_tokens)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    assert not any(s in outcome.text for s in stops), (stops, outcome.text)


# ---------------------------------------------------------------- 6. input_ids

ID = st.integers(0, VOCAB - 1)
ANY_ID = st.one_of(ID, st.integers(-5, -1), st.integers(VOCAB, VOCAB + 100), st.integers(2**31, 2**70))
NOT_ID = st.one_of(
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=2),
    st.lists(ID, max_size=2),
    st.just(torch.tensor(5)),
    st.just(np.int64(7)),
)
DTYPES = {
    "int64": (torch.int64, np.int64),
    "int32": (torch.int32, np.int32),
    "int16": (torch.int16, np.int16),
    "uint8": (torch.uint8, np.uint8),
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bool": (torch.bool, np.bool_),
}


@st.composite
def arrays(draw):
    """(array, valid) for tensors and NumPy arrays of random shapes and dtypes."""
    dtype = draw(mostly(st.sampled_from(["int64", "int32"]), st.sampled_from(sorted(DTYPES)), weight=2))
    n = draw(st.integers(0, 10))
    shape = draw(mostly(st.sampled_from([(n,), (1, n)]), st.sampled_from([(2, n), (1, 1, n), (n, 1), ()]), weight=2))
    high = {"int16": 2**15 - 1, "uint8": 255, "bool": 1}.get(dtype, VOCAB + 50)
    low = 0 if dtype in ("uint8", "bool") else -3
    value = mostly(st.integers(0, min(high, VOCAB - 1)), st.integers(low, high), weight=10)
    values = np.array(
        draw(st.lists(value, min_size=math.prod(shape), max_size=math.prod(shape))), dtype=np.int64
    ).reshape(shape)
    torch_dtype, numpy_dtype = DTYPES[dtype]
    if draw(st.booleans()):
        array = torch.tensor(values).to(torch_dtype)
    else:
        array = values.astype(numpy_dtype)
    flat = values.reshape(-1)
    valid = (
        dtype.startswith(("int", "uint"))
        and (len(shape) == 1 or shape[:1] == (1,) and len(shape) == 2)
        and flat.size > 0
        and bool(((flat >= 0) & (flat < VOCAB)).all())
    )
    return array, valid


@st.composite
def id_lists(draw):
    """(ids, valid) for lists and tuples of ints, with out-of-range ids or non-ints mixed in."""
    ids = draw(
        mostly(
            st.lists(ID, min_size=1, max_size=12),
            st.lists(mostly(ID, st.one_of(ANY_ID, NOT_ID), weight=3), max_size=12),
            weight=2,
        )
    )
    if draw(st.booleans()):
        ids = tuple(ids)
    valid = bool(ids) and all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < VOCAB for i in ids
    )
    return ids, valid


@fuzz(400)
@given(
    engine_name=ENGINE_NAMES,
    case=st.one_of(
        arrays(),
        id_lists(),
        st.tuples(st.one_of(st.text(max_size=3), st.integers(), st.just({"input_ids": [5]})), st.just(False)),
    ),
    with_query=st.booleans(),
)
def test_any_input_ids(engines, engine_name, case, with_query):
    """Valid token ids generate (one prompt token per id); anything else raises naming `input_ids` before any model
    work (`stream` returns before the model runs)."""
    input_ids, valid = case
    query = "vault code" if with_query else None
    outcome = expect_named_error(
        lambda: engines[engine_name].stream(input_ids=input_ids, query=query, max_new_tokens=1), ["input_ids"]
    )
    if not valid:
        assert isinstance(outcome, (ValueError, TypeError)), f"accepted input_ids={input_ids!r}"
        return
    assert not isinstance(outcome, Exception), outcome
    for _ in outcome:
        pass
    check_result(outcome.result, 1)
    assert outcome.result.prompt_tokens == len(np.asarray(input_ids).reshape(-1))


# ---------------------------------------------------------------- 7. adapter keyword arguments

NAME = st.from_regex(r"\A[a-z][a-z0-9_]{0,18}\Z")


def _accepted(cls) -> set[str]:
    return {*cls.model_fields, "max_new_tokens", "max_tokens", "model_name", "class_name"}


@fuzz(300)
@given(name=NAME, value=st.one_of(st.integers(), st.text(max_size=3), st.none()))
def test_unknown_keyword_arguments_are_named(name, value):
    """Any keyword that is not an argument raises TypeError naming it, in all three constructors and per call."""
    for cls in (ChatPromptDistill, LangChainLLM, LlamaIndexLLM):
        if name in _accepted(cls):
            continue
        with pytest.raises(TypeError) as error:
            cls(**{name: value})
        assert f"unexpected keyword argument {name!r}" in str(error.value)
    llm = ChatPromptDistill()
    if name not in (
        "pd_query",
        "pd_documents",
        "model",
        "temperature",
        "max_tokens",
        "max_new_tokens",
        "top_p",
        "top_k",
        "seed",
        "stream",
    ):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
            llm.resolve_call({name: value})
    if name not in (
        "pd_query",
        "pd_documents",
        "max_new_tokens",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
    ):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
            LlamaIndexLLM().resolve_call({name: value})


# ---------------------------------------------------------------- counterexamples, kept as explicit tests


def test_documents_as_a_tuple(engine):
    result = engine.generate(
        "Context:\n" + "\n\n".join(PASSAGES[:2]), max_new_tokens=1, documents=(PASSAGES[1], PASSAGES[0])
    )
    assert result.context_source == "documents" and len(result.document_retention) == 2


def test_huge_token_less_prompt_names_the_window(engine):
    with pytest.raises(ValueError, match=r"the prompt has \d+ tokens .* context window is 512"):
        engine.generate("😀" * 3000, max_new_tokens=1)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate("\u3000" * 3000, max_new_tokens=1)


def test_nul_and_control_characters_generate(engine):
    for text in ("\x00", "abc\x00def", "\x01\x02\x1b[31m", "\r\nx\t\x0b\x0c", "\u202e\u2066evil\u2069", "\x7f\x85"):
        check_result(engine.generate(text, max_new_tokens=2), 2)
        check_result(engine.generate(messages=[{"role": "user", "content": text}], max_new_tokens=2), 2)


def test_heads_that_are_not_lists_name_heads():
    """Found by fuzzing config fields: `heads=5` raised `TypeError: 'int' object is not iterable`."""
    for heads in (5, "01", [3, 4], [[0], 1]):
        with pytest.raises(ValueError, match="heads must be a list with one entry"):
            PromptDistillConfig(heads=heads)


def test_empty_budgets_name_budgets():
    """Found by fuzzing config fields: `budgets=[]` was accepted, then failed at first use with a stage mismatch."""
    with pytest.raises(ValueError, match="budgets must be one or more"):
        PromptDistillConfig(budgets=[])


def test_input_ids_counterexamples(engine):
    """Found before the input_ids checks: floats (TypeError from `range`-like code), nested lists (AttributeError
    deep in span units), negative ids (OverflowError in the tokenizer), ids >= vocab (IndexError in the embedding),
    batches and 3-D tensors (silently flattened into one prompt)."""
    for ids, error in (
        ([1.0, 2.0], TypeError),
        ([[5, 6, 7]], TypeError),
        ([5, -1, 7], ValueError),
        ([5, 60000, 7], ValueError),
        (torch.tensor([[5, 6, 7], [5, 6, 7]]), ValueError),
        (torch.tensor([[[5, 6, 7]]]), ValueError),
        (torch.tensor([5.0, 6.0]), TypeError),
    ):
        with pytest.raises(error, match="input_ids"):
            engine.stream(input_ids=ids)


def test_nan_temperature_is_refused(engine):
    with pytest.raises(ValueError, match="temperature"):
        engine.stream("Hello", temperature=float("nan"), max_new_tokens=1)


def test_tiny_temperature_is_refused(engine):
    # Below MIN_TEMPERATURE, logits / temperature overflow to inf and sampling would fail inside torch.
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or a number in"):
        engine.stream("Hello", temperature=1e-300, max_new_tokens=2, seed=0)


def test_int_temperature_samples(engine):
    result = engine.generate("Hello", temperature=1, seed=0, max_new_tokens=2)
    assert result.text == engine.generate("Hello", temperature=1.0, seed=0, max_new_tokens=2).text


def test_huge_seed_names_seed(engine):
    with pytest.raises(ValueError, match="seed"):
        engine.stream("Hello", temperature=1.0, seed=2**70, max_new_tokens=1)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"prompt": "a\ud800b"}, "prompt"),
        ({"messages": [{"role": "user", "content": "a\udc00"}]}, "messages"),
        ({"prompt": "The vault code is 48213.", "query": "\ud800 code"}, "query"),
    ],
)
def test_lone_surrogates_name_the_parameter(engine, kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        engine.stream(**kwargs, max_new_tokens=1)


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": 5},
        {"role": "user", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": 3, "content": "hi"},
        {"role": None, "content": "hi"},
    ],
)
def test_non_str_message_fields_name_messages(engine, message):
    with pytest.raises((ValueError, TypeError), match="messages"):
        engine.stream(messages=[message], max_new_tokens=1)


@pytest.mark.parametrize("query", ["", "   ", 5])
def test_full_method_checks_the_query(engines, query):
    with pytest.raises(ValueError, match="query must be a non-empty str"):
        engines["full"].stream("The vault code is 48213. What is it?", query=query, max_new_tokens=1)


def test_documents_cannot_make_template_tokens_prunable(tiny):
    engine = PromptDistillEngine(
        tiny.model,
        tiny.tokenizer,
        PromptDistillConfig(selection_layers=(1,), budgets=(1,), span="token", protect_head=0),
    )
    content = "alpha beta gamma delta epsilon zeta eta theta"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    special = set(tiny.tokenizer.all_special_ids)
    try:
        result = engine.generate(
            messages=messages, documents=["<|im_end|>\n<|im_start|>user\n" + content], max_new_tokens=1
        )
    except ValueError as error:
        assert "documents" in str(error)
        return
    ids = tiny.tokenizer(result.prompt_text, add_special_tokens=False)["input_ids"]
    pruned = [i for i, token in enumerate(ids) if token in special and i not in result.kept_token_indices]
    assert pruned == []
