"""What the generated corpora (`handbook.py`, `depots.py`) share: their passage and question records, and the
drawing of a passage's sentences and of questions with one answer each."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Passage:
    """One corpus passage: `id` is its position in the corpus, `title` names what it is about."""

    id: int
    title: str
    text: str


@dataclass(frozen=True)
class RagQuestion:
    """A question whose `answer` appears verbatim (as a whole word or phrase) in exactly one passage, `passage_id`."""

    question: str
    answer: str
    passage_id: int


def contains(text: str, answer: str) -> bool:
    """Whether `answer` occurs in `text` case-insensitively as a whole phrase ("4 March" not inside "14 March")."""
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text, re.IGNORECASE) is not None


def check_size(size: int, most: int) -> None:
    """Raise `ValueError` unless a corpus of `size` passages, out of `most` possible, can be generated."""
    if not 1 <= size <= most:
        raise ValueError(f"size must be between 1 and {most}, got {size}")


def arrange_sentences(
    rng: random.Random, openings, facts: list[str], filler_pool, filler_counts: tuple[int, int], first_filler_at: int
) -> tuple[list[str], list[str]]:
    """(a passage's sentence templates, its fillers): an opening from `openings`, then `facts` shuffled, with a
    number in `filler_counts` of fillers from `filler_pool` each inserted at a random place from `first_filler_at`."""
    facts = list(facts)
    rng.shuffle(facts)
    fillers = rng.sample(filler_pool, rng.randint(*filler_counts))
    sentences = [rng.choice(openings), *facts]
    for filler in fillers:
        sentences.insert(rng.randint(first_filler_at, len(sentences)), filler)
    return sentences, fillers


def draw_questions(
    corpus: list[Passage], n: int, seed: int, name: str, kinds: tuple[str, ...], ask: Callable
) -> list[RagQuestion]:
    """`n` questions about distinct passages of `corpus`, in an order drawn from `name` and `seed`, cycling through
    `kinds` from the seed's; `ask(passage, kind)` gives (question, answer). Only answers found in exactly one
    passage are asked: raises `ValueError` if the corpus can't give `n` such questions."""
    rng = random.Random(f"{name}-{seed}")
    questions = []
    for passage in rng.sample(corpus, len(corpus)):
        if len(questions) == n:
            break
        question, answer = ask(passage, kinds[(seed + len(questions)) % len(kinds)])
        if sum(contains(p.text, answer) for p in corpus) == 1:
            questions.append(RagQuestion(question, answer, passage.id))
    if len(questions) < n:
        raise ValueError(f"the corpus holds only {len(questions)} answerable questions, asked for {n}")
    return questions
