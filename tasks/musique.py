"""MuSiQue: linear 3-hop question answering, real and synthetic (Zhao et al. 2025, Sec. 2-3).

Real: answerable MuSiQue questions (Trivedi et al., 2022) whose decomposition is a linear
chain of three hops (hop 2 uses #1, hop 3 uses #2 and not #1); the supporting paragraphs
among the question's other paragraphs, padded to the target length with a repeated filler
paragraph at random positions. `real_limited` keeps questions whose hops all come from a
configured set of relation sources: "kb" (Wikidata-style hops written `entity >> relation`)
and/or "text" (natural-language hops), optionally only some KB relations.
Synthetic: three hop sentences about fictional entities (hh: LLM/template sentences among
fictional paragraphs; hl: in filler; lh/ll: 4-character symbols in one template), and
symbolic chained dictionary lookups "What is the K3 of the K2 of the K1 of D?".

Sources: `train`, `eval` (MuSiQue JSONL; same file for both -> a hashed fifth is eval).

Example:
    >>> from tasks import musique
    >>> res = musique.build("hl", sources={}, options={}, tokenizer=tok, target_tokens=1024, n=4,
    ...                     seed=0, split="train")
    >>> musique.score(res.examples[0].target, res.examples[0])["f1"]
    1.0
"""

from __future__ import annotations

import random
import sys
from collections import Counter

from tasks import fiction
from tasks import symbols as sym
from tasks.build import (BuildResult, DataError, build_variant, count, generate, in_eval_partition, make_example,
                         read_jsonl, request, same_file, source_path)
from tasks.example import Example
from tasks.fitting import Draft, FitRequest, fit_stream
from tasks.haystack import Doc, Plain, filler_stream, needle_marks, segments, take_tokens
from tasks.text import best_f1_em, find_all, first_answer_line, locate_answers

NAME = "musique"
VARIANTS = ("real", "real_limited", "hh", "hl", "lh", "ll", "symbolic")
MAX_NEW_TOKENS = 32
HEAD_KIND = "retrieval"  # which head score defines H_X (Eq. 1)
STOP_STRINGS = ("\n",)
SOURCES = ("train", "eval")
OPTIONS = {
    "limited_sources": ["kb"],  # real_limited: hop sources kept ("kb", "text")
    "limited_relations": [],  # real_limited: if set, KB hops must use one of these relations
    "chain_question": "What is the {chain} of {e}?",
    "dict_keys": 8,  # symbolic: distinct keys per example
    "dict_size": 3,  # symbolic: key-value pairs per dictionary
    # Write every hop's answer before the final one (" A1 ; A2 ; A3"), scored on the final
    # answer; each hop's answer in its supporting paragraph joins y*. For models too small
    # to chain three lookups in one step (the miniature); the paper's setting is off.
    "answer_hops": False,
    **fiction.OPTIONS_DEFAULTS,
}

HEAD = ("Answer the question using the documents below. It needs facts from several documents; "
        "some documents are unrelated.\n\n")
TAIL = "\nQuestion: {q}\nReply with only the answer, no other words.\nAnswer:"
DICT_HEAD = "Below are dictionaries, one per line.\n\n"
DICT_TAIL = "\nQuestion: {q}\nReply with only the answer, no other words.\nAnswer:"
_PARAGRAPH_KEYS = ("idx", "title", "paragraph_text", "is_supporting")


HOP_SEPARATOR = " ; "


def score(prediction: str, example: Example) -> dict[str, float]:
    """SQuAD F1 and EM of the first line of `prediction`, max over answer and aliases; with
    written hops (option `answer_hops`), of the part after the last separator."""
    answer = first_answer_line(prediction)
    if example.meta.get("hops"):
        answer = answer.split(HOP_SEPARATOR.strip())[-1].strip()
    return best_f1_em(answer, example.answers)


def hops_target(hops: list[str], opts: dict) -> tuple[str, dict]:
    """The target and meta for an example whose hop answers are `hops` (final last)."""
    if opts["answer_hops"]:
        return " " + HOP_SEPARATOR.join(hops), {"hops": list(hops)}
    return " " + hops[-1], {}


# ---------------------------------------------------------------- real data


def load_questions(path) -> list[dict]:
    out = []
    for lineno, rec in read_jsonl(path, ("paragraphs", "question", "question_decomposition", "answer"),
                                  "MuSiQue question"):
        if not isinstance(rec["paragraphs"], list) or not isinstance(rec["question_decomposition"], list):
            raise DataError(f"{path}:{lineno}: 'paragraphs' and 'question_decomposition' must be lists")
        for j, p in enumerate(rec["paragraphs"]):
            if not isinstance(p, dict) or any(k not in p for k in _PARAGRAPH_KEYS):
                raise DataError(f"{path}:{lineno}: paragraphs[{j}] must have keys {list(_PARAGRAPH_KEYS)}")
        for j, h in enumerate(rec["question_decomposition"]):
            if not isinstance(h, dict) or "question" not in h:
                raise DataError(f"{path}:{lineno}: question_decomposition[{j}] must have 'question'")
        rec["_line"] = lineno
        out.append(rec)
    return out


def is_linear_3hop(rec: dict) -> bool:
    """Three hops, each after the first using only the previous hop's answer."""
    hops = [h["question"] for h in rec["question_decomposition"]]
    return (len(hops) == 3 and "#" not in hops[0] and "#1" in hops[1] and "#2" in hops[2]
            and "#1" not in hops[2])


def hop_source(question: str) -> tuple[str, str | None]:
    """("kb", relation) for `entity >> relation` hops, else ("text", None)."""
    if ">>" in question:
        return "kb", question.split(">>", 1)[1].strip()
    return "text", None


def is_limited(rec: dict, opts: dict) -> bool:
    sources, relations = set(opts["limited_sources"]), set(opts["limited_relations"])
    for h in rec["question_decomposition"]:
        source, relation = hop_source(h["question"])
        if source not in sources or (source == "kb" and relations and relation not in relations):
            return False
    return True


def build_real(variant, sources, opts, counter, target, n, seed, split) -> BuildResult:
    path = source_path(sources, "train" if split == "train" else "eval", NAME, SOURCES)
    records = load_questions(path)
    if same_file(sources, "train", "eval"):
        records = [r for r in records if in_eval_partition(r["question"], seed) == (split == "eval")]
    dropped: dict[str, int] = Counter()
    rng = random.Random(seed)
    rng.shuffle(records)
    filler_units = take_tokens(counter, _filler_paragraphs(opts["filler"]), target)

    def jobs():
        for rec in records:
            if not rec.get("answerable", True):
                count(dropped, "unanswerable")
                continue
            if not is_linear_3hop(rec):
                count(dropped, "not_linear_3hop")
                continue
            if variant == "real_limited" and not is_limited(rec, opts):
                count(dropped, "relation_source_not_limited")
                continue
            answers = [rec["answer"], *rec.get("answer_aliases", [])]
            paragraphs = sorted(rec["paragraphs"], key=lambda p: p["idx"])
            support = [p for p in paragraphs if p["is_supporting"]]
            last_idx = rec["question_decomposition"][-1].get("paragraph_support_idx")
            support.sort(key=lambda p: p["idx"] != last_idx)  # the last hop's paragraph first
            spans = next(((p, s) for p in support if (s := locate_answers(p["paragraph_text"], answers))), None)
            if len(support) < 3 or spans is None:
                count(dropped, "answer_not_in_supporting" if len(support) >= 3 else "missing_supporting")
                continue
            answer_par, answer_spans = spans
            earlier = rec["question_decomposition"][:-1]
            if opts["answer_hops"] and not all(str(h.get("answer", "")).strip() for h in earlier):
                count(dropped, "hop_answer_missing")
                continue
            docs = []
            for p in paragraphs:
                text = p["paragraph_text"]
                marks = ()
                if p["is_supporting"]:
                    hop_spans = [sp for h in earlier if opts["answer_hops"] and h.get("paragraph_support_idx") == p["idx"]
                                 for sp in locate_answers(text, [h["answer"]])]
                    marks = needle_marks(text, sorted({*hop_spans, *(answer_spans if p is answer_par else [])}))
                docs.append((p["is_supporting"], Doc(p["title"], text, marks)))
            hops = [h["answer"] for h in earlier] + [rec["answer"]]
            yield _paragraphs_request(docs, filler_units, rec["question"], opts, rng, target), (rec, answers, hops)

    examples = []
    for (rec, answers, hops), fitted in fit_stream(counter, jobs(), n):
        if fitted is None:
            count(dropped, "too_long_for_target")
            continue
        written, hop_meta = hops_target(hops, opts)
        examples.append(make_example(task=NAME, variant=variant, split=split, index=len(examples), seed=seed,
                                     fitted=fitted, target=written, answers=answers,
                                     meta={"question": rec["question"], "source_line": rec["_line"],
                                           "musique_id": rec.get("id", ""), **hop_meta}))
    if len(examples) < n:
        dropped["short_of_n"] = n - len(examples)
    return BuildResult(examples, dict(dropped))


def _filler_paragraphs(filler: str):
    while True:
        yield filler.strip() + "\n"


def _paragraphs_request(docs, filler_units, question, opts, rng, target) -> FitRequest:
    """Supporting paragraphs always; other paragraphs, then filler paragraphs, as budget allows."""
    optional = [d for keep, d in docs if not keep]
    where = [rng.random() for _ in filler_units]  # each filler paragraph's relative position

    def arrange(k: int) -> Draft:
        kept = set(map(id, optional[:k]))
        items = [d for keep, d in docs if keep or id(d) in kept]
        n_fill = max(0, k - len(optional))
        slots = [[] for _ in range(len(items) + 1)]
        for u, w in zip(filler_units[:n_fill], where):
            slots[int(w * (len(items) + 1))].append(Plain(u))
        ordered = [x for i, d in enumerate(items) for x in (*slots[i], d)] + slots[-1]
        return Draft(HEAD, segments(ordered), TAIL.format(q=question))

    units = [d.text for d in optional] + list(filler_units)
    return FitRequest(arrange, len(units), target, opts["filler"], unit_texts=units)


# ---------------------------------------------------------------- synthetic variants


def chain_question(opts: dict, entity: str, relations: list[str]) -> str:
    return opts["chain_question"].format(chain=" of the ".join(reversed(relations)), e=entity)


def build_synthetic(variant, opts, counter, target, n, seed, split, synth) -> BuildResult:
    rng = random.Random(f"{seed}:{split}:{variant}")
    high, diverse = variant in ("hh", "hl"), variant in ("hh", "lh")
    if len(opts["relations"]) < 3:
        raise DataError("musique: option relations needs at least 3 relation words")
    plans, reqs = [], []
    for i in range(n):
        if high:
            ents = sym.names(rng, 4, opts["entity_names"])
        else:
            ents = sym.symbols(rng, 4, opts["symbol_alphabet"], opts["symbol_length"])
        rels = rng.sample(list(opts["relations"]), 3)
        hops = [fiction.Fact(ents[j], rels[j], ents[j + 1]) for j in range(3)]
        plans.append((ents, rels, hops))
        if high:
            for j, h in enumerate(hops):
                template = fiction.fact_sentence(h, rng.choice(opts["fact_frames"]))
                reqs.append(request("entity_sentence", template, seed * 1_000_003 + 3 * i + j,
                                    entity=h.entity, relation=h.relation, value=h.value))
    texts = generate(synth, reqs)
    pool = fiction.paragraph_pool(rng, opts, synth, {e for p in plans for e in p[0]}, seed) if diverse else []
    filler_units = take_tokens(counter, filler_stream(opts["filler"]), target) if not diverse else []
    examples, dropped = [], Counter()

    def jobs():
        for i, (ents, rels, hops) in enumerate(plans):
            sentences = texts[3 * i : 3 * i + 3] if high else [fiction.fact_sentence(h, opts["symbol_frame"]) for h in hops]
            sentences = [" ".join(s.split()) for s in sentences]
            spans = find_all(sentences[2], ents[3])
            if not spans or not all(h.entity in s for h, s in zip(hops, sentences)):
                count(dropped, "answer_not_in_needle")
                continue
            # y*: the final answer, and with written hops each hop's answer in its sentence.
            marked = [find_all(s, ents[j + 1]) if opts["answer_hops"] or j == 2 else [] for j, s in enumerate(sentences)]
            question = chain_question(opts, ents[0], rels)
            if diverse:
                needles = [Doc(h.entity, s, needle_marks(s, marked[j]))
                           for j, (h, s) in enumerate(zip(hops, sentences))]
                others = [Doc(t, x) for t, x in pool if not any(e in x or e == t for e in ents)]
                rng.shuffle(others)
                req = _needles_request(needles, others, HEAD, TAIL.format(q=question), opts, rng, target, "\n")
            else:
                needles = [Plain(s + " ", needle_marks(s, marked[j])) for j, s in enumerate(sentences)]
                req = _needles_request(needles, [Plain(u) for u in filler_units], HEAD, TAIL.format(q=question), opts,
                                       rng, target, " ")
            yield req, (ents, question)

    for (ents, question), fitted in fit_stream(counter, jobs()):
        if fitted is None:
            count(dropped, "too_long_for_target")
            continue
        written, hop_meta = hops_target(ents[1:], opts)
        examples.append(make_example(task=NAME, variant=variant, split=split, index=len(examples), seed=seed,
                                     fitted=fitted, target=written, answers=[ents[3]],
                                     meta={"question": question, **hop_meta}))
    return BuildResult(examples, dict(dropped))


def _needles_request(needles, haystack, head, tail, opts, rng, target, suffix) -> FitRequest:
    """Needles at random relative depths (hops in random order) among the first k haystack items."""
    depths = [rng.random() for _ in needles]
    units = [h.text for h in haystack]

    def arrange(k: int) -> Draft:
        items = list(haystack[:k])
        for needle, d in sorted(zip(needles, depths), key=lambda p: -p[1]):
            items.insert(int(d * (k + 1)) if k else 0, needle)
        return Draft(head, segments(items), tail, filler_suffix=suffix)

    return FitRequest(arrange, len(haystack), target, opts["filler"], unit_texts=units)


def build_symbolic(opts, counter, target, n, seed, split) -> BuildResult:
    rng = random.Random(f"{seed}:{split}:symbolic")
    alphabet, length = opts["symbol_alphabet"], opts["symbol_length"]
    size = int(opts["dict_size"])
    examples, dropped = [], Counter()

    def jobs():
        for _ in range(n):
            keys = sym.symbols(rng, int(opts["dict_keys"]), alphabet, length)
            chain_keys = rng.sample(keys, 3)
            names = sym.symbols(rng, 4, alphabet, length, exclude=set(keys))  # D, X1, X2, X3
            used = set(keys) | set(names)
            lines = []
            for j in range(3):
                others = [k for k in keys if k != chain_keys[j]]
                pairs = [(chain_keys[j], names[j + 1])] + [(k, v) for k, v in zip(
                    rng.sample(others, size - 1), sym.symbols(rng, size - 1, alphabet, length, exclude=used))]
                used |= {v for _, v in pairs}
                rng.shuffle(pairs)
                lines.append((names[j], pairs))
            needles = []
            for j, (name, pairs) in enumerate(lines):
                text = _dict_line(name, pairs)
                spans = []
                if j == 2 or opts["answer_hops"]:
                    at = text.index(f'"{chain_keys[j]}": "{names[j + 1]}"') + len(f'"{chain_keys[j]}": "')
                    spans = [(at, at + len(names[j + 1]))]
                needles.append(Plain(text, needle_marks(text, spans, 0, len(text) - 1)))
            haystack, total = [], 0
            while total <= target:
                chunk = []
                for _ in range(32):
                    name, *vals = sym.symbols(rng, size + 1, alphabet, length, exclude=used)
                    used |= {name, *vals}
                    chunk.append(Plain(_dict_line(name, list(zip(rng.sample(keys, size), vals)))))
                haystack.extend(chunk)
                total += sum(counter.counts([c.text for c in chunk]))
            question = chain_question(opts, names[0], chain_keys)
            yield _needles_request(needles, haystack, DICT_HEAD, DICT_TAIL.format(q=question), opts, rng, target,
                                   "\n"), (names, question)

    for (names, question), fitted in fit_stream(counter, jobs()):
        if fitted is None:
            count(dropped, "too_long_for_target")
            continue
        written, hop_meta = hops_target(names[1:], opts)
        examples.append(make_example(task=NAME, variant="symbolic", split=split, index=len(examples), seed=seed,
                                     fitted=fitted, target=written, answers=[names[3]],
                                     meta={"question": question, **hop_meta}))
    return BuildResult(examples, dict(dropped))


def _dict_line(name: str, pairs) -> str:
    return f"{name} = {{" + ", ".join(f'"{k}": "{v}"' for k, v in pairs) + "}\n"


# ---------------------------------------------------------------- entry point


def build(variant: str, *, sources: dict, options: dict, tokenizer, target_tokens: int, n: int, seed: int,
          split: str, synth=None) -> BuildResult:
    """Builds `n` MuSiQue examples of `variant` for `split`; see `tasks.mdqa.build` for the arguments."""
    return build_variant(sys.modules[__name__], variant, sources=sources, options=options, tokenizer=tokenizer,
                         target_tokens=target_tokens, n=n, seed=seed, split=split, synth=synth)