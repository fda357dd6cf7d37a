"""The adapters tell the engine what the retrieved context and the question are, per input, with no rebinding:
LangChain chains through `DistillPrompt`, LlamaIndex query-engine templates through `context_str`/`context_msg`.
Only the context is pruned; the question, the instructions and earlier answers are kept whole."""

from __future__ import annotations

import pytest
from langchain_classic.chains import create_retrieval_chain
from langchain_classic.chains.combine_documents import create_stuff_documents_chain
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from llama_index.core import get_response_synthesizer
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import NodeWithScore, TextNode

from pd_integrations.langchain import ChatPromptDistill, DistillPrompt
from pd_integrations.llama_index import PromptDistillLLM, PromptDistillStatsHandler

from .test_layout import INSTRUCTION, PASSAGES, QUESTION, RAG_PROMPT, kept_share

SETTINGS = {"selection_layers": (1,), "budgets": 0.25, "max_tokens": 2}
OTHER_QUESTION = "Which form do claims over 385 euros from the Tallinn office need?"


def assert_only_context_pruned(stats: dict, protected: list[str]) -> None:
    assert stats["context_source"] == "template"
    assert {text: kept_share(stats, text) for text in protected} == {text: 1.0 for text in protected}
    assert stats["kept_prunable_tokens"] < stats["prunable_tokens"]
    assert stats["kept_tokens"] == stats["protected_tokens"] + stats["kept_prunable_tokens"]


class Recorder(BaseCallbackHandler):
    """Keeps the `promptdistill` metadata of every chat model response in a chain."""

    def __init__(self):
        self.stats: list[dict] = []

    def on_llm_end(self, response, **kwargs):
        self.stats.extend(g.message.response_metadata["promptdistill"] for gs in response.generations for g in gs)


def documents() -> list[Document]:
    return [Document(page_content=text) for text in PASSAGES]


QUESTION_FIRST = ChatPromptTemplate.from_messages(
    [("human", RAG_PROMPT + "\nQuestion: {question} \nContext: {context} \nAnswer:")]
)


def test_lcel_chain_carries_each_question_and_its_documents(tiny_model_dir):
    llm = ChatPromptDistill(model=tiny_model_dir, **SETTINGS)
    chain = (
        {"context": RunnableLambda(lambda _: documents()), "question": RunnablePassthrough()}
        | DistillPrompt(prompt=QUESTION_FIRST)
        | llm
    )
    messages = chain.batch([QUESTION, OTHER_QUESTION])
    for question, message in zip([QUESTION, OTHER_QUESTION], messages):
        stats = message.response_metadata["promptdistill"]
        assert_only_context_pruned(stats, [RAG_PROMPT, f"Question: {question}", "Answer:"])
        assert len(stats["document_retention"]) == len(PASSAGES)
    # Streaming carries the same per-input channel; the metadata arrives on the last chunk.
    chunks = list(chain.stream(QUESTION))
    streamed = [c.response_metadata["promptdistill"] for c in chunks if "promptdistill" in c.response_metadata]
    assert streamed[0]["kept_char_spans"] == messages[0].response_metadata["promptdistill"]["kept_char_spans"]


async def test_lcel_chain_carries_the_question_in_async_calls(tiny_model_dir):
    llm = ChatPromptDistill(model=tiny_model_dir, **SETTINGS)
    chain = (
        {"context": RunnableLambda(lambda _: documents()), "question": RunnablePassthrough()}
        | DistillPrompt(prompt=QUESTION_FIRST)
        | llm
    )
    message = await chain.ainvoke(OTHER_QUESTION)
    assert_only_context_pruned(message.response_metadata["promptdistill"], [f"Question: {OTHER_QUESTION}"])


def test_stuff_documents_chain_prunes_only_the_documents(tiny_model_dir):
    llm = ChatPromptDistill(model=tiny_model_dir, **SETTINGS)
    prompt = ChatPromptTemplate.from_messages([("system", INSTRUCTION + "\n\n{context}"), ("human", "{input}")])
    recorder = Recorder()
    chain = create_stuff_documents_chain(llm, DistillPrompt(prompt=prompt, question_key="input"))
    chain.invoke({"context": documents(), "input": QUESTION}, config={"callbacks": [recorder]})
    (stats,) = recorder.stats
    assert_only_context_pruned(stats, [INSTRUCTION, QUESTION])
    # The chain joined the documents itself; the prompt found each of them again.
    assert len(stats["document_retention"]) == len(PASSAGES)


class FixedRetriever(BaseRetriever):
    def _get_relevant_documents(self, query, *, run_manager):
        return documents()


def test_retrieval_chain_prunes_only_the_documents(tiny_model_dir):
    llm = ChatPromptDistill(model=tiny_model_dir, **SETTINGS)
    prompt = ChatPromptTemplate.from_messages([("system", INSTRUCTION + "\n\n{context}"), ("human", "{input}")])
    recorder = Recorder()
    chain = create_retrieval_chain(
        FixedRetriever(), create_stuff_documents_chain(llm, DistillPrompt(prompt=prompt, question_key="input"))
    )
    output = chain.invoke({"input": QUESTION}, config={"callbacks": [recorder]})
    assert len(output["context"]) == len(PASSAGES)
    assert_only_context_pruned(recorder.stats[0], [INSTRUCTION, QUESTION])


def test_distill_prompt_names_its_variables():
    with pytest.raises(ValueError, match="question_key='query' is not an input variable"):
        DistillPrompt(prompt=QUESTION_FIRST, question_key="query")
    with pytest.raises(TypeError, match="'context' input must be a str or a list of Documents"):
        DistillPrompt(prompt=QUESTION_FIRST).invoke({"question": QUESTION, "context": 3})
    # Formatted as a string, it equals the wrapped template's text.
    text_prompt = PromptTemplate.from_template("{context}\n\nQuestion: {question}")
    wrapped = DistillPrompt(prompt=text_prompt)
    assert wrapped.format(context=documents()[:2], question=QUESTION) == text_prompt.format(
        context="\n\n".join(PASSAGES[:2]), question=QUESTION
    )


@pytest.mark.parametrize("mode, calls", [("compact", 1), ("tree_summarize", 1), ("refine", len(PASSAGES))])
def test_llama_index_synthesizers_prune_only_the_nodes(tiny_model_dir, mode, calls):
    """Text-QA (compact), tree-summarize and refine templates: each LLM call prunes only its `context_str` or
    `context_msg`, and keeps the query and, in refine, the existing answer."""
    handler = PromptDistillStatsHandler()
    llm = PromptDistillLLM(
        model=tiny_model_dir,
        selection_layers=(1,),
        budgets=0.25,
        max_new_tokens=2,
        callback_manager=CallbackManager([handler]),
    )
    synthesizer = get_response_synthesizer(llm=llm, response_mode=mode, callback_manager=CallbackManager([handler]))
    nodes = [NodeWithScore(node=TextNode(text=text), score=1.0) for text in PASSAGES]
    synthesizer.synthesize(QUESTION, nodes=nodes)
    assert len(handler.calls) == calls
    for stats in handler.calls:
        assert_only_context_pruned(stats, [QUESTION])
    if mode == "refine":
        # A refine step prunes only its one passage (`context_msg`); the existing answer is kept.
        refine = handler.calls[1]
        passage_tokens = len(llm.engine.tokenizer(PASSAGES[1], add_special_tokens=False)["input_ids"])
        assert refine["prunable_tokens"] == passage_tokens
        assert kept_share(refine, "existing answer") == 1.0
