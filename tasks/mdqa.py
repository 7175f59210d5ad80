"""MDQA: multi-document question answering, real and synthetic (Zhao et al. 2025, Sec. 2-3).

Real: a question, its gold passage and distractor passages (Liu et al. 2024, "Lost in the
Middle"), extended to the target length with passages from a pool ranked for the question
(BM25 by default; a dense encoder such as the paper's Contriever as an option), most relevant
first, the gold passage at a configurable position.
`real_limited` keeps questions of some types (who / when / where). Synthetic variants, a
2x2 grid of needle concept expression x haystack diversity plus symbolic:
  hh: a fictional-entity paragraph with a QA pair, among other fictional paragraphs;
  hl: the same needle in the filler haystack;
  lh: the needle's entities as 4-character symbols in templated sentences, diverse haystack;
  ll: the symbolic needle in filler;
  symbolic: key-value retrieval from a JSON object (Liu et al.'s kv-retrieval).

Sources: `train`, `eval` (MDQA JSONL, optionally gzipped) and `pool` (MDQA JSONL whose ctxs
form the passage pool, or JSONL of {"title", "text"}). When `train` and `eval` are the same
file, a stable fifth of the questions (by hash) is the evaluation split.

Example:
    >>> from tasks import mdqa
    >>> res = mdqa.build("real", sources={"train": "nq.jsonl.gz", "pool": "nq.jsonl.gz"},
    ...                  options={}, tokenizer=tok, target_tokens=4096, n=10, seed=0, split="train")
    >>> mdqa.score(res.examples[0].answers[0], res.examples[0])["f1"]
    1.0
"""

from __future__ import annotations

import random
import sys
from collections import Counter

from tasks import fiction
from tasks import symbols as sym
from tasks.build import (BuildResult, DataError, build_variant, count, generate, in_eval_partition, make_example,
                         read_jsonl, same_file, source_path)
from tasks.example import Example
from tasks.fitting import Draft, FitRequest, fit_stream
from tasks.haystack import Doc, Plain, filler_stream, needle_marks, segments, take_tokens
from tasks.retrieval import SIMILARITIES, rank_bm25, rank_dense
from tasks.text import best_f1_em, contains_answer, find_all, first_answer_line, locate_answers, normalize_answer

NAME = "mdqa"
VARIANTS = ("real", "real_limited", "hh", "hl", "lh", "ll", "symbolic")
MAX_NEW_TOKENS = 32
HEAD_KIND = "retrieval"  # which head score defines H_X (Eq. 1)
STOP_STRINGS = ("\n",)
SOURCES = ("train", "eval", "pool")
OPTIONS = {
    "gold_position": "random",  # "random", a 0-based document index, or a depth in [0, 1] as float
    "retriever": "bm25",  # or "dense" with `dense_model`: an HF encoder (local path or hub id)
    "dense_model": None,
    "dense_similarity": "cosine",  # or "dot": Contriever's own scoring (unnormalized inner product)
    "dense_revision": None,  # hub revision of dense_model (a branch, tag or commit)
    "question_types": ["who", "when", "where"],  # real_limited: first word of the question
    "symbolic_keys": "uuid",  # symbolic: "uuid" (as kv-retrieval) or "symbol" (4-char symbols)
    **fiction.OPTIONS_DEFAULTS,
}

HEAD = ("Answer the question using the documents below. Some of them are unrelated to the "
        "question.\n\n")
TAIL = "\nQuestion: {q}\nReply with only the answer, no other words.\nAnswer:"
KV_HEAD = "Below is a JSON object of key-value pairs.\n\n{\n"
KV_TAIL = '}}\n\nWhat is the value of the key "{key}"? Reply with only the value.\nAnswer:'


def score(prediction: str, example: Example) -> dict[str, float]:
    """SQuAD F1 and EM of the first line of `prediction`, max over the gold aliases."""
    return best_f1_em(first_answer_line(prediction), example.answers)


# ---------------------------------------------------------------- real data


def load_questions(path, what: str = "MDQA question") -> list[dict]:
    """Records of an MDQA JSONL file, each checked and with its gold passage found."""
    out = []
    for lineno, rec in read_jsonl(path, ("question", "answers", "ctxs"), what):
        if not isinstance(rec["answers"], list) or not all(isinstance(a, str) for a in rec["answers"]):
            raise DataError(f"{path}:{lineno}: 'answers' must be a list of strings")
        if not isinstance(rec["ctxs"], list):
            raise DataError(f"{path}:{lineno}: 'ctxs' must be a list of passages")
        for j, c in enumerate(rec["ctxs"]):
            if not isinstance(c, dict) or "title" not in c or "text" not in c:
                raise DataError(f"{path}:{lineno}: ctxs[{j}] must have 'title' and 'text' "
                                "(and optionally 'hasanswer', 'isgold')")
        rec["_line"] = lineno
        out.append(rec)
    return out


def load_pool(path) -> list[tuple[str, str]]:
    """Distinct (title, text) passages: from MDQA records' ctxs or {"title","text"} lines."""
    seen, pool = set(), []
    for lineno, rec in read_jsonl(path, (), "passage-pool record"):
        ctxs = rec["ctxs"] if "ctxs" in rec else [rec]
        for c in ctxs:
            if not isinstance(c, dict) or "text" not in c:
                raise DataError(f"{path}:{lineno}: expected an MDQA record with 'ctxs' or a passage with "
                                "'title' and 'text'")
            key = (c.get("title", ""), c["text"])
            if key not in seen:
                seen.add(key)
                pool.append(key)
    return pool


def gold_index(rec: dict) -> int | None:
    ctxs = rec["ctxs"]
    for i, c in enumerate(ctxs):
        if c.get("isgold"):
            return i
    if not any("isgold" in c for c in ctxs):
        for i, c in enumerate(ctxs):
            if c.get("hasanswer"):
                return i
    return None


def question_type(question: str) -> str:
    words = question.strip().lower().split()
    return words[0] if words else ""


def gold_slot(option, u: float):
    """`k -> index` of the gold document among k distractors; `u` is the example's random draw."""
    if option == "random":
        return lambda k: min(k, int(u * (k + 1)))
    if isinstance(option, float):
        return lambda k: min(k, max(0, int(round(option * k))))
    return lambda k: min(k, max(0, int(option)))


def check_options(opts: dict) -> None:
    """The options `resolve_options` cannot check alone: gold_position's type."""
    option = opts["gold_position"]
    if option == "random" or isinstance(option, (int, float)) and not isinstance(option, bool):
        return
    raise DataError(f"mdqa: option gold_position must be 'random', an index or a depth in [0, 1], got {option!r}")


def build_real(variant, sources, opts, counter, target, n, seed, split) -> BuildResult:
    key = "train" if split == "train" else "eval"
    path = source_path(sources, key, NAME, SOURCES)
    records = load_questions(path)
    if same_file(sources, "train", "eval"):
        records = [r for r in records if in_eval_partition(r["question"], seed) == (split == "eval")]
    dropped: dict[str, int] = Counter()
    if variant == "real_limited":
        types = {t.lower() for t in opts["question_types"]}
        kept = [r for r in records if question_type(r["question"]) in types]
        dropped["question_type_not_limited"] += len(records) - len(kept)
        records = kept
    rng = random.Random(seed)
    rng.shuffle(records)
    pool = load_pool(source_path(sources, "pool", NAME, SOURCES)) if "pool" in sources else []
    # Enough candidates for the target: at least target / (mean passage tokens), with slack.
    if pool:
        lens = counter.counts([t for _, t in pool[:200]])
        k_needed = min(len(pool), int(1.5 * target / max(1.0, sum(lens) / len(lens))) + 20)
    chosen, examples = records[: n + n // 2 + 10], []
    pool_norm = [normalize_answer(f"{t} {x}") for t, x in pool]  # the title is shown too
    pool_docs = [Doc(t, x) for t, x in pool]  # shared by examples, so their segments are built once
    ranked = _rank(opts, [r["question"] for r in chosen], pool, k_needed) if pool else [[] for _ in chosen]

    def jobs():
        for rec, ranks in zip(chosen, ranked):
            g = gold_index(rec)
            if g is None:
                count(dropped, "no_gold_passage")
                continue
            gold = rec["ctxs"][g]
            answers = [a for a in rec["answers"] if a.strip()]
            spans = locate_answers(gold["text"], answers)
            if not answers or not spans:
                count(dropped, "answer_not_in_gold_passage")
                continue
            norm = [normalize_answer(a) for a in answers]
            distract = [Doc(c["title"], c["text"]) for i, c in enumerate(rec["ctxs"]) if i != g]
            seen = {gold["text"], *(d.text for d in distract)}
            for i in ranks:
                doc = pool_docs[i]
                # A pool passage that states an answer would be a second gold passage; whole
                # tokens, so a one-letter answer does not rule out every passage.
                if doc.text not in seen and not contains_answer(pool_norm[i], norm):
                    seen.add(doc.text)
                    distract.append(doc)
            needle = Doc(gold["title"], gold["text"], needle_marks(gold["text"], spans))
            yield _docs_request(needle, distract, rec["question"], opts, rng, target), (rec, answers)

    # Prompts are verified in batches (one parallel tokenizer call each), in record order.
    for (rec, answers), fitted in fit_stream(counter, jobs(), n):
        if fitted is None:
            count(dropped, "too_long_for_target")
            continue
        examples.append(make_example(task=NAME, variant=variant, split=split, index=len(examples), seed=seed,
                                     fitted=fitted, target=" " + answers[0], answers=answers,
                                     meta={"question": rec["question"], "source_line": rec["_line"]}))
    if len(examples) < n:
        dropped["short_of_n"] = n - len(examples)
    return BuildResult(examples, dict(dropped))


def _rank(opts, questions, pool, k) -> list[list[int]]:
    corpus = [f"{t} {x}" for t, x in pool]
    if opts["retriever"] == "bm25":
        return rank_bm25(questions, corpus, k)
    if opts["retriever"] == "dense":
        if not opts["dense_model"]:
            raise DataError("mdqa: retriever 'dense' needs option dense_model (an encoder: local path or hub id)")
        if opts["dense_similarity"] not in SIMILARITIES:
            raise DataError(f"mdqa: option dense_similarity must be one of {', '.join(SIMILARITIES)}, "
                            f"got {opts['dense_similarity']!r}")
        return rank_dense(questions, corpus, k, opts["dense_model"], similarity=opts["dense_similarity"],
                          revision=opts["dense_revision"])
    raise DataError(f"mdqa: option retriever must be 'bm25' or 'dense', got {opts['retriever']!r}")


def _docs_request(needle, distractors, question, opts, rng, target, filler_haystack=None) -> FitRequest:
    """The needle and the first k distractor documents (or filler units), to fit to `target`."""
    slot = gold_slot(opts["gold_position"], rng.random())
    tail = TAIL.format(q=question)
    if filler_haystack is None:
        def arrange(k: int) -> Draft:
            g = slot(k)
            return Draft(HEAD, segments(distractors[:g] + [needle] + distractors[g:k]), tail)

        return FitRequest(arrange, len(distractors), target, opts["filler"], unit_texts=[d.text for d in distractors])

    def arrange_filler(k: int) -> Draft:
        g = slot(k)
        items = [Plain(u) for u in filler_haystack[:k]]
        return Draft(HEAD, segments(items[:g] + [needle] + items[g:]), tail, filler_suffix=" ")

    return FitRequest(arrange_filler, len(filler_haystack), target, opts["filler"], unit_texts=filler_haystack)


# ---------------------------------------------------------------- synthetic variants


def build_synthetic(variant, opts, counter, target, n, seed, split, synth) -> BuildResult:
    rng = random.Random(f"{seed}:{split}:{variant}")
    dropped: dict[str, int] = Counter()
    high_needle, diverse = variant in ("hh", "hl"), variant in ("hh", "lh")
    # Plan every example first, so all LLM text is requested in one batch.
    plans, reqs = [], []
    values = fiction.value_pool(rng, opts)
    entities = sym.names(rng, n, opts["entity_names"]) if not opts["entity_names"] else \
        [rng.choice(opts["entity_names"]) for _ in range(n)]
    for i in range(n):
        if high_needle:
            entity = entities[i]
            facts = fiction.random_facts(rng, entity, int(opts["facts_per_paragraph"]), opts, values)
        else:
            s = sym.symbols(rng, 1 + int(opts["facts_per_paragraph"]), opts["symbol_alphabet"], opts["symbol_length"])
            rels = rng.sample(list(opts["relations"]), min(len(s) - 1, len(opts["relations"])))
            entity, facts = s[0], [fiction.Fact(s[0], r, v) for r, v in zip(rels, s[1:])]
        asked = rng.choice(facts)
        plans.append((entity, facts, asked))
        if high_needle:
            reqs.append(fiction.paragraph_request(rng, entity, facts, opts, seed * 1_000_003 + i, answer=asked.value))
    texts = iter(generate(synth, reqs))
    pool = fiction.paragraph_pool(rng, opts, synth, {p[0] for p in plans}, seed) if diverse else []
    filler_units = take_tokens(counter, filler_stream(opts["filler"]), target) if not diverse else None

    def jobs():
        for entity, facts, asked in plans:
            if high_needle:
                parsed = fiction.parse_paragraph(next(texts))
                if parsed is None:
                    count(dropped, "unparsable_synthetic_paragraph")
                    continue
                title, body = parsed
            else:
                title, body = entity, " ".join(fiction.fact_sentence(f, opts["symbol_frame"]) for f in facts)
            spans = _answer_spans(body, asked.value)
            if not spans:
                count(dropped, "answer_not_in_needle")
                continue
            question = opts["question_frame"].format(r=asked.relation, e=entity)
            if diverse:
                needle = Doc(title, body, needle_marks(body, spans))
                others = [Doc(t, x) for t, x in pool if entity not in x and entity != t]
                rng.shuffle(others)
                yield _docs_request(needle, others, question, opts, rng, target), (asked, question)
            else:
                text = f"{title}: {body} " if high_needle else body + " "
                off = len(title) + 2 if high_needle else 0
                needle = Plain(text, needle_marks(text, [(s + off, e + off) for s, e in spans], off, off + len(body)))
                yield _docs_request(needle, [], question, opts, rng, target, filler_haystack=filler_units), \
                    (asked, question)

    examples = []
    for (asked, question), fitted in fit_stream(counter, jobs()):
        if fitted is None:
            count(dropped, "too_long_for_target")
            continue
        examples.append(make_example(task=NAME, variant=variant, split=split, index=len(examples), seed=seed,
                                     fitted=fitted, target=" " + asked.value, answers=[asked.value],
                                     meta={"question": question}))
    return BuildResult(examples, dict(dropped))


def _answer_spans(text: str, value: str) -> list[tuple[int, int]]:
    return find_all(text, value)


def build_symbolic(opts, counter, target, n, seed, split) -> BuildResult:
    rng = random.Random(f"{seed}:{split}:symbolic")
    examples, dropped = [], Counter()

    def new_key(k: int) -> list[str]:
        if opts["symbolic_keys"] == "uuid":
            return [_uuid(rng) for _ in range(k)]
        if opts["symbolic_keys"] == "symbol":
            return sym.symbols(rng, k, opts["symbol_alphabet"], opts["symbol_length"])
        raise DataError(f"mdqa: option symbolic_keys must be 'uuid' or 'symbol', got {opts['symbolic_keys']!r}")

    def jobs():
        for _ in range(n):
            # Enough pairs for the target, all keys and values distinct.
            pairs, total = [], 0
            while total <= target:
                ks = new_key(128)
                chunk = [(k, v) for k, v in zip(ks[:64], ks[64:])]
                pairs.extend(chunk)
                total += sum(counter.counts([_pair(k, v) for k, v in chunk]))
            flat = [x for p in pairs for x in p]
            if len(set(flat)) != len(flat):
                fresh = new_key(len(flat)) if opts["symbolic_keys"] == "uuid" else \
                    sym.symbols(rng, len(flat), opts["symbol_alphabet"], opts["symbol_length"])
                pairs = list(zip(fresh[0::2], fresh[1::2]))
            key, value = pairs[0]
            line = _pair(key, value)
            vstart = line.rindex(value)
            needle = Plain(line, needle_marks(line, [(vstart, vstart + len(value))], 0, len(line) - 2))
            others = [_pair(k, v) for k, v in pairs[1:]]
            depth = rng.random()

            def arrange(k: int, others=others, needle=needle, depth=depth, key=key) -> Draft:
                g = min(k, int(depth * (k + 1)))
                items = [Plain(u) for u in others[:k]]
                return Draft(KV_HEAD, segments(items[:g] + [needle] + items[g:]), KV_TAIL.format(key=key),
                             filler_suffix="\n")

            yield FitRequest(arrange, len(others), target, opts["filler"], unit_texts=others), (key, value)

    for (key, value), fitted in fit_stream(counter, jobs()):
        if fitted is None:
            count(dropped, "too_long_for_target")
            continue
        examples.append(make_example(task=NAME, variant="symbolic", split=split, index=len(examples), seed=seed,
                                     fitted=fitted, target=" " + value, answers=[value], meta={"key": key}))
    return BuildResult(examples, dict(dropped))


def _pair(key: str, value: str) -> str:
    return f'"{key}": "{value}",\n'


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# ---------------------------------------------------------------- entry point


def build(variant: str, *, sources: dict, options: dict, tokenizer, target_tokens: int, n: int, seed: int,
          split: str, synth=None) -> BuildResult:
    """Builds `n` MDQA examples of `variant` for `split` ("train" or "eval").

    Args:
        variant: one of VARIANTS.
        sources: local paths by key (SOURCES); real variants need `train`/`eval` and `pool`.
        options: task options (OPTIONS keys); unknown keys raise DataError.
        tokenizer: the model's tokenizer; every prompt fits `target_tokens` exactly.
        target_tokens: prompt length budget in tokens (at most, within 2%).
        n: number of examples wanted; shortfalls are reported in `dropped`.
        seed: seeds every random choice.
        split: "train" (train+validation pool) or "eval".
        synth: a synthesizer with `generate(requests) -> list[str]`, or None for templates.
    """
    return build_variant(sys.modules[__name__], variant, sources=sources, options=options, tokenizer=tokenizer,
                         target_tokens=target_tokens, n=n, seed=seed, split=split, synth=synth)


__all__ = ["NAME", "VARIANTS", "MAX_NEW_TOKENS", "STOP_STRINGS", "OPTIONS", "SOURCES", "build", "score"]
