"""Drill sequences: the three tasks' prompt formats with several questions per context.

A task prompt supervises two to nine answer tokens after a hundred or more context tokens.
A drill keeps the task's own instructions, documents and question lines (imported from
`tasks/`, so the formats cannot drift apart) but asks several questions about the same
documents, each answer followed by </s>: the binding of a subject and a relation to the
right object, of a statement to its two documents, and of a chain of hops, is learned from
several answers per forward pass. Lengths vary from one document to the pretraining
length, which makes a curriculum on the number of documents; the facts are fresh in every
sequence, so only reading the context answers them.

- mdqa: entity paragraphs, many of one kind stating the same relation (the hard negatives
  of `sources.mdqa_record`), then questions on facts of any document;
- musique: a three-hop chain of paragraphs among paragraphs stating the chain's relations
  about other entities, then its one-, two- and three-hop questions, hops written before the
  final answer (the task's `answer_hops` option);
- summhay: numbered documents of insight and description sentences, every insight in
  exactly two documents, then statements with their two document numbers.

Example:
    >>> ids, labels = drill("mdqa", random.Random(0), world, tokenizer, length=192)
"""

from __future__ import annotations

import random

from tasks import mdqa, musique, summhay

from .sources import SUBTOPICS, chain_question, insight_text
from .world import CHAINS, DESCRIPTIONS, RELATION_BY_NAME, RELATIONS, Fact, World

DRILLS = ("mdqa", "musique", "summhay")


class _Sequence:
    """Token ids and labels built piece by piece (labels -100 except on answers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids, self.labels = [tokenizer.bos_token_id], [-100]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def context(self, pieces: list[int]) -> None:
        self.ids += pieces
        self.labels += [-100] * len(pieces)

    def answer(self, prompt: str, answer: str) -> None:
        self.context(self.encode(prompt))
        out = self.encode(" " + answer) + [self.tokenizer.eos_token_id]
        self.ids += out
        self.labels += out


def _body(world: World, rng: random.Random, entity, facts: list[Fact]) -> str:
    """A document after its number: `(Title: t) paragraph` (the tokenizer splits at spaces,
    so the number and the body tokenize apart exactly as together)."""
    avoid = {f.relation.name for f in facts}
    return f"(Title: {entity.name}) " + world.paragraph(rng, entity, facts, avoid=avoid) + "\n"


def _documents(seq: _Sequence, bodies: list[list[int]]) -> None:
    for n, body in enumerate(bodies, start=1):
        seq.context(seq.encode(f"Document [{n}]") + body)


def _longest_question(world: World, seq: _Sequence) -> int:
    """Tokens of the longest MDQA question line with its answer and </s> (names are at most
    as long as a person's)."""
    name = world.of_kind("person")[0].name
    return max(len(seq.encode(mdqa.TAIL.format(q=r.question.format(s=name)) + " " + name)) + 1 for r in RELATIONS)


def mdqa_drill(rng: random.Random, world: World, tokenizer, length: int, questions: int = 3):
    """MDQA-format documents, then one to `questions` questions on their facts."""
    questions = rng.randint(1, questions)
    seq = _Sequence(tokenizer)
    seq.context(seq.encode(mdqa.HEAD))
    relation = rng.choice(RELATIONS)
    room = length - len(seq.ids) - questions * _longest_question(world, seq)
    bodies, facts, seen = [], [], set()
    while True:
        # Most documents are about the asked kind and state the same relation (hard negatives).
        if rng.random() < 0.6:
            entity = world.random_entity(rng, relation.subject, exclude=seen)
            chosen = [world.random_fact(rng, relation.name, subject=entity)]
        else:
            kind = rng.choice(tuple(DESCRIPTIONS))
            entity = world.random_entity(rng, kind, exclude=seen)
            own = [r.name for r in RELATIONS if r.subject == kind]
            chosen = [world.random_fact(rng, name, subject=entity) for name in rng.sample(own, rng.randint(1, 2))]
        body = seq.encode(_body(world, rng, entity, chosen))
        if sum(map(len, bodies)) + len(body) + 3 * (len(bodies) + 1) > room:
            break
        seen.add(entity.name)
        bodies.append(body)
        facts += chosen
    if not facts:
        return None
    _documents(seq, bodies)
    for fact in rng.sample(facts, min(questions, len(facts))):
        seq.answer(mdqa.TAIL.format(q=fact.relation.question.format(s=fact.subject.name)), fact.object.name)
    return seq.ids, seq.labels


def musique_drill(rng: random.Random, world: World, tokenizer, length: int):
    """A three-hop chain among distractor paragraphs, then its 1-, 2- and 3-hop questions."""
    seq = _Sequence(tokenizer)
    seq.context(seq.encode(musique.HEAD))
    chain = rng.choice(CHAINS)
    entity = world.random_entity(rng, RELATION_BY_NAME[chain[0]].subject)
    hops, used = [], {entity.name}
    for name in chain:
        fact = world.random_fact(rng, name, subject=entity, exclude=used)
        hops.append(fact)
        used.add(fact.object.name)
        entity = fact.object
    asked = []  # the three-hop question, and shorter ones from a random hop half the time
    for size in (3, 2, 1):
        if size < 3 and rng.random() < 0.5:
            continue
        first = rng.randint(0, 3 - size)
        part = hops[first:first + size]
        asked.append((musique.TAIL.format(q=chain_question(chain[first:first + size], part[0].subject.name)),
                      musique.HOP_SEPARATOR.join(f.object.name for f in part)))
    rng.shuffle(asked)
    room = length - len(seq.ids) - sum(len(seq.encode(q + " " + a)) + 1 for q, a in asked)
    bodies = [seq.encode(_body(world, rng, f.subject, [f])) for f in hops]
    while True:  # paragraphs stating the chain's relations about other entities
        name = rng.choice(chain)
        other = world.random_entity(rng, RELATION_BY_NAME[name].subject, used)
        fact = world.random_fact(rng, name, subject=other, exclude={hops[-1].object.name})
        body = seq.encode(_body(world, rng, other, [fact]))
        if sum(map(len, bodies)) + len(body) + 3 * (len(bodies) + 1) > room:
            break
        used.add(other.name)
        bodies.append(body)
    if sum(map(len, bodies)) + 3 * len(bodies) > room:
        return None  # the chain alone does not fit
    rng.shuffle(bodies)
    _documents(seq, bodies)
    for question, answer in asked:
        seq.answer(question, answer)
    return seq.ids, seq.labels


def summhay_drill(rng: random.Random, world: World, tokenizer, length: int, questions: int = 2):
    """SummHay-format documents, each insight in exactly two, then one to `questions`
    statements to cite; as many documents (up to ten) as fit."""
    questions = rng.randint(1, questions)
    seq = _Sequence(tokenizer)
    seq.context(seq.encode(summhay.HEAD))
    city = world.random_entity(rng, "city")
    for n_docs in range(summhay.N_DOCS, 1, -1):
        n_insights = -(-n_docs // 2) + rng.randint(0, 1)
        insights = []
        while len(insights) < n_insights:
            text = insight_text(world, rng, rng.choice(rng.choice(list(SUBTOPICS.values()))))
            if text not in insights:
                insights.append(text)
        # Every document holds an insight: the first n_docs slots are the documents in random order.
        slots = rng.sample(range(n_docs), n_docs) + [rng.randrange(n_docs) for _ in range(2 * n_insights - n_docs)]
        placements, cited = {d: [] for d in range(n_docs)}, {}
        for i, text in enumerate(insights):
            a, b = slots[2 * i], slots[2 * i + 1]
            if a == b:
                b = rng.choice([d for d in range(n_docs) if d != a])
            placements[a].append(text)
            placements[b].append(text)
            cited[text] = f"[{min(a, b) + 1}][{max(a, b) + 1}]"
        bodies = []
        for d in range(n_docs):
            sentences = placements[d] + [world.description(rng, city) for _ in range(rng.randint(0, 1))]
            rng.shuffle(sentences)
            bodies.append(seq.encode(":\n" + " ".join(sentences) + "\n\n"))
        asked = [(summhay.TAIL.format(s=t), cited[t]) for t in rng.sample(insights, min(questions, n_insights))]
        tail = sum(len(seq.encode(q + " " + a)) + 1 for q, a in asked)
        if len(seq.ids) + sum(map(len, bodies)) + 3 * n_docs + tail <= length:
            break
    else:
        return None
    _documents(seq, bodies)
    for question, answer in asked:
        seq.answer(question, answer)
    return seq.ids, seq.labels


def drill(task: str, rng: random.Random, world: World, tokenizer, length: int):
    """(ids, labels) of one drill of `task` within `length` tokens, or None if none fits."""
    if task == "mdqa":
        return mdqa_drill(rng, world, tokenizer, length)
    if task == "musique":
        return musique_drill(rng, world, tokenizer, length)
    if task == "summhay":
        return summhay_drill(rng, world, tokenizer, length)
    raise ValueError(f"drill: unknown task {task!r}; choose from {DRILLS}")
