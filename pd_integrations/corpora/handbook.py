"""A generated company handbook: a RAG corpus whose passages all look alike, and questions with one answer each.

Every passage describes one policy (travel expenses, equipment purchases, ...) at one office (Lisbon, Porto, ...)
and states four facts of the same form: who approves it (a person's name), the form to use (a code such as
`TRV-4821`), a limit (an amount in euros) and a deadline (a date), in sentences drawn from a few templates and
shuffled, with up to two filler sentences. Every fact sentence names the office and the policy. Names, codes, amounts
and dates are unique across the corpus, so a question such as "Who approves travel expenses at the Lisbon office?"
has exactly one passage that answers it, while the passages on travel expenses at other offices, and on other
policies at the Lisbon office, are near-identical distractors that a retriever ranks next to it. Nothing is
downloaded: the corpus is generated from a seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .names import CITIES, FIRST_NAMES, LAST_NAMES, MONTHS
from .passages import Passage, RagQuestion, arrange_sentences, check_size, draw_questions

FACT_KINDS = ("person", "code", "amount", "date")


@dataclass(frozen=True)
class _Policy:
    topic: str  # "travel expenses": what the passage is about, in questions and text
    prefix: str  # form code prefix
    unit: str  # what the amount limits: "per trip"
    limit: str  # the amount's name in questions: "the limit per trip for travel expenses"
    deadline: str  # the date's name: "the filing deadline for travel claims"
    fillers: tuple[str, ...]


POLICIES = (
    _Policy(
        "travel expenses",
        "TRV",
        "per trip",
        "the limit per trip for travel expenses",
        "the filing deadline for travel claims",
        (
            "Economy class is the default for flights shorter than six hours.",
            "Hotel bookings go through the company travel portal.",
        ),
    ),
    _Policy(
        "equipment purchases",
        "EQP",
        "per item",
        "the limit per item for equipment purchases",
        "the closing date for equipment orders",
        (
            "Laptops and monitors are ordered from the approved supplier list.",
            "Returned equipment must be logged with the service desk.",
        ),
    ),
    _Policy(
        "conference attendance",
        "CNF",
        "per person per year",
        "the yearly conference budget per person",
        "the deadline for conference applications",
        ("Speakers at a conference are given priority.", "A short trip report is expected after each event."),
    ),
    _Policy(
        "training courses",
        "TRN",
        "per employee per year",
        "the yearly training allowance per employee",
        "the registration deadline for training courses",
        ("Online courses count towards the same allowance.", "Certificates should be uploaded to the learning portal."),
    ),
    _Policy(
        "relocation support",
        "RLC",
        "per move",
        "the relocation allowance per move",
        "the deadline for relocation applications",
        (
            "Temporary housing can be arranged for the first month.",
            "Moving companies must be chosen from the approved list.",
        ),
    ),
    _Policy(
        "home office equipment",
        "HOM",
        "per employee",
        "the home office allowance per employee",
        "the deadline for home office requests",
        (
            "Chairs and desks are delivered directly to the employee's address.",
            "Items bought under the allowance remain company property.",
        ),
    ),
    _Policy(
        "client entertainment",
        "ENT",
        "per event",
        "the limit per event for client entertainment",
        "the deadline for entertainment claims",
        ("Guests' names and companies must be listed on every claim.", "Alcohol may not exceed a third of the bill."),
    ),
    _Policy(
        "software licences",
        "SWL",
        "per licence",
        "the spending limit per software licence",
        "the renewal deadline for software licences",
        ("Open-source tools do not need a licence request.", "Unused licences are reclaimed after ninety days."),
    ),
    _Policy(
        "parking permits",
        "PKG",
        "per employee per year",
        "the yearly parking allowance per employee",
        "the renewal deadline for parking permits",
        ("Bicycle spaces in the basement are free of charge.", "Visitors receive day passes from reception."),
    ),
    _Policy(
        "team events",
        "EVT",
        "per team per year",
        "the yearly budget per team for team events",
        "the booking deadline for team events",
        (
            "Events should take place within working hours where possible.",
            "Venues must be accessible to every team member.",
        ),
    ),
)

_NAMES = tuple(f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES)
_ROLES = ("office manager", "finance lead", "site lead", "controller", "HR lead")
# One template per sentence kind is drawn per passage; {Topic} is the topic capitalised.
_OPENINGS = (
    "This note covers {topic} for staff based at the {city} office.",
    "Staff at the {city} office follow these rules for {topic}.",
    "Rules for {topic} at the {city} office.",
    "The {city} office handles {topic} as follows.",
)
# Each fact sentence names the office and the policy, so the passages differ only in those names and the facts.
_SENTENCES = {
    "person": (
        "Requests for {topic} at the {city} office are approved by {person}, the local {role}.",
        "At the {city} office, {person} ({role}) approves all {topic}.",
        "{person} is the {role} who approves {topic} at the {city} office.",
    ),
    "code": (
        "Requests for {topic} at the {city} office are filed on form {code}.",
        "At the {city} office, form {code} is used for {topic}.",
        "The {city} office uses form {code} for {topic}.",
    ),
    "amount": (
        "{Limit} at the {city} office is {amount} euros.",
        "At the {city} office, {limit} is {amount} euros.",
        "At the {city} office, up to {amount} euros {unit} is paid for {topic}.",
    ),
    "date": (
        "{Deadline} at the {city} office is {date}.",
        "At the {city} office, {deadline} is {date}.",
        "The {city} office sets {deadline} to {date}.",
    ),
}
_MAX_CHARS = 440
_COMMON_FILLERS = (
    "Keep all receipts for at least seven years.",
    "Managers are notified automatically once a request is filed.",
    "Questions about the process go to the local service desk.",
    "The policy is reviewed once a year by the finance committee.",
)

_QUESTIONS = {
    "person": "Who approves {topic} at the {city} office?",
    "code": "Which form is used for {topic} at the {city} office?",
    "amount": "What is {limit} at the {city} office?",
    "date": "What is {deadline} at the {city} office?",
}


def make_handbook(seed: int = 0, size: int = 240) -> list[Passage]:
    """`size` handbook passages (one per office and policy, at most len(CITIES) * len(POLICIES) = 300), the same for
    the same seed. Each passage is 75–125 tokens of SmolLM2's tokenizer (about 95 on average) and holds one
    person, form code, amount and date, none of which appears in another passage. Raises `ValueError` for a size
    out of range."""
    pairs = [(city, policy) for city in CITIES for policy in POLICIES]
    check_size(size, len(pairs))
    rng = random.Random(f"handbook-{seed}")
    pairs = rng.sample(pairs, size)
    people = rng.sample(_NAMES, size)
    numbers = rng.sample(range(1000, 10_000), size)
    amounts = rng.sample(range(100, 1000), size)  # in tens of euros: 1,000 to 9,990
    days = rng.sample([(month, day) for month in MONTHS for day in range(1, 29)], size)
    passages = []
    for i, (city, policy) in enumerate(pairs):
        amount = amounts[i] * 10
        month, day = days[i]
        slots = {
            "city": city,
            "topic": policy.topic,
            "Topic": _capital(policy.topic),
            "unit": policy.unit,
            "limit": policy.limit,
            "Limit": _capital(policy.limit),
            "deadline": policy.deadline,
            "Deadline": _capital(policy.deadline),
            "person": people[i],
            "role": rng.choice(_ROLES),
            "code": f"{policy.prefix}-{numbers[i]}",
            "amount": f"{amount // 1000},{amount % 1000:03d}",
            "date": f"{day} {month}",
        }
        facts = [rng.choice(_SENTENCES[kind]) for kind in FACT_KINDS]
        sentences, fillers = arrange_sentences(rng, _OPENINGS, facts, policy.fillers + _COMMON_FILLERS, (0, 2), 2)
        # Drop fillers from passages longer than _MAX_CHARS (about 120 tokens: names and digits tokenize finely).
        while len(text := " ".join(sentences).format(**slots)) > _MAX_CHARS and fillers:
            sentences.remove(fillers.pop())
        text = _capital(text)
        passages.append(Passage(i, f"{slots['Topic']} ({city} office)", text))
    return passages


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def fact(passage: Passage, kind: str) -> str:
    """The passage's fact of `kind` (one of FACT_KINDS), read back from its text."""
    if kind == "person":
        return next(name for name in _NAMES if name in passage.text)
    pattern = {
        "code": r"\b[A-Z]{3}-\d{4}\b",
        "amount": r"\b\d,\d{3}(?= euros)",
        "date": r"\b\d{1,2} (?:" + "|".join(MONTHS) + r")\b",
    }[kind]
    return re.search(pattern, passage.text).group(0)


def make_questions(corpus: list[Passage], n: int, seed: int) -> list[RagQuestion]:
    """`n` questions about distinct passages of `corpus`, drawn by `seed`, cycling through the fact kinds (person,
    code, amount, date). Each answer occurs in exactly one passage (checked; raises `ValueError` if the corpus
    can't give `n` such questions)."""
    return draw_questions(corpus, n, seed, "questions", FACT_KINDS, _ask)


def _ask(passage: Passage, kind: str) -> tuple[str, str]:
    """(the question about `passage`'s fact of `kind`, its answer)."""
    policy = next(p for p in POLICIES if passage.title.lower().startswith(p.topic))
    city = passage.title[passage.title.index("(") + 1 : passage.title.index(" office)")]
    question = _QUESTIONS[kind].format(topic=policy.topic, city=city, limit=policy.limit, deadline=policy.deadline)
    return question, fact(passage, kind)
