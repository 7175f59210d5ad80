"""Fictional entities and their facts, as templates and as synthesis requests.

Zhao et al. (2025, Section 2.2): high concept expression describes fictional entities in
natural, LLM-written text (Wikipedia-style paragraphs, one sentence per fact); low concept
expression names them with 4-character symbols in templated sentences. Templates here are
the no-LLM fallback and the low-expression text; their words come from `options` so a
small-vocabulary tokenizer can be served.

Example:
    >>> import random
    >>> rng = random.Random(0)
    >>> facts = [("Velorin", "founder", "Drathis")]
    >>> text = template_paragraph(rng, "Velorin", facts, OPTIONS_DEFAULTS)
    >>> "Drathis" in text
    True
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tasks import symbols as sym
from tasks.build import generate, request

# Options every task accepts for its synthetic variants (overridable from YAML `options:`).
OPTIONS_DEFAULTS = {
    "filler": sym.FILLER,
    "symbol_alphabet": sym.SYMBOL_ALPHABET,
    "symbol_length": sym.SYMBOL_LENGTH,
    "entity_names": None,  # list of names; None invents pronounceable names
    "relations": list(sym.RELATIONS),
    "fact_frames": list(sym.FACT_FRAMES),
    "color_sentences": list(sym.COLOR_SENTENCES),
    "symbol_frame": "The {r} of {e} is {v}.",  # low concept expression: one fixed template
    "question_frame": sym.QUESTION_FRAME,
    "facts_per_paragraph": 3,
    "pool_size": 400,  # fictional haystack paragraphs generated once per build
}


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    value: str


def fact_sentence(fact: Fact, frame: str) -> str:
    return frame.format(e=fact.entity, r=fact.relation, v=fact.value)


def template_paragraph(rng: random.Random, entity: str, facts, opts: dict) -> str:
    """A varied paragraph about `entity`: one sentence per fact plus colour sentences."""
    sentences = [fact_sentence(Fact(*f) if not isinstance(f, Fact) else f, rng.choice(opts["fact_frames"]))
                 for f in facts]
    colour = [c.format(e=entity) for c in opts["color_sentences"]]
    for c in rng.sample(colour, min(len(colour), rng.randint(1, 2))):
        sentences.insert(rng.randint(0, len(sentences)), c)
    return " ".join(sentences)


def random_facts(rng: random.Random, entity: str, n: int, opts: dict, value_pool: list[str]) -> list[Fact]:
    rels = rng.sample(list(opts["relations"]), min(n, len(opts["relations"])))
    return [Fact(entity, r, rng.choice(value_pool)) for r in rels]


_PARA = re.compile(r"^\s*Title:\s*(.*?)\s*\n\s*Paragraph:\s*(.*?)\s*(?:\n\s*Question:.*)?$", re.DOTALL)


def canonical_paragraph(title: str, text: str) -> str:
    """The synthesizer's canonical paragraph form (also what templates must produce)."""
    return f"Title: {title}\nParagraph: {text}"


def parse_paragraph(text: str) -> tuple[str, str] | None:
    """(title, paragraph) of a `Title: ...\\nParagraph: ...` text; None if malformed."""
    m = _PARA.match(text)
    if not m or not m.group(2).strip():
        return None
    return m.group(1).strip(), " ".join(m.group(2).split())


def paragraph_request(rng: random.Random, entity: str, facts: list[Fact], opts: dict, seed: int,
                      answer: str | None = None):
    """A fictional_paragraph request whose template is a varied template paragraph."""
    template = canonical_paragraph(entity, template_paragraph(rng, entity, facts, opts))
    fields = dict(entity=entity, facts="; ".join(fact_sentence(f, "The {r} of {e} is {v}.") for f in facts))
    if answer is not None:
        fields["answer"] = answer
    return request("fictional_paragraph", template, seed, **fields)


def paragraph_pool(rng: random.Random, opts: dict, synth, exclude: set[str], seed: int) -> list[tuple[str, str]]:
    """`pool_size` (title, paragraph) pairs about fictional entities not in `exclude`."""
    n = int(opts["pool_size"])
    ents = sym.names(rng, n, opts["entity_names"], exclude=exclude) if not opts["entity_names"] else \
        [rng.choice([e for e in opts["entity_names"] if e not in exclude] or opts["entity_names"]) for _ in range(n)]
    values = value_pool(rng, opts, exclude)
    reqs = [paragraph_request(rng, e, random_facts(rng, e, int(opts["facts_per_paragraph"]), opts, values), opts,
                              seed * 100_003 + i) for i, e in enumerate(ents)]
    out = []
    for text in generate(synth, reqs):
        parsed = parse_paragraph(text)
        if parsed is not None:
            out.append(parsed)
    return out


def value_pool(rng: random.Random, opts: dict, exclude: set[str] = frozenset(), n: int = 200) -> list[str]:
    if opts["entity_names"]:
        return [e for e in opts["entity_names"] if e not in exclude] or list(opts["entity_names"])
    return sym.names(rng, n, exclude=set(exclude))
