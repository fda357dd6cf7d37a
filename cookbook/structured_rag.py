"""Retrieval-augmented answers as objects: a `CitedAnswer(answer, sources)` whose sources are the ids of the
retrieved documents it used, generated under the object's JSON schema so it parses every time, with the retrieved
context pruned inside the model.

    python cookbook/structured_rag.py [--k 6] [--budget 0.5] [--question "..."]

Runs offline on the embedded default model. The knowledge base is a team handbook of short notes; a word-overlap
retriever picks the top k, each shown to the model with its id. `DistillPrompt` tells `ChatPromptDistill` which
text is the retrieved context, so only the documents are pruned (to `--budget` of their tokens) while the
instructions and the question always stay. The script prints the `CitedAnswer` and, per retrieved document, the
share PromptDistill kept and whether the answer cites it.
"""

from __future__ import annotations

import argparse
import re
from typing import Literal

from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from pydantic import BaseModel, Field, create_model

from pd_integrations.langchain import ChatPromptDistill, DistillPrompt

HANDBOOK = [
    "Releases are cut from the main branch every second Tuesday.",
    "The release manager for the current quarter is Tomasz Wielgus, who signs the release tags.",
    "The on-call engineer carries the pager for one week, starting Monday at 09:00.",
    "Every change needs one approving review; payment-service changes also need a payments-team review.",
    "The team formats Python code with ruff and a line length of 100 characters.",
    "A new third-party dependency must be approved at the architecture review, held every Thursday.",
    "Unit tests must finish in under a minute on a laptop; slower tests run nightly.",
    "Travel expenses above 500 euros are approved by the head of finance, Ana Ribeiro.",
    "The office in Porto opens at 08:00 and closes at 19:00 on weekdays.",
    "Security incidents are reported in the incident channel and to security@example.org within one hour.",
    "The changelog is written by the release manager and published with each release.",
    "New hires get a laptop and a mentor on their first day.",
]
QUESTION = "Who signs the release tags, and how often are releases cut?"

PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer from the numbered documents only, and cite the ids of the documents you used."),
        ("human", "Documents:\n\n{context}\n\nQuestion: {question}"),
    ]
)


class CitedAnswer(BaseModel):
    """An answer to the question, with the ids of the documents that support it."""

    answer: str = Field(description="the answer, in one sentence")
    sources: list[int] = Field(max_length=3, description="ids of the documents the answer is based on")


def cited_answer_over(documents: list[Document]) -> type[CitedAnswer]:
    """`CitedAnswer` whose sources can only be the retrieved documents' ids: the bounds are part of the grammar, so
    the model cannot cite a document it was not given, nor count on through ids until max_tokens."""
    ids = tuple(document.metadata["id"] for document in documents)
    return create_model(
        "CitedAnswer",
        __base__=CitedAnswer,
        sources=(list[Literal[ids]], Field(max_length=3, description="ids of the documents the answer is based on")),
    )


def retrieve(question: str, k: int) -> list[Document]:
    """The `k` handbook notes sharing the most words with `question`, each prefixed with its id as "[id]"."""
    words = set(re.findall(r"\w+", question.lower()))
    ranked = sorted(range(len(HANDBOOK)), key=lambda i: -len(words & set(re.findall(r"\w+", HANDBOOK[i].lower()))))
    return [Document(f"[{i}] {HANDBOOK[i]}", metadata={"id": i}) for i in ranked[:k]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=6, help="documents retrieved")
    parser.add_argument("--budget", type=float, default=0.5, help="share of the documents' tokens kept")
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args()

    documents = retrieve(args.question, args.k)
    llm = ChatPromptDistill(budgets=(args.budget,), max_tokens=96)
    chain = (
        {"context": lambda _: documents, "question": RunnablePassthrough()}
        | DistillPrompt(prompt=PROMPT)
        | llm.with_structured_output(cited_answer_over(documents), include_raw=True)
    )
    out = chain.invoke(args.question)
    if out["parsing_error"] is not None:  # only when max_tokens cut the object off
        raise SystemExit(f"no answer: {out['parsing_error']}")
    answer: CitedAnswer = out["parsed"]
    stats = out["raw"].response_metadata["promptdistill"]
    print(repr(answer))
    print(
        f"\nkept {stats['kept_tokens']} of {stats['prompt_tokens']} prompt tokens "
        f"(context source: {stats['context_source']})"
    )
    print("\n id  kept  cited  document")
    for document, kept in zip(documents, stats["document_retention"]):
        cited = "yes" if document.metadata["id"] in answer.sources else ""
        print(f"{document.metadata['id']:>3}  {kept:4.0%}  {cited:>5}  {document.page_content[:70]}")


if __name__ == "__main__":
    main()
