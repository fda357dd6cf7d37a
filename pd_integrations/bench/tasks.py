"""Benchmark prompts: needle probes and RULER-style synthetic tasks, each with exact-match scoring.

The RULER tasks (Hsieh et al., 2024) hide "special magic number" facts, keyed by two-word keys, in haystack prose:
- `niah-single`: one key, one value; ask for it.
- `niah-multikey`: four keys with a value each; ask for one of them (the others are distractors).
- `niah-multivalue`: one key with four values; ask for all of them.
- `niah-multiquery`: four keys with a value each; ask for all four.
A task's score is the share of expected values found verbatim in the answer (RULER's "string match all").
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..probes import haystack_window, insert_sentences, load_haystack, needle_probe

TASKS = ("niah-single", "niah-multikey", "niah-multivalue", "niah-multiquery")
NEEDLES_PER_TASK = 4  # keys in multikey/multiquery, values in multivalue

_ADJECTIVES = (
    "crimson",
    "silent",
    "brave",
    "hollow",
    "gentle",
    "rapid",
    "frozen",
    "golden",
    "quiet",
    "bitter",
    "lucky",
    "narrow",
    "ancient",
    "curious",
    "distant",
    "humble",
)
_NOUNS = (
    "lantern",
    "harbor",
    "violin",
    "meadow",
    "compass",
    "glacier",
    "orchard",
    "falcon",
    "ribbon",
    "canyon",
    "teapot",
    "beacon",
    "pebble",
    "saddle",
    "thistle",
    "anchor",
)


@dataclass(frozen=True)
class Probe:
    """One benchmark prompt: chat `messages`, the `question` that seeds selection, and how to `score` an answer
    (0..1). `labels` say where the probe sits in the grid (length, depth or task, seed); `needles` are the hidden
    sentences; `context` is the haystack, named as the retrieved document so that exactly it is prunable."""

    labels: dict
    messages: list[dict]
    question: str
    needles: tuple[str, ...]
    max_new_tokens: int
    score: Callable[[str], float]
    context: str


def needle(
    tokenizer, length: int, depth: float, seed: int, *, kind: str = "passcode", haystack: str | None = None
) -> Probe:
    """A single-needle probe of `kind` at `depth` in about `length` tokens of haystack (see `needle_probe`)."""
    probe = needle_probe(tokenizer, length, depth, kind=kind, seed=seed, haystack=haystack)
    return Probe(
        {"length": length, "depth": depth, "seed": seed},
        probe.messages(),
        probe.question,
        (probe.needle,),
        24,
        lambda text: float(probe.is_answered(text)),
        probe.context,
    )


def task(
    name: str, tokenizer, length: int, seed: int, *, haystack: str | None = None, split: str | None = None
) -> Probe:
    """A RULER-style probe of task `name` in about `length` tokens of haystack (its `split`, see `load_haystack`),
    needles at seed-chosen depths.

    Raises `ValueError` for an unknown task or split, or a haystack too short for `length`.
    """
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    rng = random.Random(f"{seed}-{name}-{length}")
    keys = rng.sample([f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS], NEEDLES_PER_TASK)
    values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in range(NEEDLES_PER_TASK)]
    facts, question, expected = _facts_and_question(name, keys, values)
    needles = [f"One of the special magic numbers for {key} is: {value}." for key, value in facts]
    context = insert_sentences(
        haystack_window(tokenizer, load_haystack(haystack, split), length, rng),
        needles,
        [rng.random() for _ in needles],
    )
    messages = [{"role": "user", "content": f"{context}\n\nAnswer briefly. {question}"}]
    # Multi-answer tasks list four 7-digit numbers; a digit is one token for most tokenizers.
    max_new_tokens = 24 if len(expected) == 1 else 80
    return Probe(
        {"length": length, "task": name, "seed": seed} | ({"split": split} if split else {}),
        messages,
        question,
        tuple(needles),
        max_new_tokens,
        lambda text: _share_found(expected, text),
        context,
    )


def _facts_and_question(name: str, keys: list[str], values: list[str]) -> tuple[list[tuple[str, str]], str, list[str]]:
    """Task `name`'s hidden (key, value) facts, its question, and the values a full answer holds."""
    if name == "niah-multivalue":
        facts = [(keys[0], value) for value in values]
        question = f"What are all the special magic numbers for {keys[0]} mentioned in the text? List them."
        expected = values
    elif name == "niah-multiquery":
        facts = list(zip(keys, values))
        question = (
            f"What are the special magic numbers for {', '.join(keys[:-1])} and {keys[-1]} mentioned in "
            f"the text? List them."
        )
        expected = values
    else:
        facts = list(zip(keys, values))[: 1 if name == "niah-single" else NEEDLES_PER_TASK]
        question = f"What is the special magic number for {keys[0]} mentioned in the text?"
        expected = values[:1]
    return facts, question, expected


def _share_found(expected: list[str], text: str) -> float:
    digits = re.sub(r"[\s,.-]", "", text)
    return sum(value in digits for value in expected) / len(expected)
