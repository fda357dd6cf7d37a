"""Synthetic long-context probes: a needle fact hidden at a chosen depth in a haystack of real prose.

The built-in haystack is the English help text that ships with CPython (`pydoc_data.topics`), so nothing is
downloaded; `--haystack DIR` swaps in any folder of `.txt` files. Used by the demo, tests, benchmarks and
calibration, as is `needles_kept`, which tells whether a run kept a probe's evidence.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .corpora.names import MONTHS

NEEDLE_KINDS = ("passcode", "city", "magic_word", "date")

_WORDS = (
    "amber",
    "falcon",
    "quartz",
    "meadow",
    "cobalt",
    "juniper",
    "lantern",
    "orchid",
    "saffron",
    "tundra",
    "velvet",
    "willow",
    "harbor",
    "ember",
    "glacier",
    "mosaic",
)
_CITIES = (
    "Lisbon",
    "Nairobi",
    "Montreal",
    "Kyoto",
    "Valparaiso",
    "Tallinn",
    "Perth",
    "Reykjavik",
    "Cusco",
    "Zanzibar",
    "Bergen",
    "Tbilisi",
    "Hobart",
    "Granada",
    "Quito",
    "Da Nang",
)


@dataclass(frozen=True)
class NeedleProbe:
    """One probe: retrieved `context` holding `needle` (answer `answer`) at relative `depth`, and `question`."""

    context: str
    needle: str
    question: str
    answer: str
    depth: float
    kind: str

    def messages(self) -> list[dict]:
        """The probe as a RAG chat turn: context first, question at the tail."""
        return [{"role": "user", "content": f"{self.context}\n\nAnswer briefly. {self.question}"}]

    def is_answered(self, text: str) -> bool:
        """Whether a generated `text` contains the answer (digits compared without separators)."""
        if self.kind == "passcode":
            return self.answer in re.sub(r"[\s,.-]", "", text)
        return self.answer.lower() in text.lower()


def make_needle(kind: str, rng: random.Random) -> tuple[str, str, str]:
    """(needle sentence, question, answer) of `kind`; raises `ValueError` for an unknown kind."""
    if kind == "passcode":
        code = str(rng.randrange(10_000, 100_000))
        return (f"The secret pass code for the vault is {code}.", "What is the secret pass code for the vault?", code)
    if kind == "city":
        city, person = rng.choice(_CITIES), rng.choice(("Ada", "Boris", "Chen", "Dalia", "Emeka", "Farah"))
        return (f"{person} moved to the city of {city} last spring.", f"Which city did {person} move to?", city)
    if kind == "magic_word":
        word = rng.choice(_WORDS)
        return (
            f"The magic word that opens the archive is {word}.",
            "What is the magic word that opens the archive?",
            word,
        )
    if kind == "date":
        month, day = rng.choice(MONTHS), rng.randrange(1, 29)
        return (
            f"The launch of the Orion probe is scheduled for {month} {day}.",
            "When is the launch of the Orion probe scheduled?",
            f"{month} {day}",
        )
    raise ValueError(f"kind must be one of {', '.join(NEEDLE_KINDS)}, got {kind!r}")


HAYSTACK_SPLITS = ("dev", "heldout")


@lru_cache(maxsize=8)
def load_haystack(directory: str | None = None, split: str | None = None) -> str:
    """Haystack text: every `.txt` file in `directory` (sorted), or CPython's bundled help text.

    With `split`, only the files at even (`dev`) or odd (`heldout`) positions of the sorted folder, so settings
    chosen on one half can be reported on the other without the two ever mixing.

    Raises `ValueError` when `directory` holds no `.txt` files, for an unknown split, or for a split of the
    built-in text or of a folder with fewer than two files.
    """
    if split is not None and split not in HAYSTACK_SPLITS:
        raise ValueError(f"split must be one of {', '.join(HAYSTACK_SPLITS)}, got {split!r}")
    if directory is None:
        if split is not None:
            raise ValueError("split needs a haystack directory of .txt files to split")
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key].strip() for key in sorted(topics))
    files = sorted(Path(directory).glob("*.txt"))
    if not files:
        raise ValueError(f"haystack directory {directory!r} holds no .txt files")
    if split is not None:
        if len(files) < 2:
            raise ValueError(f"haystack directory {directory!r} needs at least two .txt files to split")
        files = files[HAYSTACK_SPLITS.index(split) :: 2]
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


def needle_probe(
    tokenizer, context_tokens: int, depth: float, *, kind: str = "passcode", seed: int = 0, haystack: str | None = None
) -> NeedleProbe:
    """A probe whose context is about `context_tokens` tokens of haystack, taken from a seed-chosen offset,
    with the needle inserted at the sentence boundary nearest `depth` (0 = start, 1 = end).

    Raises `ValueError` for a depth outside [0, 1] or a haystack too short for the length asked.
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    rng = random.Random(f"{seed}-{kind}-{context_tokens}-{depth}")
    needle, question, answer = make_needle(kind, rng)
    context = insert_sentences(
        haystack_window(tokenizer, load_haystack(haystack), context_tokens, rng), [needle], [depth]
    )
    return NeedleProbe(context, needle, question, answer, depth, kind)


def haystack_window(tokenizer, text: str, tokens: int, rng: random.Random) -> str:
    """Exactly `tokens` tokens of `text` from an `rng`-chosen offset, cut at a token boundary.

    Raises `ValueError` when `text` is too short.
    """
    span = tokens * 6  # ~4 characters per token in English prose: take generously, then cut exactly
    if len(text) < span:
        raise ValueError(f"the haystack has {len(text)} characters; {tokens} tokens need about {span}")
    start = rng.randrange(0, len(text) - span + 1)
    window = text[start : start + span]
    offsets = tokenizer(window, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) < tokens:
        raise ValueError(f"the haystack window holds {len(offsets)} tokens, fewer than {tokens}")
    return window[: offsets[tokens - 1][1]]


def insert_sentences(context: str, sentences: list[str], depths: list[float]) -> str:
    """`context` with each sentence inserted at the first sentence boundary at or after its relative depth."""
    cuts = []
    for depth in depths:
        boundary = context.find(". ", int(depth * len(context)))
        cuts.append(boundary + 2 if boundary >= 0 else len(context))
    # Insert from the end so that earlier cut offsets stay valid.
    for at, sentence in sorted(zip(cuts, sentences), key=lambda item: item[0], reverse=True):
        context = f"{context[:at]}{sentence} {context[at:]}"
    return context


def needles_kept(prompt_text: str, kept_spans: list[tuple[int, int]], needles: tuple[str, ...]) -> float:
    """Share of needle sentences wholly inside one kept span (whether selection kept the evidence)."""
    kept = 0
    for sentence in needles:
        start = prompt_text.find(sentence)
        kept += any(a <= start and start + len(sentence) <= b for a, b in kept_spans)
    return kept / len(needles)
