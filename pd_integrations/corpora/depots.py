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

from . import names
from .passages import Passage, RagQuestion, arrange_sentences, check_size, draw_questions

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
# The depot log's pools: cuts of the shared tables, in their order (the generated notes depend on both).
CITIES = tuple(city for city in names.CITIES[:21] if city != "Krakow")
_PEOPLE = tuple(f"{first} {last}" for first in names.FIRST_NAMES[:22] for last in names.LAST_NAMES[:19])
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
    check_size(size, len(DEPOTS))
    rng = random.Random(f"depots-{seed}")
    depots = rng.sample(DEPOTS, size)
    codes = rng.sample(range(1000, 10_000), size)
    people = rng.sample(_PEOPLE, size)
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
        sentences, _ = arrange_sentences(rng, _OPENINGS, facts, _FILLERS, (1, 2), 1)
        passages.append(Passage(i, f"{depot} depot ({slots['city']})", " ".join(sentences).format(**slots)))
    return passages


def make_depot_questions(corpus: list[Passage], n: int, seed: int) -> list[RagQuestion]:
    """`n` questions about distinct passages of `corpus`, drawn by `seed`, alternating the fact kinds (access code,
    site manager). Each answer occurs in exactly one passage (checked; raises `ValueError` if the corpus can't give
    `n` such questions)."""
    return draw_questions(corpus, n, seed, "depot-questions", FACT_KINDS, _ask)


def _ask(passage: Passage, kind: str) -> tuple[str, str]:
    """(the question about `passage`'s fact of `kind`, its answer)."""
    depot = passage.title.split(" depot")[0]
    return _QUESTIONS[kind].format(depot=depot), _fact(passage, kind, depot)


def _fact(passage: Passage, kind: str, depot: str) -> str:
    head = _SENTENCES[kind].split("{depot}")[0] + depot + _SENTENCES[kind].split("{depot}")[1].split("{")[0]
    start = passage.text.index(head) + len(head)
    return passage.text[start : passage.text.index(".", start)]
