"""Renders the miniature world into the public file formats of the three real tasks.

The demo reads its "real" data through the same loaders as the real datasets, so the world
is written exactly in their formats:
- MDQA, Liu et al. 2023 "Lost in the Middle" (nelson-liu/lost-in-the-middle, qa_data/*.jsonl.gz):
  {"question", "answers", "ctxs": [{"id", "title", "text", "hasanswer", "isgold"}]}, plus a
  passage pool JSONL of {"id", "title", "text"} from which longer contexts draw distractors.
- MuSiQue, Trivedi et al. 2022 (musique_ans_v1.0_*.jsonl): {"id", "paragraphs": [{"idx",
  "title", "paragraph_text", "is_supporting"}], "question", "question_decomposition": [{"id",
  "question", "answer", "paragraph_support_idx"}], "answer", "answer_aliases", "answerable"},
  linear 3-hop only ("3hop1__...").
- SummHay, Laban et al. 2024 (salesforce/summary-of-a-haystack): a JSON list of topics (the
  rows of the Hugging Face release; data/topic_*.json holds one each), with "subtopics" -> "insights" [{"insight_id", "insight_name", "insight"}] and
  "documents" [{"document_id", "document_text", "document_metadata", "insights_included"}].
  Every insight is included in exactly two of a topic's documents (the citation task's shape).

Each entity kind is split three ways: train subjects, eval subjects, background (pool and
distractor titles), so a distractor never states a conflicting fact about a question's subject.

Example:
    >>> sources = render_sources(build_world(seed=0), Path("/tmp/mini"))
    >>> sources["musique"]["eval"]           # '/tmp/mini/musique/eval.jsonl'
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .world import ADJECTIVES, CHAINS, KINDS, PLACES, RELATIONS, TOPICS, Entity, World, capitalize

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class SourceSizes:
    """How much of each public format to render."""

    mdqa_train: int = 600
    mdqa_eval: int = 200
    mdqa_docs: int = 10  # ctxs per question, gold included
    mdqa_pool: int = 1000
    musique_train: int = 400
    musique_eval: int = 100
    musique_paragraphs: int = 10  # 3 supporting + distractors
    summhay_train: int = 40  # topics; each yields one citation question per insight
    summhay_eval: int = 10
    summhay_docs: int = 10
    summhay_insights: int = 12


@dataclass(frozen=True)
class Roles:
    """Entities by role: question subjects per split, and background entities."""

    subjects: dict[str, dict[str, tuple[Entity, ...]]]  # split -> kind -> entities
    background: dict[str, tuple[Entity, ...]]  # kind -> entities


def split_roles(world: World) -> Roles:
    subjects = {s: {} for s in SPLITS}
    background = {}
    for kind in KINDS:
        pool = world.of_kind(kind)
        a, b = int(len(pool) * 0.5), int(len(pool) * 0.7)
        subjects["train"][kind], subjects["eval"][kind], background[kind] = pool[:a], pool[a:b], pool[b:]
    return Roles(subjects, background)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def mdqa_record(world: World, roles: Roles, rng: random.Random, split: str, n_docs: int) -> dict:
    relation = rng.choice(RELATIONS)
    subject = rng.choice(roles.subjects[split][relation.subject])
    gold = world.random_fact(rng, relation.name, subject=subject)
    answer = gold.object.name
    ctxs = [{"title": subject.name, "text": world.paragraph(rng, subject, [gold]), "isgold": True}]
    titles = {subject.name}
    while len(ctxs) < n_docs:
        # Hard negatives: other entities of the subject's kind, stating the same relation
        # (any entity but the subject: the example is self-contained).
        other = world.random_entity(rng, relation.subject, titles)
        titles.add(other.name)
        fact = world.random_fact(rng, relation.name, subject=other, exclude={answer})
        ctxs.append({"title": other.name, "text": world.paragraph(rng, other, [fact]), "isgold": False})
    rng.shuffle(ctxs)
    for i, ctx in enumerate(ctxs):
        ctx["id"] = str(rng.getrandbits(31))
        ctx["hasanswer"] = answer in ctx["text"]
    return {"question": relation.question.format(s=subject.name), "answers": [answer],
            "ctxs": [{k: c[k] for k in ("id", "title", "text", "hasanswer", "isgold")} for c in ctxs]}


def mdqa_pool(world: World, roles: Roles, rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        kind = rng.choice(KINDS)
        entity = rng.choice(roles.background[kind])
        own = [r for r in RELATIONS if r.subject == kind]
        facts = [world.random_fact(rng, r.name, subject=entity) for r in rng.sample(own, rng.randint(0, len(own)))]
        rows.append({"id": f"pool{i}", "title": entity.name, "text": world.paragraph(rng, entity, facts)})
    return rows


def chain_question(chain: tuple[str, ...], start: str) -> str:
    relations = {r.name: r for r in RELATIONS}
    phrase = start
    for name in chain:
        phrase = relations[name].noun.format(s=phrase)
    wh = "Who" if relations[chain[-1]].object == "person" else "What"
    return f"{wh} is {phrase}?"


def musique_record(world: World, roles: Roles, rng: random.Random, split: str, n_paragraphs: int,
                   index: int) -> dict:
    chain = rng.choice(CHAINS)
    relations = {r.name: r for r in RELATIONS}
    start = rng.choice(roles.subjects[split][relations[chain[0]].subject])
    facts, used, entity = [], {start.name}, start
    for name in chain:
        fact = world.random_fact(rng, name, subject=entity, exclude=used)
        facts.append(fact)
        used.add(fact.object.name)
        entity = fact.object
    paragraphs = [{"title": f.subject.name, "paragraph_text": world.paragraph(rng, f.subject, [f]),
                   "is_supporting": True, "hop": h} for h, f in enumerate(facts)]
    while len(paragraphs) < n_paragraphs:
        name = rng.choice(chain)
        other = world.random_entity(rng, relations[name].subject, used)
        used.add(other.name)
        fact = world.random_fact(rng, name, subject=other, exclude={facts[-1].object.name})
        paragraphs.append({"title": other.name, "paragraph_text": world.paragraph(rng, other, [fact]),
                           "is_supporting": False, "hop": None})
    rng.shuffle(paragraphs)
    support = {p["hop"]: i for i, p in enumerate(paragraphs) if p["is_supporting"]}
    ids = [rng.randrange(1, 100000) for _ in chain]
    # MuSiQue writes knowledge-base hops as "entity >> property" and text hops as questions;
    # half the records are all-KB, the subset `real_limited` keeps.
    kb = rng.random() < 0.5
    decomposition = []
    for h, (name, fact) in enumerate(zip(chain, facts)):
        subject = fact.subject.name if h == 0 else f"#{h}"
        question = f"{subject} >> {relations[name].label}" if kb else relations[name].question.format(s=subject)
        decomposition.append({"id": ids[h], "question": question,
                              "answer": fact.object.name, "paragraph_support_idx": support[h]})
    return {
        "id": f"3hop1__{index}_" + "_".join(map(str, ids)),
        "paragraphs": [{"idx": i, "title": p["title"], "paragraph_text": p["paragraph_text"],
                        "is_supporting": p["is_supporting"]} for i, p in enumerate(paragraphs)],
        "question": chain_question(chain, start.name),
        "question_decomposition": decomposition,
        "answer": facts[-1].object.name,
        "answer_aliases": [],
        "answerable": True,
    }


# Insight templates per subtopic; slots are filled with fresh entities for every insight.
SUBTOPICS = {
    "business": ("{company} hired {n} new workers to make tools for {topic}.",
                 "{company} moved its {place} from {city} to {city2}.",
                 "{person} said that prices of {topic} rose by {n} percent.",
                 "{company} and {company2} agreed to share a {place} in {city}."),
    "government": ("{country} lowered the tax on {topic} by {n} percent.",
                   "{person} announced a new {place} for {city}.",
                   "The council of {city} voted {n} times on the {adj} {place}.",
                   "{person} asked {country} to protect the {adj} {place}."),
    "culture": ("{person} opened a festival of {topic} in {city}.",
                "The {place} in {city} showed {n} works about {topic}.",
                "{person} and {person2} wrote a {adj} song about {topic}.",
                "Students from {city} built a {adj} {place} for {topic}."),
}


def insight_text(world: World, rng: random.Random, template: str) -> str:
    slots = {"topic": rng.choice(TOPICS), "place": rng.choice(PLACES), "adj": rng.choice(ADJECTIVES),
             "n": str(rng.randint(2, 99))}
    for kind in ("company", "city", "country", "person"):
        first = world.random_entity(rng, kind)
        slots[kind] = first.name
        slots[f"{kind}2"] = world.random_entity(rng, kind, {first.name}).name
    return capitalize(template.format(**slots))


def object_id(rng: random.Random) -> str:
    return f"{rng.getrandbits(96):024x}"


def summhay_topic(world: World, roles: Roles, rng: random.Random, split: str, n_docs: int,
                  n_insights: int) -> dict:
    if n_insights * 2 < n_docs:
        raise ValueError(f"summhay: {n_insights} insights cannot cover {n_docs} documents twice")
    city = rng.choice(roles.subjects[split]["city"])
    names = list(SUBTOPICS)
    subtopics, insights = [], []
    for s, name in enumerate(names):
        own = []
        for k in range(s, n_insights, len(names)):
            text = insight_text(world, rng, rng.choice(SUBTOPICS[name]))
            while text in {i["insight"] for i in insights}:
                text = insight_text(world, rng, rng.choice(SUBTOPICS[name]))
            insight = {"insight_id": object_id(rng), "insight_name": f"{name} {k + 1}", "insight": text}
            own.append(insight)
            insights.append(insight)
        subtopics.append({"subtopic_id": object_id(rng), "subtopic_name": name,
                          "subtopic": f"News about {name} in {city.name}.", "insights": own,
                          "query": f"What happened in {name} in {city.name}?"})
    # Each insight goes to exactly two documents; the first pass guarantees every document
    # gets at least one.
    placements = {d: [] for d in range(n_docs)}
    order = list(range(n_docs))
    rng.shuffle(order)
    for i, insight in enumerate(insights):
        first = order[i] if i < n_docs else rng.randrange(n_docs)
        second = rng.choice([d for d in range(n_docs) if d != first])
        placements[first].append(insight)
        placements[second].append(insight)
    documents = []
    for d in range(n_docs):
        sentences = [i["insight"] for i in placements[d]]
        sentences += [world.description(rng, city) for _ in range(rng.randint(1, 3))]
        rng.shuffle(sentences)
        documents.append({"document_id": object_id(rng), "document_text": " ".join(sentences),
                          "document_metadata": {"title": f"Report on {city.name}"},
                          "insights_included": [i["insight_id"] for i in placements[d]]})
    return {"topic_id": object_id(rng), "topic": f"Life in {city.name}",
            "topic_metadata": {"participants": []}, "subtopics": subtopics, "documents": documents}


def render_sources(world: World, out_dir: Path, sizes: SourceSizes = SourceSizes()) -> dict[str, dict[str, str]]:
    """Writes the world as MDQA, MuSiQue and SummHay source files; returns their paths.

    Args:
        world: the world to render; its seed seeds the rendering too.
        out_dir: directory to write into (created).
        sizes: record counts.

    Returns:
        {"mdqa": {"train", "eval", "pool"}, "musique": {"train", "eval"},
        "summhay": {"train", "eval"}} -> path strings; a SummHay path is a JSON list of topics.
    """
    out_dir = Path(out_dir)
    roles = split_roles(world)
    paths: dict[str, dict[str, str]] = {"mdqa": {}, "musique": {}, "summhay": {}}
    for k, split in enumerate(SPLITS):
        rng = random.Random(f"{world.seed}-mdqa-{split}")
        n = sizes.mdqa_train if split == "train" else sizes.mdqa_eval
        path = out_dir / "mdqa" / f"{split}.jsonl"
        write_jsonl(path, [mdqa_record(world, roles, rng, split, sizes.mdqa_docs) for _ in range(n)])
        paths["mdqa"][split] = str(path)

        rng = random.Random(f"{world.seed}-musique-{split}")
        n = sizes.musique_train if split == "train" else sizes.musique_eval
        path = out_dir / "musique" / f"{split}.jsonl"
        write_jsonl(path, [musique_record(world, roles, rng, split, sizes.musique_paragraphs, i)
                           for i in range(n)])
        paths["musique"][split] = str(path)

        rng = random.Random(f"{world.seed}-summhay-{split}")
        n = sizes.summhay_train if split == "train" else sizes.summhay_eval
        # A JSON list of topics: the rows of the Hugging Face release (one topic per row).
        topics = [summhay_topic(world, roles, rng, split, sizes.summhay_docs, sizes.summhay_insights)
                  for _ in range(n)]
        path = out_dir / "summhay" / f"{split}.json"
        write_atomic(path, json.dumps(topics, indent=1))
        paths["summhay"][split] = str(path)
    rng = random.Random(f"{world.seed}-pool")
    path = out_dir / "mdqa" / "pool.jsonl"
    write_jsonl(path, mdqa_pool(world, roles, rng, sizes.mdqa_pool))
    paths["mdqa"]["pool"] = str(path)
    return paths
