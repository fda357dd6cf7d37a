"""ChatPromptDistill and PromptDistillLLM in LangChain: RAG chains answered from pruned context, the query channel,
streaming, stop sequences, callbacks, usage, batching, concurrency and argument checking.

Everything runs the embedded default model (SmolLM2-135M-Instruct) on prompts of at most ~600 tokens, decoding
greedily, so outputs are deterministic and the facts asked for are ones this small model retrieves reliably.
"""

from __future__ import annotations

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import (
    AIMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate

from pd_integrations import PromptDistillConfig
from pd_integrations.langchain import ChatPromptDistill, PromptDistillLLM
from pd_integrations.langchain.chat_models import to_engine_messages
from pd_integrations.loading import ModelNotAvailableError

# Retrieved documents as a stuff-documents chain joins them; the one at FACT holds the answer.
DOCUMENTS = [
    "The Amazon rainforest spans nine countries and produces a large share of the world's oxygen through "
    "photosynthesis. Its rivers carry more water than any other river system on Earth, and thousands of species of "
    "fish live in them.",
    "Mount Everest rises 8,849 metres above sea level on the border between Nepal and China. Climbers usually "
    "attempt the summit in May, when the jet stream moves north and the winds on the peak briefly calm down.",
    "The Great Barrier Reef lies off the coast of Queensland in Australia. It is the largest coral reef system in "
    "the world and can be seen from space. Rising sea temperatures have caused several mass bleaching events.",
    "Honey never spoils when it is stored in a sealed jar. Archaeologists have found pots of honey in ancient "
    "Egyptian tombs that were thousands of years old and still perfectly edible, because honey is low in water and "
    "acidic.",
    "Octopuses have three hearts and blue blood. Two hearts pump blood through the gills, while the third pumps it "
    "through the rest of the body. Their blood uses copper rather than iron to carry oxygen.",
    "The Sahara desert covers most of North Africa and is roughly the size of the United States. Despite its "
    "reputation for heat, temperatures at night can fall below freezing in the winter months.",
    "Bamboo is among the fastest-growing plants on Earth; some species grow almost a metre in a single day. It is a "
    "grass rather than a tree, and giant pandas eat it for up to fourteen hours every day.",
    "The lighthouse keeper of Port Elwin is a woman named Marguerite Okafor, who has tended the lamp for twenty-two "
    "years. She logs every passing ship in a leather book and repaints the tower each spring.",
    "Venus spins so slowly that a day there lasts longer than its year. Its thick clouds of sulphuric acid trap "
    "heat, making it the hottest planet in the solar system, hotter even than Mercury.",
    "The violin maker Antonio Stradivari built about eleven hundred instruments in Cremona, Italy. Around six "
    "hundred and fifty survive today, and the best of them sell for millions of dollars at auction.",
    "Tardigrades are microscopic animals that can survive boiling, freezing, radiation and even the vacuum of "
    "space. They do this by drying out and entering a state in which their metabolism almost stops.",
    "The Trans-Siberian Railway links Moscow with Vladivostok on the Pacific coast. The journey covers more than "
    "nine thousand kilometres, crosses seven time zones and takes about a week without stops.",
]
CONTEXT = "\n\n".join(DOCUMENTS)
QUESTION = "Who is the lighthouse keeper of Port Elwin?"
ANSWER = "Marguerite Okafor"
RAG_INPUT = {"context": CONTEXT, "question": QUESTION}

# The default profile keeps 1024 context tokens, more than these ~600-token prompts hold; 192 forces pruning.
PRUNING = {"selection_layers": (14,), "budgets": (192,)}

# The classic stuff-documents shape: context first, the question at the tail.
QUESTION_LAST = ChatPromptTemplate.from_messages(
    [("human", "Answer the question using only these documents.\n\n{context}\n\nQuestion: {question}")]
)
# The rlm/rag-prompt shape: the question before the context.
QUESTION_FIRST = ChatPromptTemplate.from_messages(
    [
        (
            "human",
            "You are an assistant for question-answering tasks. Use the following pieces of retrieved context to "
            "answer "
            "the question. If you don't know the answer, just say that you don't know. Use three sentences maximum and "
            "keep the answer concise.\nQuestion: {question} \nContext: {context} \nAnswer:",
        )
    ]
)

COUNTRIES = [
    "France",
    "Japan",
    "Kenya",
    "Peru",
    "Canada",
    "Norway",
    "Egypt",
    "India",
    "Mexico",
    "Italy",
    "Chile",
    "Spain",
    "Greece",
    "Brazil",
    "Turkey",
    "Vietnam",
]
SHORT_PROMPTS = [
    "The capital of France is",
    "Q: What color is the sky?\nA:",
    "The largest planet in our solar system is",
]


class Recorder(BaseCallbackHandler):
    """Records the streamed tokens and the final results of the model runs it is attached to."""

    def __init__(self):
        self.tokens: list[str] = []
        self.results = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response, **kwargs) -> None:
        self.results.append(response)

    def message(self) -> AIMessage:
        """The chat message of the only run recorded."""
        (result,) = self.results
        return result.generations[0][0].message


def pruning_chat() -> ChatPromptDistill:
    return ChatPromptDistill(**PRUNING, max_tokens=24)


def without_timing(response_metadata: dict) -> dict:
    """`response_metadata` without the prefill time, which differs between runs."""
    stats = {k: v for k, v in response_metadata["promptdistill"].items() if k != "prefill_seconds"}
    return {**response_metadata, "promptdistill": stats}


@pytest.fixture(scope="module")
def question_last_run() -> tuple[str, AIMessage]:
    """The question-last RAG chain's answer and the model's message behind it."""
    recorder = Recorder()
    chain = QUESTION_LAST | pruning_chat() | StrOutputParser()
    answer = chain.invoke(RAG_INPUT, config={"callbacks": [recorder]})
    return answer, recorder.message()


# ---------------------------------------------------------------- RAG chains


def test_question_last_chain_answers_from_pruned_context(question_last_run):
    answer, message = question_last_run
    stats = message.response_metadata["promptdistill"]
    assert ANSWER in answer
    assert stats["kept_tokens"] < stats["prompt_tokens"]
    assert stats["kept_ratio"] == stats["kept_tokens"] / stats["prompt_tokens"]
    assert stats["selection_layers"] == [14] and stats["method"] == "promptdistill"
    assert stats["prefill_seconds"] > 0
    # The kept spans index the prompt as the model saw it, and the fact is among them.
    fact = stats["prompt_text"].index(ANSWER)
    assert any(start <= fact < end for start, end in stats["kept_char_spans"])
    usage = message.usage_metadata
    assert usage["input_tokens"] == stats["prompt_tokens"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert message.response_metadata["model_name"] == "smollm2-135m-instruct"


def test_chain_stream_concatenates_to_the_invoke_text(question_last_run):
    answer, _ = question_last_run
    chunks = list((QUESTION_LAST | pruning_chat() | StrOutputParser()).stream(RAG_INPUT))
    assert len([chunk for chunk in chunks if chunk]) > 1
    assert "".join(chunks) == answer


def test_question_first_chain_seeds_selection_with_bound_pd_query():
    recorder = Recorder()
    chain = QUESTION_FIRST | pruning_chat().bind(pd_query=QUESTION) | StrOutputParser()
    # Streaming, so the bound kwarg is shown to reach `_stream` as well.
    answer = "".join(chain.stream(RAG_INPUT, config={"callbacks": [recorder]}))
    stats = recorder.message().response_metadata["promptdistill"]
    assert ANSWER in answer
    assert stats["kept_tokens"] < stats["prompt_tokens"]


def test_bound_pd_documents_keep_whole_documents_and_report_their_retention():
    recorder = Recorder()
    # float32: in bfloat16 the wording of this answer differs between AMX and AVX512-BF16 kernels
    chat = ChatPromptDistill(config=PromptDistillConfig(span="document"), **PRUNING, max_tokens=24, dtype="float32")
    chain = QUESTION_LAST | chat.bind(pd_documents=[Document(page_content=d) for d in DOCUMENTS]) | StrOutputParser()
    answer = chain.invoke(RAG_INPUT, config={"callbacks": [recorder]})
    retention = recorder.message().response_metadata["promptdistill"]["document_retention"]
    assert ANSWER in answer
    assert retention[DOCUMENTS.index(next(d for d in DOCUMENTS if ANSWER in d))] == 1.0
    # Whole documents are kept or dropped; only the first one that does not fit may be cut.
    assert sum(0 < share < 1 for share in retention) <= 1 and 0 < sum(retention) < len(DOCUMENTS)


def test_llm_answers_a_raw_rag_prompt_from_pruned_context():
    """A raw (non-chat) prompt is fragile for an instruct model, so the premise is checked too: full attention
    answers it. The documents are named, so only they are pruned, in whole-passage units."""
    prompt = PromptTemplate.from_template(
        "Use the documents to answer the question.\n\n{context}\n\nQuestion: {question}\nAnswer: "
    ).format(**RAG_INPUT)
    assert ANSWER in PromptDistillLLM(method="full", max_tokens=32).invoke(prompt)
    llm = PromptDistillLLM(**PRUNING, max_tokens=32)
    result = llm.generate([prompt], pd_documents=DOCUMENTS)
    generation = result.generations[0][0]
    stats = generation.generation_info["promptdistill"]
    assert ANSWER in generation.text
    assert stats["kept_tokens"] < stats["prompt_tokens"] and stats["context_source"] == "documents"
    assert generation.generation_info["usage_metadata"]["input_tokens"] == stats["prompt_tokens"]
    assert result.llm_output["token_usage"] == generation.generation_info["usage_metadata"]
    assert result.llm_output["model_name"] == "smollm2-135m-instruct"


# ---------------------------------------------------------------- streaming, stop sequences, callbacks, usage


def test_stop_sequences_cut_the_output_in_invoke_and_stream():
    chat = ChatPromptDistill(max_tokens=24)
    unstopped = chat.invoke("Hello").content
    stop = unstopped.split()[2]
    expected = unstopped[: unstopped.index(stop)]

    stopped = chat.invoke("Hello", stop=[stop])
    assert stopped.content == expected
    assert stopped.response_metadata["finish_reason"] == "stop"
    assert "".join(chunk.content for chunk in chat.stream("Hello", stop=[stop])) == expected
    # The constructor's stop sequences apply when a call gives none.
    assert ChatPromptDistill(max_tokens=24, stop=[stop]).invoke("Hello").content == expected


def test_stream_reports_usage_and_metadata_once_on_the_last_chunk():
    chat = ChatPromptDistill(max_tokens=12)
    invoked = chat.invoke("Hello")
    chunks = list(chat.stream("Hello"))
    assert all(chunk.usage_metadata is None and not chunk.response_metadata for chunk in chunks[:-1])
    last = chunks[-1]
    assert last.chunk_position == "last"
    assert last.usage_metadata == invoked.usage_metadata
    assert without_timing(last.response_metadata) == without_timing(invoked.response_metadata)
    assert "".join(chunk.content for chunk in chunks) == invoked.content


@pytest.mark.asyncio
async def test_astream_concatenates_to_the_invoke_text():
    chat = ChatPromptDistill(max_tokens=12)
    chunks = [chunk.content async for chunk in chat.astream("Hi there")]
    assert len(chunks) > 2
    assert "".join(chunks) == (await chat.ainvoke("Hi there")).content


@pytest.mark.parametrize("model_class", [ChatPromptDistill, PromptDistillLLM])
def test_streaming_invoke_fires_on_llm_new_token(model_class):
    recorder = Recorder()
    output = model_class(streaming=True, max_tokens=12).invoke(
        "The capital of France is", config={"callbacks": [recorder]}
    )
    text = output.content if isinstance(output, AIMessage) else output
    assert len(recorder.tokens) > 1
    assert "".join(recorder.tokens) == text


def test_per_call_options_override_the_constructor():
    message = ChatPromptDistill(max_tokens=24).invoke("Hello", max_tokens=2)
    assert message.usage_metadata["output_tokens"] == 2
    assert message.response_metadata["finish_reason"] == "length"


def test_timeout_stops_generation():
    with pytest.raises(TimeoutError, match="timeout"):
        ChatPromptDistill(timeout=1e-6).invoke("Hello")


# ---------------------------------------------------------------- batching and concurrency


def test_llm_batch_equals_separate_invokes():
    llm = PromptDistillLLM(max_tokens=8, dtype="float32")  # batched equals alone exactly in float32
    batched = llm.batch(SHORT_PROMPTS)
    assert all(batched)
    assert batched == [llm.invoke(prompt) for prompt in SHORT_PROMPTS]


@pytest.mark.asyncio
async def test_abatch_of_16_pruned_prompts_equals_sequential_output():
    # The notes in the system message are pruned while the human question seeds selection, so the concurrent calls
    # run selection, not only decoding; each answer names its own country, so crossed state would show.
    notes = (
        "Reference notes: capitals are usually the seat of government. Some countries have several capitals, "
        "and a few moved their capital during the last century."
    )
    prompts = [[SystemMessage(notes), HumanMessage(f"What is the capital of {country}?")] for country in COUNTRIES]
    # The notes are named as the retrieved document, so they are the prunable text.
    chat = ChatPromptDistill(selection_layers=(14,), budgets=(16,), max_tokens=8, dtype="float32").bind(
        pd_documents=[notes]
    )
    concurrent = await chat.abatch(prompts)
    sequential = [chat.invoke(prompt) for prompt in prompts]
    assert [m.content for m in concurrent] == [m.content for m in sequential]
    assert [m.usage_metadata for m in concurrent] == [m.usage_metadata for m in sequential]
    for country, message in zip(COUNTRIES, concurrent):
        stats = message.response_metadata["promptdistill"]
        assert country in message.content
        assert stats["kept_tokens"] < stats["prompt_tokens"]


# ---------------------------------------------------------------- settings, messages and laziness


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"budgets": (0.5, 3)}, "budgets"),
        ({"selection_layers": (14, 10)}, "selection_layers"),
        ({"method": "magic"}, "method"),
        ({"quantization": "3bit"}, "quantization"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"stop": ["", "x"]}, "stop"),
    ],
)
@pytest.mark.parametrize("model_class", [ChatPromptDistill, PromptDistillLLM])
def test_bad_settings_raise_naming_the_parameter(model_class, kwargs, parameter):
    with pytest.raises(ValueError, match=parameter):
        model_class(**kwargs)


def test_shortcuts_override_the_config_fields():
    chat = ChatPromptDistill(
        config=PromptDistillConfig(selection_layers=(10,), budgets=(512,), chunk_size=16), budgets=(64,)
    )
    assert chat._identifying_params["promptdistill"]["selection_layers"] == (10,)
    assert chat._identifying_params["promptdistill"]["budgets"] == (64,)
    assert chat._identifying_params["promptdistill"]["chunk_size"] == 16


def test_settings_that_do_not_fit_the_model_raise_on_first_call():
    chat = ChatPromptDistill(selection_layers=(40,), budgets=(64,))
    with pytest.raises(ValueError, match="selection_layers"):
        chat.invoke("Hello")


def test_bad_call_options_raise_before_generating():
    chat = ChatPromptDistill()
    with pytest.raises(TypeError, match="pd_querry"):
        chat.invoke("Hello", pd_querry="x")
    with pytest.raises(ValueError, match="pd_query"):
        chat.invoke("Hello", pd_query="  ")
    with pytest.raises(ValueError, match="temperature"):
        chat.invoke("Hello", temperature=-1)


def test_construction_is_lazy():
    # An unavailable model constructs fine: nothing loads until the first call.
    chat = ChatPromptDistill(model="no-such-org/no-such-model")
    with pytest.raises(ModelNotAvailableError):
        chat.invoke("Hello")


def test_langsmith_params_and_identifying_params():
    chat = ChatPromptDistill(stop=["\n\n"], temperature=0.5, max_tokens=32)
    params = chat._get_ls_params()
    assert params["ls_provider"] == "promptdistill"
    assert params["ls_model_name"] == "smollm2-135m-instruct"
    assert params["ls_model_type"] == "chat"
    assert (params["ls_temperature"], params["ls_max_tokens"], params["ls_stop"]) == (0.5, 32, ["\n\n"])
    assert chat._get_ls_params(stop=["END"])["ls_stop"] == ["END"]
    assert PromptDistillLLM()._get_ls_params(model="other")["ls_model_name"] == "other"
    assert PromptDistillLLM()._get_ls_params()["ls_model_type"] == "llm"
    assert chat._identifying_params["model"] == "smollm2-135m-instruct"
    assert chat._identifying_params["temperature"] == 0.5


def test_token_counts_use_the_model_tokenizer():
    chat = ChatPromptDistill()
    assert chat.get_num_tokens("Hello world") == len(chat.get_token_ids("Hello world")) == 2


def test_messages_become_chat_template_messages():
    messages = [
        SystemMessage("Be brief."),
        SystemMessage("Use the context."),
        HumanMessage("Hi", name="ann"),
        AIMessage("Hello!"),
        ChatMessage(role="user", content="What is 2+2?"),
    ]
    assert to_engine_messages(messages) == [
        {"role": "system", "content": "Be brief.\n\nUse the context."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    # A tool's result stays a tool message; the chat template or the built-in format renders it (see
    # tests/test_structured.py).
    assert to_engine_messages([ToolMessage("4", tool_call_id="call-1")]) == [
        {"role": "tool", "content": "4", "tool_call_id": "call-1"}
    ]
    with pytest.raises(ValueError, match="takes system, human, AI, tool and chat messages, got a 'function'"):
        to_engine_messages([FunctionMessage("4", name="add")])
    image = HumanMessage(
        [{"type": "text", "text": "What is this?"}, {"type": "image", "url": "https://example.com/cat.png"}]
    )
    with pytest.raises(ValueError, match="text content only"):
        to_engine_messages([image])
