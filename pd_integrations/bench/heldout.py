"""Needle probes on text and phrasings that calibration never saw, split into a development and a held-out part.

The haystack is a folder of essays (for example the Paul Graham essays customary in needle tests); its files,
sorted by name, alternate between the `dev` split (even positions) and the `heldout` split (odd positions), so
choosing settings on one part and reporting on the other never mixes the two. The needle phrasings below are
used nowhere else in the package (calibration uses `probes.make_needle`), and each probe asks its question after
the context (`question_last`), before it (`question_first`), or in a later chat turn than the one holding the
context (`multi_turn`).
"""

from __future__ import annotations

import random
import re

from ..corpora.rag import follow_up_messages
from ..probes import haystack_window, insert_sentences, load_haystack
from .tasks import Probe

SHAPES = ("question_last", "question_first", "multi_turn")
_NAMES = ("Mira", "Tobias", "Ines", "Kwame", "Yuki", "Soren", "Lena", "Rafael")
_SHIPS = ("Northwind", "Kestrel", "Aurora", "Pelican", "Marlin", "Seraph", "Halcyon", "Tern")
_FRUITS = ("apricot", "plum", "quince", "mango", "fig", "guava", "lychee", "papaya")


def _needle(rng: random.Random) -> tuple[str, str, str]:
    """(sentence, question, answer) in one of several phrasings."""
    kind = rng.randrange(4)
    name = rng.choice(_NAMES)
    if kind == 0:
        code = str(rng.randrange(1000, 10000))
        return (f"The door code for the east workshop is {code}.", "What is the door code for the east workshop?", code)
    if kind == 1:
        ship = rng.choice(_SHIPS)
        return (f"{name}'s sailboat is named the {ship}.", f"What is the name of {name}'s sailboat?", ship)
    if kind == 2:
        number = str(rng.randrange(100, 1000))
        return (
            f"{name} keeps the spare key in locker number {number}.",
            f"Which locker number does {name} keep the spare key in?",
            number,
        )
    fruit = rng.choice(_FRUITS)
    return (
        f"At the reunion, {name} brought a basket of {fruit} jam.",
        f"What kind of jam did {name} bring to the reunion?",
        fruit,
    )


def probe(tokenizer, directory: str, split: str, length: int, depth: float, shape: str, seed: int) -> Probe:
    """One needle probe: about `length` tokens of `split`'s essays with a needle at relative `depth`, its question
    asked in `shape`. Raises `ValueError` for an unknown shape or split."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    rng = random.Random(f"heldout-{split}-{length}-{depth}-{shape}-{seed}")
    sentence, question, answer = _needle(rng)
    context = insert_sentences(
        haystack_window(tokenizer, load_haystack(directory, split), length, rng), [sentence], [depth]
    )
    if shape == "multi_turn":
        messages = follow_up_messages(
            f"Here is a text. Read it; I will ask you about it next.\n\n{context}", f"Answer briefly. {question}"
        )
    else:
        content = (
            f"{context}\n\nAnswer briefly. {question}"
            if shape == "question_last"
            else f"Answer briefly. {question}\n\n{context}"
        )
        messages = [{"role": "user", "content": content}]
    labels = {"length": length, "depth": depth, "shape": shape, "seed": seed, "split": split}
    return Probe(
        labels,
        messages,
        question,
        (sentence,),
        24,
        lambda text: float(_normalise(answer) in _normalise(text)),
        context,
    )


def probes(
    tokenizer, directory: str, split: str, lengths: list[int], shapes: list[str], samples: int, seed: int = 0
) -> list[Probe]:
    """`samples` probes per length and shape, their needles spread over depths (k + 0.5) / samples."""
    return [
        probe(tokenizer, directory, split, n, (k + 0.5) / samples, shape, seed + k)
        for n in lengths
        for shape in shapes
        for k in range(samples)
    ]


def _normalise(text: str) -> str:
    return re.sub(r"[\s,.'-]", "", text).lower()
