"""Per-call PromptDistill settings and changed settings in both adapters: `invoke(..., method="full")`,
`.bind(budgets=...)`, `complete(prompt, method=...)`, `model_copy(update=...)` and attribute assignment each take
effect (what was kept changes) or raise, checked as the constructor checks them; and the stats handlers record
every path, chains that end in a parser and structured calls included.

Generation runs a tiny random Llama saved with the default model's tokenizer, so each call takes milliseconds.
"""

from __future__ import annotations

import math

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from llama_index.core.bridge.pydantic import BaseModel
from llama_index.core.callbacks import CallbackManager
from llama_index.core.prompts import PromptTemplate
from pydantic import ValidationError

from pd_integrations.langchain import ChatPromptDistill, PromptDistillLLM, PromptDistillStatsHandler
from pd_integrations.llama_index import PromptDistillLLM as LlamaIndexLLM
from pd_integrations.llama_index import PromptDistillStatsHandler as LlamaIndexStatsHandler

from .test_langchain import CONTEXT, DOCUMENTS, QUESTION

PROMPT = f"Answer the question using only these documents.\n\n{CONTEXT}\n\nQuestion: {QUESTION}"
MESSAGES = [HumanMessage(PROMPT)]
# Token-level selection at the tiny model's layer 2, keeping 64 of the ~600 context tokens.
PRUNING = {"selection_layers": (2,), "budgets": (64,), "span": "token", "max_tokens": 3}
LANGCHAIN_CLASSES = (ChatPromptDistill, PromptDistillLLM)


def kept(output) -> dict:
    """The `promptdistill` stats of a LangChain message or LlamaIndex response."""
    if hasattr(output, "response_metadata"):
        return output.response_metadata["promptdistill"]
    return output.additional_kwargs["promptdistill"]


def lc_stats(llm, **kwargs) -> dict:
    """Stats of one LangChain call (chat messages or the raw prompt), read through the stats handler."""
    handler = PromptDistillStatsHandler()
    llm.invoke(MESSAGES if isinstance(llm, ChatPromptDistill) else PROMPT, config={"callbacks": [handler]}, **kwargs)
    (call,) = handler.calls
    return call


def pruned(stats: dict) -> bool:
    return stats["kept_tokens"] < stats["prompt_tokens"]


@pytest.mark.parametrize("cls", LANGCHAIN_CLASSES)
def test_langchain_per_call_method_and_budgets_change_what_is_kept(cls, tiny_model_dir):
    llm = cls(model=tiny_model_dir, **PRUNING)
    base = lc_stats(llm)
    assert pruned(base) and base["kept_prunable_tokens"] == 64
    full = lc_stats(llm, method="full")
    assert full["method"] == "full" and full["kept_tokens"] == full["prompt_tokens"]
    quarter = lc_stats(llm, budgets=(0.25,))
    assert quarter["kept_prunable_tokens"] == math.ceil(0.25 * quarter["prunable_tokens"]) != 64
    assert lc_stats(llm.bind(method="full"))["method"] == "full"
    assert lc_stats(llm.bind(budgets=32))["kept_prunable_tokens"] == 32
    assert lc_stats(llm)["kept_prunable_tokens"] == 64  # a call's options leave the model's own alone


def test_langchain_full_per_call_equals_a_full_model(tiny_model_dir):
    per_call = ChatPromptDistill(model=tiny_model_dir, **PRUNING).invoke(MESSAGES, method="full")
    constructed = ChatPromptDistill(model=tiny_model_dir, **{**PRUNING, "method": "full"}).invoke(MESSAGES)
    assert per_call.content == constructed.content


@pytest.mark.parametrize("cls", LANGCHAIN_CLASSES)
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budgets": 0}, "budgets"),
        ({"method": "magic"}, "method"),
        ({"span": "para"}, "span"),
        ({"selection_layers": (9,)}, "layer"),
    ],
)
def test_langchain_bad_per_call_settings_raise_naming_them(cls, tiny_model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(model=tiny_model_dir, **PRUNING).invoke(PROMPT, **kwargs)


@pytest.mark.parametrize("cls", (*LANGCHAIN_CLASSES, LlamaIndexLLM))
def test_changed_settings_take_effect_or_raise(cls, tiny_model_dir):
    llm = cls(model=tiny_model_dir, **PRUNING)  # LlamaIndex's PromptDistillLLM takes max_tokens as an alias
    stats = lc_stats if cls is not LlamaIndexLLM else (lambda model: kept(model.complete(PROMPT)))
    assert stats(llm.model_copy(update={"method": "full"}))["method"] == "full"
    assert stats(llm.model_copy(update={"budgets": 128}))["kept_prunable_tokens"] == 128
    assert stats(llm)["kept_prunable_tokens"] == 64  # the copies changed, not the original
    llm.budgets = 16
    assert llm.budgets == (16,) and stats(llm)["kept_prunable_tokens"] == 16
    llm.method = "full"
    assert stats(llm)["kept_tokens"] == stats(llm)["prompt_tokens"]
    with pytest.raises(ValidationError, match="budgets"):
        llm.budgets = 0
    with pytest.raises(ValidationError, match="method"):
        llm.model_copy(update={"method": "magic"})
    with pytest.raises(TypeError, match="did you mean 'budgets'"):
        llm.model_copy(update={"budget": 16})


def test_llama_index_per_call_settings(tiny_model_dir):
    llm = LlamaIndexLLM(model=tiny_model_dir, selection_layers=(2,), budgets=(64,), span="token", max_new_tokens=3)
    assert kept(llm.complete(PROMPT))["kept_prunable_tokens"] == 64
    full = kept(llm.complete(PROMPT, method="full"))
    assert full["method"] == "full" and full["kept_tokens"] == full["prompt_tokens"]
    quarter = kept(llm.complete(PROMPT, budgets=(0.25,)))
    assert quarter["kept_prunable_tokens"] == math.ceil(0.25 * quarter["prunable_tokens"])
    assert kept(list(llm.stream_complete(PROMPT, budgets=32))[-1])["kept_prunable_tokens"] == 32
    with pytest.raises(ValueError, match="budgets"):
        llm.complete(PROMPT, budgets=0)


# ---------------------------------------------------------------- stats handlers


def test_langchain_handler_records_a_chain_that_ends_in_a_parser(tiny_model_dir):
    handler = PromptDistillStatsHandler()
    prompt = ChatPromptTemplate.from_messages([("human", "{context}\n\nQuestion: {question}")])
    chain = prompt | ChatPromptDistill(model=tiny_model_dir, **PRUNING) | StrOutputParser()
    text = chain.invoke({"context": CONTEXT, "question": QUESTION}, config={"callbacks": [handler]})
    assert isinstance(text, str)
    (call,) = handler.calls
    assert pruned(call) and call["context_source"] == "heuristic" and call["call_seconds"] >= call["prefill_seconds"]
    assert call["model_name"] == tiny_model_dir
    list(chain.stream({"context": CONTEXT, "question": QUESTION}, config={"callbacks": [handler]}))
    assert len(handler.calls) == 2 and handler.calls[1]["kept_tokens"] == call["kept_tokens"]


def test_langchain_handler_records_document_retention_and_every_batch_prompt(tiny_model_dir):
    handler = PromptDistillStatsHandler()
    llm = PromptDistillLLM(model=tiny_model_dir, **PRUNING, callbacks=[handler])
    llm.invoke(PROMPT, pd_documents=DOCUMENTS, pd_query=QUESTION)
    assert handler.calls[0]["context_source"] == "documents"
    assert len(handler.calls[0]["document_retention"]) == len(DOCUMENTS)
    handler.reset()
    llm.batch([PROMPT, PROMPT[:2000]])
    assert len(handler.calls) == 2


class Answer(BaseModel):
    found: bool  # short under any model: the grammar leaves only true or false


def test_llama_index_handler_records_structured_calls(tiny_model_dir):
    handler = LlamaIndexStatsHandler()
    llm = LlamaIndexLLM(
        model=tiny_model_dir,
        selection_layers=(2,),
        budgets=(64,),
        span="token",
        max_new_tokens=24,
        callback_manager=CallbackManager([handler]),
    )
    template = PromptTemplate("{context_str}\n\nQuery: {query_str}\nAnswer: ")
    llm.structured_predict(Answer, template, context_str=CONTEXT, query_str=QUESTION)
    (call,) = handler.calls
    assert call["context_source"] == "template" and pruned(call) and call["call_seconds"] > 0
    llm.as_structured_llm(Answer).complete(PROMPT)
    assert len(handler.calls) == 2 and handler.calls[1]["context_source"] == "heuristic"


def test_engine_documents_take_langchain_documents_and_llama_index_nodes(tiny_model_dir):
    from langchain_core.documents import Document
    from llama_index.core.schema import NodeWithScore, TextNode

    from pd_integrations import PromptDistillConfig, PromptDistillEngine

    engine = PromptDistillEngine.from_pretrained(
        tiny_model_dir, PromptDistillConfig(**{k: v for k, v in PRUNING.items() if k != "max_tokens"})
    )
    as_texts = engine.generate(PROMPT, documents=DOCUMENTS, max_new_tokens=2)
    for documents in (
        [Document(page_content=d) for d in DOCUMENTS],
        [TextNode(text=d) for d in DOCUMENTS[:6]]
        + [NodeWithScore(node=TextNode(text=d), score=0.5) for d in DOCUMENTS[6:]],
    ):
        result = engine.generate(PROMPT, documents=documents, max_new_tokens=2)
        assert result.context_source == "documents"
        assert (result.kept_token_indices, result.document_retention) == (
            as_texts.kept_token_indices,
            as_texts.document_retention,
        )
    with pytest.raises(TypeError, match="documents must be a list of str .* got an item of type int"):
        engine.generate(PROMPT, documents=[3])
