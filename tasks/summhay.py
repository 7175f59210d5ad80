"""SummHay citation: which two of ten documents state an insight? (Zhao et al. 2025, Sec. 2-3).

Real: from Summary of a Haystack topic files (Laban et al., 2024; the format of
`data/topic_*.json` in salesforce/summary-of-a-haystack: `subtopics[].insights[]` with
`insight_id`/`insight`, `documents[]` with `document_text`/`insights_included`), ten
documents of one topic where the queried insight is contained in exactly two; the answer
is their numbers, `[i][j]`, sorted. The insight's needle in each document is the sentence
closest to it (token F1). Documents are truncated by sentences or padded with filler
sentences to the target length. `real_limited` keeps insights of some subtopics.
Synthetic: an insight about a fictional entity, rephrased per document (hh among fictional
paragraphs, hl in filler), or simplified to a symbol template (lh, ll); symbolic: lists of
4-character strings, the queried string in exactly two lists.

Sources: `train`, `eval`: a topic JSON file, a JSON list of topics, JSONL (one topic per
line), or a directory of them.

Example:
    >>> from tasks import summhay
    >>> res = summhay.build("ll", sources={}, options={}, tokenizer=tok, target_tokens=2048, n=2,
    ...                     seed=0, split="train")
    >>> summhay.score(res.examples[0].target, res.examples[0])["f1"]
    1.0
"""

from __future__ import annotations

import random
import sys
import re
from collections import Counter
from pathlib import Path

from tasks import fiction
from tasks import symbols as sym
from tasks.build import (BuildResult, DataError, build_variant, count, generate, in_eval_partition, make_example,
                         read_json, read_jsonl, request, same_file, source_path)
from tasks.example import Example
from tasks.fitting import Draft, FitRequest, Segment, TokenCounter, fit_stream
from tasks.haystack import filler_stream, take_tokens
from tasks.text import citation_f1, first_answer_line, parse_citations, token_f1

NAME = "summhay"
VARIANTS = ("real", "real_limited", "hh", "hl", "lh", "ll", "symbolic")
MAX_NEW_TOKENS = 16
HEAD_KIND = "insight"  # which head score defines H_X (Eq. 2): the answer ids never occur in the needles
STOP_STRINGS = ("\n",)
SOURCES = ("train", "eval")
N_DOCS = 10
OPTIONS = {
    "n_documents": N_DOCS,
    "limited_subtopics": [],  # real_limited: subtopic ids, names or descriptions kept; empty: the first of each topic
    "distractor_insights": 2,  # synthetic: other insights per document
    **fiction.OPTIONS_DEFAULTS,
}

HEAD = ("Below are numbered documents, followed by a statement. Find the two documents that "
        "contain the information in the statement.\n\n")
TAIL = ("Statement: {s}\nReply with only the numbers of the two documents in brackets, smallest "
        "first, for example [2][5].\nAnswer:")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def score(prediction: str, example: Example) -> dict[str, float]:
    """Citation F1 over the set of document ids; EM when the sets are equal."""
    pred = first_answer_line(prediction)
    return {"f1": citation_f1(pred, example.target),
            "em": float(parse_citations(pred) == parse_citations(example.target))}


# ---------------------------------------------------------------- documents and fitting


def _documents_request(docs, filler_units, statement, opts, target) -> FitRequest:
    """Fits ten documents: needles stay; other sentences (round-robin), then filler, as budget allows.

    `docs` is a list of (mandatory, optional) per document: mandatory is a list of
    (depth, text, marks) needles; optional the document's other sentences in order.
    """
    n = len(docs)
    # Round-robin, a needle counting as its document's first sentence: every document has a
    # sentence before any has two. Otherwise a short prompt leaves only the cited documents
    # with text, and citing the non-empty ones answers it without reading.
    order = sorted(((d, j) for d in range(n) for j in range(len(docs[d][1]))),
                   key=lambda dj: (dj[1] + (1 if docs[dj[0]][0] else 0), dj[0]))
    units = [docs[d][1][j] for d, j in order] + list(filler_units)

    def arrange(k: int) -> Draft:
        take = [0] * n
        for d, _ in order[:k]:
            take[d] += 1
        fill = [[] for _ in range(n)]
        for i, u in enumerate(filler_units[: max(0, k - len(order))]):
            fill[i % n].append(u)
        segs = []
        for d, (mandatory, optional) in enumerate(docs):
            head = f"Document [{d + 1}]:\n"
            segs.append(Segment(head))
            body = [Segment(s) for s in optional[: take[d]]] + [Segment(u) for u in fill[d]]
            for depth, text, marks in sorted(mandatory, key=lambda m: -m[0]):
                body.insert(int(depth * (len(body) + 1)) if body else 0, Segment(text, marks))
            segs.extend(body)
            segs.append(Segment("\n\n"))
        # Filler words, if needed, end the last document rather than follow it.
        return Draft(HEAD, segs, TAIL.format(s=statement), slot=len(segs) - 1, filler_suffix=" ")

    return FitRequest(arrange, len(units), target, opts["filler"], unit_texts=units)


_EMPTY_DOCUMENT = re.compile(r"Document \[\d+\]:\n\n")


def _fits(counter: TokenCounter, jobs):
    """`fit_stream`, where a fit that leaves a document empty counts as too long: a prompt
    whose only documents with text are the cited ones is answered without reading."""
    for key, fitted in fit_stream(counter, jobs):
        yield key, None if fitted is not None and _EMPTY_DOCUMENT.search(fitted.prompt) else fitted


def _mark_headers(fitted, cited: list[int]):
    """Answer spans: the `[i]` of the cited documents' headers."""
    spans = []
    for i in cited:
        at = fitted.prompt.index(f"Document [{i}]:\n", fitted.context[0]) + len("Document ")
        spans.append((at, at + len(f"[{i}]")))
    fitted.spans["answer"] = spans
    return fitted


def _example(fitted, variant, split, index, seed, cited, meta):
    cited = sorted(cited)
    fitted = _mark_headers(fitted, cited)
    target = "".join(f"[{i}]" for i in cited)
    return make_example(task=NAME, variant=variant, split=split, index=index, seed=seed, fitted=fitted,
                        target=" " + target, answers=[target], meta=meta)


# ---------------------------------------------------------------- real data


def load_topics(path: Path) -> list[dict]:
    """SummHay topics ("haystacks") from a topic file, a JSON list of them, JSONL, or a directory.

    The format is the one of `data/topic_*.json` in salesforce/summary-of-a-haystack: a topic
    object with `topic_id`, `topic`, `topic_metadata`, `subtopics` (each with `subtopic_id`,
    `subtopic_name`, `subtopic`, `insights` of {`insight_name`, `insight`, `insight_id`},
    `query`, `retriever`, `summaries`, `eval_summaries`) and `documents` (each with
    `document_id`, `document_text`, `document_metadata`, `insights_included`: insight ids,
    plus `idx` and `label_<id>` columns). JSONL (one topic per line) is what the Hugging Face
    copy of the data set exports to. Only the keys read here are required.
    """
    files = sorted(f for f in path.iterdir() if f.name.endswith((".json", ".jsonl", ".jsonl.gz"))) \
        if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no SummHay topic files (*.json, *.jsonl) in this directory")
    topics = []
    for f in files:
        if f.name.endswith((".jsonl", ".jsonl.gz")):
            found = [(f"{f}:{lineno}", rec) for lineno, rec in read_jsonl(f, (), "SummHay topic")]
        else:
            data = read_json(f, "a SummHay topic object (or a list of them)")
            found = [(f"{f} topic {i}", t) for i, t in enumerate(data if isinstance(data, list) else [data])]
        for where, topic in found:
            topics.append(_checked_topic(topic, where))
    return topics


def _checked_topic(topic, where: str) -> dict:
    """`topic` after checking the keys this loader reads; errors name the place and the key."""
    if not isinstance(topic, dict) or not isinstance(topic.get("subtopics"), list) or \
            not isinstance(topic.get("documents"), list):
        raise DataError(f"{where}: expected a SummHay topic with lists 'subtopics' and 'documents'")
    for s_i, sub in enumerate(topic["subtopics"]):
        if not isinstance(sub, dict) or not isinstance(sub.get("insights"), list):
            raise DataError(f"{where}: subtopics[{s_i}] lacks the list 'insights'")
        for i_i, ins in enumerate(sub["insights"]):
            if not isinstance(ins, dict) or not isinstance(ins.get("insight_id"), str) or \
                    not isinstance(ins.get("insight"), str):
                raise DataError(f"{where}: subtopics[{s_i}].insights[{i_i}] lacks 'insight_id'/'insight' (strings)")
    for j, doc in enumerate(topic["documents"]):
        if not isinstance(doc, dict) or not isinstance(doc.get("document_text"), str) or \
                not isinstance(doc.get("insights_included"), list):
            raise DataError(f"{where}: documents[{j}] lacks 'document_text' (string) / 'insights_included' (list)")
    return {**topic, "_where": where}


def _kept_subtopic(sub: dict, index: int, keep) -> bool:
    """real_limited: subtopics named in `keep` (id, short name or description); else the first."""
    if not keep:
        return index == 0
    return any(sub.get(k) in keep for k in ("subtopic_id", "subtopic_name", "subtopic"))


def needle_sentence(text: str, insight: str) -> tuple[int, str]:
    """Index and text of the document sentence closest to the insight (token F1)."""
    sentences = [s for s in _SENTENCE.split(text.strip()) if s]
    best = max(range(len(sentences)), key=lambda i: token_f1(sentences[i], insight))
    return best, sentences


def build_real(variant, sources, opts, counter, target, n, seed, split) -> BuildResult:
    key = "train" if split == "train" else "eval"
    topics = load_topics(source_path(sources, key, NAME, SOURCES, allow_dir=True))
    rng = random.Random(seed)
    dropped: dict[str, int] = Counter()
    candidates = []
    for topic in topics:
        for s_i, sub in enumerate(topic["subtopics"]):
            if variant == "real_limited" and not _kept_subtopic(sub, s_i, opts["limited_subtopics"]):
                dropped["subtopic_not_limited"] += len(sub["insights"])
                continue
            for ins in sub["insights"]:
                if same_file(sources, "train", "eval") and in_eval_partition(ins["insight_id"], seed) != (split == "eval"):
                    continue
                having = [d for d in topic["documents"] if ins["insight_id"] in d["insights_included"]]
                others = [d for d in topic["documents"] if ins["insight_id"] not in d["insights_included"]]
                if len(having) < 2:
                    count(dropped, "insight_in_fewer_than_two_documents")
                elif len(others) < opts["n_documents"] - 2:
                    count(dropped, "too_few_other_documents")
                else:
                    candidates.append((ins, having, others))
    rng.shuffle(candidates)
    filler_units = take_tokens(counter, filler_stream(opts["filler"]), target)
    examples = []

    def jobs():
        for c_i in range(n if candidates else 0):
            ins, having, others = candidates[c_i % len(candidates)]
            chosen = rng.sample(having, 2) + rng.sample(others, opts["n_documents"] - 2)
            rng.shuffle(chosen)
            docs, cited = [], []
            for d_i, doc in enumerate(chosen):
                if any(doc is h for h in having):
                    best, sentences = needle_sentence(doc["document_text"], ins["insight"])
                    text = sentences[best] + " "
                    depth = best / max(1, len(sentences) - 1)
                    docs.append(([(depth, text, ((0, len(text) - 1, "needle"),))],
                                 [s + " " for i, s in enumerate(sentences) if i != best]))
                    cited.append(d_i + 1)
                else:
                    docs.append(([], [s + " " for s in _SENTENCE.split(doc["document_text"].strip()) if s]))
            yield _documents_request(docs, filler_units, ins["insight"], opts, target), (ins, cited)

    for (ins, cited), fitted in _fits(counter, jobs()):
        if fitted is None:
            count(dropped, "too_long_for_target")
            continue
        examples.append(_example(fitted, variant, split, len(examples), seed, cited,
                                 {"insight_id": ins["insight_id"], "statement": ins["insight"]}))
    if len(examples) < n:
        dropped["short_of_n"] = n - len(examples)
    return BuildResult(examples, dict(dropped))


# ---------------------------------------------------------------- synthetic variants


def build_synthetic(variant, opts, counter, target, n, seed, split, synth) -> BuildResult:
    rng = random.Random(f"{seed}:{split}:{variant}")
    high, diverse = variant in ("hh", "hl"), variant in ("hh", "lh")
    n_docs, n_other = int(opts["n_documents"]), int(opts["distractor_insights"])
    plans, reqs = [], []
    for i in range(n):
        k = 1 + n_docs * n_other
        if high:
            ents, vals = sym.names(rng, k, opts["entity_names"]), sym.names(rng, k, opts["entity_names"])
        else:
            ents = sym.symbols(rng, 2 * k, opts["symbol_alphabet"], opts["symbol_length"])
            ents, vals = ents[:k], ents[k:]
        facts = [fiction.Fact(e, rng.choice(opts["relations"]), v) for e, v in zip(ents, vals)]
        frame = (lambda: rng.choice(opts["fact_frames"])) if high else (lambda: opts["symbol_frame"])
        insights = [fiction.fact_sentence(f, frame()) for f in facts]
        cited = sorted(rng.sample(range(n_docs), 2))
        plans.append((insights, cited))
        if high:  # each of the two documents states the insight in its own words
            reqs += [request("rephrase_insight", insights[0], seed * 1_000_003 + 2 * i + j, insight=insights[0])
                     for j in range(2)]
    texts = generate(synth, reqs)
    pool = [x + " " for _, x in fiction.paragraph_pool(rng, opts, synth, set(), seed)] if diverse else []
    filler_units = take_tokens(counter, filler_stream(opts["filler"]), target) if not diverse else []
    examples = []

    def jobs():
        for i, (insights, cited) in enumerate(plans):
            stated = [" ".join(t.split()) + " " for t in texts[2 * i : 2 * i + 2]] if high else [insights[0] + " "] * 2
            docs, others = [], iter(insights[1:])
            haystack = list(pool)
            rng.shuffle(haystack)
            per_doc = len(haystack) // n_docs
            for d in range(n_docs):
                mandatory = [(rng.random(), next(others) + " ", ()) for _ in range(n_other)]
                if d in cited:
                    text = stated[cited.index(d)]
                    mandatory.append((rng.random(), text, ((0, len(text) - 1, "needle"),)))
                docs.append((mandatory, haystack[d * per_doc : (d + 1) * per_doc]))
            yield _documents_request(docs, filler_units, insights[0], opts, target), (insights, cited)

    for (insights, cited), fitted in _fits(counter, jobs()):
        if fitted is None:
            continue
        examples.append(_example(fitted, variant, split, len(examples), seed, [c + 1 for c in cited],
                                 {"statement": insights[0]}))
    dropped = {"too_long_for_target": n - len(examples)} if len(examples) < n else {}
    return BuildResult(examples, dropped)


def build_symbolic(opts, counter, target, n, seed, split) -> BuildResult:
    rng = random.Random(f"{seed}:{split}:symbolic")
    n_docs = int(opts["n_documents"])
    alphabet, length = opts["symbol_alphabet"], opts["symbol_length"]
    examples = []
    per_token = max(1, counter.count(" ".join(["abcd,"] * 50)) // 50)
    n_strings = target // per_token + 2 * n_docs

    def jobs():
        for _ in range(n):
            strings = sym.symbols(rng, n_strings + 1, alphabet, length)
            query, rest = strings[0], [s + ", " for s in strings[1:]]
            cited = sorted(rng.sample(range(n_docs), 2))
            per_doc = len(rest) // n_docs
            docs = []
            for d in range(n_docs):
                mandatory = [(rng.random(), query + ", ", ((0, len(query), "needle"),))] if d in cited else []
                docs.append((mandatory, rest[d * per_doc : (d + 1) * per_doc]))
            statement = f'the string "{query}"'
            yield _documents_request(docs, [], statement, {**opts, "filler": " ".join(strings[1:50])}, target), \
                (query, cited)

    for (query, cited), fitted in _fits(counter, jobs()):
        if fitted is None:
            continue
        examples.append(_example(fitted, "symbolic", split, len(examples), seed, [c + 1 for c in cited],
                                 {"query": query}))
    return BuildResult(examples, {"too_long_for_target": n - len(examples)} if len(examples) < n else {})


# ---------------------------------------------------------------- entry point


def build(variant: str, *, sources: dict, options: dict, tokenizer, target_tokens: int, n: int, seed: int,
          split: str, synth=None) -> BuildResult:
    """Builds `n` SummHay citation examples of `variant`; see `tasks.mdqa.build` for the arguments."""
    return build_variant(sys.modules[__name__], variant, sources=sources, options=options, tokenizer=tokenizer,
                         target_tokens=target_tokens, n=n, seed=seed, split=split, synth=synth)