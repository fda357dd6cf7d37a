"""A generated depot log: a RAG corpus that the default 135M model can answer with full attention.

Every passage is a short site note about one named depot (the "Falcon depot in Lisbon") and states its facts in
sentences of one form: the depot's access code (a four-digit number), its site manager (a person's name), the
loading dock's number and the day deliveries arrive, plus one or two filler sentences shared by many passages. Every
passage has the same genre and the same kinds of facts, so the all-MiniLM-L6-v2 retriever ranks many look-alike
depot notes next to the answer's, while each depot name occurs in exactly one passage, and each code and name in
exactly one passage: "What is the access code for the Falcon depot?" has one answer.

Compared with the handbook (`handbook.py`), whose questions need a city *and* a policy matched among passages that
share both, a question here names one distinctive word, which is what a 135M model can look up; the handbook
stays for harder prompts. Nothing is downloaded: the corpus is generated from a seed.
"""

from __future__ import annotations

import random

from .handbook import Passage, RagQuestion, contains

FACT_KINDS = ("code", "person")

DEPOTS = (
    "Falcon",
    "Heron",
    "Osprey",
    "Kestrel",
    "Pelican",
    "Condor",
    "Magpie",
    "Starling",
    "Sparrow",
    "Robin",
    "Swallow",
    "Raven",
    "Puffin",
    "Albatross",
    "Flamingo",
    "Peacock",
    "Pheasant",
    "Penguin",
    "Ostrich",
    "Toucan",
    "Badger",
    "Beaver",
    "Otter",
    "Walrus",
    "Bison",
    "Moose",
    "Panther",
    "Jaguar",
    "Leopard",
    "Cheetah",
    "Coyote",
    "Jackal",
    "Lynx",
    "Ocelot",
    "Panda",
    "Koala",
    "Gazelle",
    "Antelope",
    "Buffalo",
    "Camel",
    "Dolphin",
    "Marlin",
    "Salmon",
    "Trout",
    "Sturgeon",
    "Lobster",
    "Oyster",
    "Walnut",
    "Chestnut",
    "Hazel",
    "Maple",
    "Willow",
    "Cedar",
    "Birch",
    "Juniper",
    "Cypress",
    "Magnolia",
    "Sequoia",
    "Acacia",
    "Bamboo",
    "Orchid",
    "Tulip",
    "Daffodil",
    "Lavender",
    "Jasmine",
    "Marigold",
    "Sunflower",
    "Clover",
    "Thistle",
    "Granite",
    "Marble",
    "Basalt",
    "Quartz",
    "Cobalt",
    "Copper",
    "Bronze",
    "Silver",
    "Amber",
    "Coral",
    "Jade",
    "Onyx",
    "Topaz",
    "Garnet",
    "Sapphire",
    "Emerald",
    "Ruby",
    "Pearl",
    "Crystal",
    "Glacier",
    "Canyon",
    "Meadow",
    "Harbour",
    "Lighthouse",
    "Windmill",
    "Comet",
    "Meteor",
    "Nebula",
    "Orbit",
    "Zenith",
    "Horizon",
    "Summit",
    "Beacon",
    "Anchor",
    "Compass",
    "Lantern",
    "Pioneer",
    "Voyager",
    "Mariner",
    "Ranger",
    "Nomad",
    "Pilgrim",
    "Sentinel",
    "Guardian",
    "Trident",
    "Phoenix",
    "Griffin",
    "Dragon",
    "Titan",
    "Atlas",
    "Orion",
    "Pegasus",
    "Hercules",
    "Apollo",
    "Mercury",
    "Neptune",
    "Saturn",
    "Jupiter",
    "Venus",
    "Aurora",
    "Eclipse",
    "Thunder",
    "Tempest",
    "Cyclone",
    "Blizzard",
    "Monsoon",
)
CITIES = (
    "Lisbon",
    "Porto",
    "Madrid",
    "Valencia",
    "Lyon",
    "Marseille",
    "Berlin",
    "Hamburg",
    "Munich",
    "Vienna",
    "Zurich",
    "Geneva",
    "Milan",
    "Turin",
    "Prague",
    "Warsaw",
    "Dublin",
    "Oslo",
    "Stockholm",
    "Helsinki",
)
_FIRST = (
    "Maria",
    "Tomasz",
    "Aisha",
    "Lukas",
    "Sofia",
    "Mateo",
    "Ingrid",
    "Kenji",
    "Amara",
    "Pieter",
    "Elena",
    "Rafael",
    "Nadia",
    "Oskar",
    "Leila",
    "Dmitri",
    "Chiara",
    "Hamid",
    "Freya",
    "Joao",
    "Yara",
    "Bence",
)
_LAST = (
    "Okafor",
    "Wielgus",
    "Lindqvist",
    "Moreau",
    "Kowalski",
    "Fischer",
    "Santos",
    "Novak",
    "Brennan",
    "Haddad",
    "Rossi",
    "Jansen",
    "Petrova",
    "Andersen",
    "Costa",
    "Varga",
    "Nakamura",
    "Mensah",
    "Dubois",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")

_SENTENCES = {
    "code": "The access code for the {depot} depot is {code}.",
    "person": "The site manager of the {depot} depot is {person}.",
}
_OPENINGS = (
    "Site note for the {depot} depot in {city}.",
    "The {depot} depot is a warehouse in {city}.",
    "This note describes the {depot} depot, located in {city}.",
)
_EXTRAS = ("Trucks unload at dock {dock} of the {depot} depot.", "Deliveries reach the {depot} depot every {day}.")
_FILLERS = (
    "Visitors must sign in at the front gate.",
    "Forklifts are inspected every morning before the first shift.",
    "Safety boots are required in the loading area.",
    "The night shift ends at six in the morning.",
    "Parking for visitors is next to the main entrance.",
    "Pallets are stacked no higher than three levels.",
)
_QUESTIONS = {
    "code": "What is the access code for the {depot} depot?",
    "person": "Who is the site manager of the {depot} depot?",
}


def make_depots(seed: int = 0, size: int = len(DEPOTS)) -> list[Passage]:
    """`size` depot notes (at most len(DEPOTS)), the same for the same seed; each about 65–95 tokens of SmolLM2's
    tokenizer, with a unique depot name, access code and site manager. Raises `ValueError` for a size out of
    range."""
    if not 1 <= size <= len(DEPOTS):
        raise ValueError(f"size must be between 1 and {len(DEPOTS)}, got {size}")
    rng = random.Random(f"depots-{seed}")
    depots = rng.sample(DEPOTS, size)
    codes = rng.sample(range(1000, 10_000), size)
    people = rng.sample([f"{a} {b}" for a in _FIRST for b in _LAST], size)
    passages = []
    for i, depot in enumerate(depots):
        slots = {
            "depot": depot,
            "city": rng.choice(CITIES),
            "code": str(codes[i]),
            "person": people[i],
            "dock": rng.randint(1, 20),
            "day": rng.choice(_DAYS),
        }
        facts = [_SENTENCES[kind] for kind in FACT_KINDS] + rng.sample(_EXTRAS, 2)
        rng.shuffle(facts)
        fillers = rng.sample(_FILLERS, rng.randint(1, 2))
        sentences = [rng.choice(_OPENINGS), *facts]
        for filler in fillers:
            sentences.insert(rng.randint(1, len(sentences)), filler)
        passages.append(Passage(i, f"{depot} depot ({slots['city']})", " ".join(sentences).format(**slots)))
    return passages


def make_depot_questions(corpus: list[Passage], n: int, seed: int) -> list[RagQuestion]:
    """`n` questions about distinct passages of `corpus`, drawn by `seed`, alternating the fact kinds (access code,
    site manager). Each answer occurs in exactly one passage (checked; raises `ValueError` if the corpus can't give
    `n` such questions)."""
    rng = random.Random(f"depot-questions-{seed}")
    questions = []
    for passage in rng.sample(corpus, len(corpus)):
        if len(questions) == n:
            break
        kind = FACT_KINDS[(seed + len(questions)) % len(FACT_KINDS)]
        depot = passage.title.split(" depot")[0]
        answer = _fact(passage, kind, depot)
        if sum(contains(p.text, answer) for p in corpus) != 1:
            continue
        questions.append(RagQuestion(_QUESTIONS[kind].format(depot=depot), answer, passage.id))
    if len(questions) < n:
        raise ValueError(f"the corpus holds only {len(questions)} answerable questions, asked for {n}")
    return questions


def _fact(passage: Passage, kind: str, depot: str) -> str:
    head = _SENTENCES[kind].split("{depot}")[0] + depot + _SENTENCES[kind].split("{depot}")[1].split("{")[0]
    start = passage.text.index(head) + len(head)
    return passage.text[start : passage.text.index(".", start)]
