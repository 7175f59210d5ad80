"""A seeded fictional world: entities, kinds, relations and the sentences that state them.

The miniature's stand-in for Wikipedia. Names are invented from syllables, so no pretrained
model can know them; facts are NOT fixed per entity: every rendered document draws fresh
relation values, so the answer to a question is knowable only from the context in front of
the model (nothing about the world can be memorized in pretraining).

Example:
    >>> world = build_world(seed=0)
    >>> rng = random.Random(1)
    >>> fact = world.random_fact(rng, "born_in")
    >>> world.statement(rng, fact)        # e.g. 'Tavor Ilmane was born in Kesrith.'
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

KINDS = ("person", "city", "country", "company")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# Words are kept whole by the tokenizer; this is the split every part of the miniature uses.
WORD_PATTERN = r"\[\d+\]|[A-Za-z0-9]+|[^A-Za-z0-9\s]"


@dataclass(frozen=True)
class Relation:
    """A relation between two kinds, with the ways the world talks about it.

    Attributes:
        name: identifier, e.g. "born_in".
        subject: kind of the subject entity.
        object: kind of the object entity.
        statements: sentence templates with {s} and {o}; one is drawn per mention.
        question: direct question about the subject, with {s}.
        noun: noun phrase for the object given the subject, with {s} ("the birthplace of {s}");
            chained for multi-hop questions.
        label: knowledge-base property name, as MuSiQue writes KB hops ("#1 >> country").
    """

    name: str
    subject: str
    object: str
    statements: tuple[str, ...]
    question: str
    noun: str
    label: str


# Every statement names the subject before the object and ends with it: the object is what
# a question asks for, and a tiny model retrieves "the words after the subject and the
# relation" far sooner than an object written before its subject (measured while choosing
# the recipe: the reversed templates were the ones it missed).
RELATIONS = (
    Relation("born_in", "person", "city",
             ("{s} was born in {o}.", "{s} grew up in the city of {o}.", "The birthplace of {s} is {o}."),
             "Where was {s} born?", "the birthplace of {s}", "place of birth"),
    Relation("works_for", "person", "company",
             ("{s} works for {o}.", "{s} is employed by {o}.", "The employer of {s} is {o}."),
             "Which company does {s} work for?", "the employer of {s}", "employer"),
    Relation("founded_by", "company", "person",
             ("{s} was founded by {o}.", "The founder of {s} is {o}.", "{s} was created by {o}."),
             "Who founded {s}?", "the founder of {s}", "founded by"),
    Relation("located_in", "city", "country",
             ("{s} is a city in {o}.", "{s} lies in the country of {o}.", "{s} is located in {o}."),
             "Which country is {s} in?", "the country of {s}", "country"),
    Relation("based_in", "company", "city",
             ("{s} has its headquarters in {o}.", "{s} is based in {o}.", "The main office of {s} is in {o}."),
             "Where is {s} based?", "the headquarters of {s}", "headquarters location"),
    Relation("led_by", "country", "person",
             ("{s} is led by {o}.", "The leader of {s} is {o}.", "{s} is governed by {o}."),
             "Who leads {s}?", "the leader of {s}", "head of state"),
    Relation("mayor_of", "city", "person",
             ("The mayor of {s} is {o}.", "{s} is run by the mayor {o}.", "{s} elected the mayor {o}."),
             "Who is the mayor of {s}?", "the mayor of {s}", "head of government"),
    Relation("capital_of", "country", "city",
             ("The capital of {s} is {o}.", "{s} is governed from its capital {o}.",
              "The seat of government of {s} is {o}."),
             "What is the capital of {s}?", "the capital of {s}", "capital"),
)
RELATION_BY_NAME = {r.name: r for r in RELATIONS}

# Linear three-hop chains (MuSiQue's "3hop1" shape): each relation's object kind is the
# next relation's subject kind.
CHAINS = (
    ("founded_by", "born_in", "located_in"),
    ("works_for", "based_in", "located_in"),
    ("works_for", "founded_by", "born_in"),
    ("mayor_of", "works_for", "based_in"),
    ("led_by", "born_in", "located_in"),
    ("capital_of", "mayor_of", "works_for"),
    ("based_in", "mayor_of", "born_in"),
    ("founded_by", "works_for", "based_in"),
)

# Sentences that describe an entity without stating any relation: the varied wording of a
# document around its facts.
DESCRIPTIONS = {
    "person": ("{s} is known for {adj} {topic}.", "{s} often writes about {adj} {topic}.",
               "Many people admire {s} for a {adj} view of {topic}.", "{s} spent years studying {topic}.",
               "Friends describe {s} as {adj} and patient."),
    "city": ("{s} is famous for its {adj} {place}.", "Visitors to {s} enjoy the {adj} {place}.",
             "{s} has a {adj} {place} near the old market.", "The people of {s} are proud of their {place}.",
             "Every spring {s} holds a festival of {topic}."),
    "country": ("{s} is known for {adj} {topic}.", "The hills of {s} are {adj} in summer.",
                "{s} trades in {topic} with its neighbours.", "Travellers say {s} has a {adj} {place}.",
                "The history of {s} is full of {topic}."),
    "company": ("{s} makes {adj} tools for {topic}.", "{s} sells {topic} across the region.",
                "{s} is a {adj} firm with many clients.", "Workers at {s} focus on {topic}.",
                "{s} opened a {adj} {place} last year."),
}
ADJECTIVES = ("quiet", "bright", "ancient", "modern", "busy", "gentle", "famous", "small", "large", "calm",
              "careful", "bold", "green", "golden", "narrow", "wide")
TOPICS = ("music", "farming", "trade", "poetry", "rivers", "ships", "weather", "stone", "glass", "bread",
          "maps", "clocks", "wool", "salt", "bridges", "gardens")
PLACES = ("harbour", "library", "market", "bridge", "tower", "garden", "museum", "square", "theatre",
          "station", "park", "temple")

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st",
          "th", "tr", "sh", "gr")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
CODAS = ("", "", "n", "r", "l", "s", "th", "rn", "nd", "x")
SUFFIXES = {"city": ("ar", "on", "ith", "mar", "ford", "holm"), "country": ("ia", "and", "ora", "esh"),
            "company": ("corp", "works", "tek", "line"), "person": ("",)}


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str


@dataclass(frozen=True)
class Fact:
    subject: Entity
    relation: Relation
    object: Entity


@dataclass(frozen=True)
class World:
    """The entities of a seeded world, split into the roles a rendered dataset needs.

    Attributes:
        seed: the seed the world was built from.
        entities: kind -> all names of that kind.
        first_names / last_names: the pieces of person names (each a vocabulary word).
    """

    seed: int
    entities: dict[str, tuple[Entity, ...]]
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]

    def of_kind(self, kind: str) -> tuple[Entity, ...]:
        return self.entities[kind]

    def random_entity(self, rng: random.Random, kind: str, exclude: set[str] = frozenset()) -> Entity:
        pool = self.entities[kind]
        while True:
            entity = pool[rng.randrange(len(pool))]
            if entity.name not in exclude:
                return entity

    def random_fact(self, rng: random.Random, relation: str, subject: Entity | None = None,
                    exclude: set[str] = frozenset()) -> Fact:
        """A fresh fact: the object is drawn anew on every call (nothing to memorize)."""
        rel = RELATION_BY_NAME[relation]
        subject = subject or self.random_entity(rng, rel.subject, exclude)
        obj = self.random_entity(rng, rel.object, set(exclude) | {subject.name})
        return Fact(subject, rel, obj)

    def statement(self, rng: random.Random, fact: Fact) -> str:
        template = rng.choice(fact.relation.statements)
        return capitalize(template.format(s=fact.subject.name, o=fact.object.name))

    def description(self, rng: random.Random, entity: Entity, template: str | None = None) -> str:
        template = template or rng.choice(DESCRIPTIONS[entity.kind])
        return capitalize(template.format(s=entity.name, adj=rng.choice(ADJECTIVES), topic=rng.choice(TOPICS),
                                          place=rng.choice(PLACES)))

    def paragraph(self, rng: random.Random, entity: Entity, facts: list[Fact], n_descriptions: int | None = None,
                  avoid: set[str] = frozenset()) -> str:
        """A short encyclopedic paragraph about `entity` stating `facts` amid descriptions.

        Paragraphs are short (by default no or one description, a second fact half the time)
        so that several documents fit the miniature's pretraining length. Extra facts about
        the entity are drawn only from relations outside `avoid`, so a distractor never
        states the asked relation unless the caller puts it in `facts`.
        """
        if n_descriptions is None:
            n_descriptions = rng.randint(0, 1)
        sentences = [self.statement(rng, f) for f in facts]
        own = [r for r in RELATIONS if r.subject == entity.kind and r.name not in avoid
               and r.name not in {f.relation.name for f in facts}]
        if own and rng.random() < 0.5:
            sentences.append(self.statement(rng, self.random_fact(rng, rng.choice(own).name, subject=entity)))
        templates = rng.sample(DESCRIPTIONS[entity.kind], min(n_descriptions, len(DESCRIPTIONS[entity.kind])))
        sentences += [self.description(rng, entity, t) for t in templates]
        # Every sentence names the entity, so any order reads as an encyclopedia entry.
        rng.shuffle(sentences)
        return " ".join(sentences)

    def words(self) -> list[str]:
        """Every word the world can write (names, templates, fillers), for the tokenizer."""
        texts = [e.name for kind in KINDS for e in self.entities[kind]]
        for r in RELATIONS:
            texts += list(r.statements) + [r.question, r.noun, r.label]
        for templates in DESCRIPTIONS.values():
            texts += list(templates)
        texts += list(ADJECTIVES + TOPICS + PLACES) + [FILLER]
        words = []
        for text in texts:
            words += re.findall(WORD_PATTERN, text.replace("{s}", "").replace("{o}", "")
                                .replace("{adj}", "").replace("{topic}", "").replace("{place}", ""))
        return words


def capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def invent_names(rng: random.Random, n: int, suffixes: tuple[str, ...], taken: set[str]) -> list[str]:
    names = []
    while len(names) < n:
        syllables = [rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.randint(1, 2))]
        name = ("".join(syllables) + rng.choice(suffixes)).capitalize()
        if 4 <= len(name) <= 10 and name.lower() not in taken:
            taken.add(name.lower())
            names.append(name)
    return names


def build_world(seed: int = 0, n_people: int = 240, n_cities: int = 80, n_countries: int = 30,
                n_companies: int = 60) -> World:
    """Builds the world of `seed`: same seed, same names, always.

    Args:
        seed: world seed.
        n_people: person count (names are "First Last" from smaller pools of each).
        n_cities / n_countries / n_companies: entity counts of the other kinds.
    """
    rng = random.Random(seed)
    taken = {w.lower() for w in re.findall(WORD_PATTERN, " ".join(
        list(ADJECTIVES + TOPICS + PLACES) + [FILLER] + [t for r in RELATIONS for t in r.statements]))}
    n_first = max(4, int(n_people ** 0.5) * 2)
    first = invent_names(rng, n_first, SUFFIXES["person"], taken)
    last = invent_names(rng, n_first, SUFFIXES["person"], taken)
    pairs = sorted({(a, b) for a in first for b in last})
    rng.shuffle(pairs)
    people = tuple(Entity(f"{a} {b}", "person") for a, b in pairs[:n_people])
    entities = {
        "person": people,
        "city": tuple(Entity(n, "city") for n in invent_names(rng, n_cities, SUFFIXES["city"], taken)),
        "country": tuple(Entity(n, "country") for n in invent_names(rng, n_countries, SUFFIXES["country"], taken)),
        "company": tuple(Entity(n, "company") for n in invent_names(rng, n_companies, SUFFIXES["company"], taken)),
    }
    return World(seed=seed, entities=entities, first_names=tuple(first), last_names=tuple(last))
