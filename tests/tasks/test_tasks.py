import gzip
import json
import re
from pathlib import Path

import pytest

from tasks import TASKS, VARIANTS, get_task
from tasks.build import DataError
from tasks.fitting import within_tolerance
from tasks.text import normalize_answer

FIXTURES = Path(__file__).parents[1] / "fixtures"
NQ = Path(__file__).parents[2] / "data/nq-open-oracle.jsonl.gz"
SOURCES = {
    "mdqa": {"train": str(FIXTURES / "mdqa_sample.jsonl"), "eval": str(FIXTURES / "mdqa_sample.jsonl"),
             "pool": str(NQ)},
    "musique": {"train": str(FIXTURES / "musique_sample.jsonl")},
    "summhay": {"train": str(FIXTURES / "summhay_topic.json")},
    "needle": {"haystack": str(NQ)},
}


def _check_example(module, ex, target):
    assert module.score(ex.target, ex)["f1"] == 1.0
    assert within_tolerance(ex.n_tokens, target)
    assert ex.prompt[ex.context_span.start : ex.context_span.end] in ex.prompt
    for span, needle in zip(ex.needle_spans, ex.needles):
        assert ex.prompt[span.start : span.end] == needle
        assert ex.context_span.start <= span.start < span.end <= ex.context_span.end
    assert ex.answer_spans, ex.id
    for span in ex.answer_spans:
        text = ex.prompt[span.start : span.end]
        if module.NAME == "summhay":
            assert text in ex.target
        else:  # the answer occurs inside a needle
            assert normalize_answer(text) in {normalize_answer(a) for a in ex.answers}
            assert any(n.start <= span.start and span.end <= n.end for n in ex.needle_spans)


@pytest.mark.parametrize(("task", "variant"),
                         [(t, v) for t in sorted(TASKS) for v in VARIANTS if v in get_task(t).VARIANTS])
def test_every_task_variant_builds_and_scores_its_gold(task, variant, char_tok):
    module = get_task(task)
    target = 2400 if task == "summhay" else 1200  # ten documents of insights need room
    options = {"pool_size": 60} if "pool_size" in module.OPTIONS else {}
    res = module.build(variant, sources=SOURCES[task], options=options, tokenizer=char_tok,
                       target_tokens=target, n=2, seed=1, split="train")
    assert res.examples, res.dropped
    for ex in res.examples:
        assert ex.task == task and ex.variant == variant
        _check_example(module, ex, target)


def test_mdqa_real_on_nq_with_bpe(bpe_tokenizer):
    from tasks import mdqa

    res = mdqa.build("real", sources={"train": str(NQ), "pool": str(NQ)}, options={"gold_position": 2},
                     tokenizer=bpe_tokenizer, target_tokens=2048, n=8, seed=0, split="train")
    assert len(res.examples) == 8
    with gzip.open(NQ, "rt") as f:
        golds = {r["question"]: r for r in map(json.loads, f)}
    for ex in res.examples:
        _check_example(mdqa, ex, 2048)
        gold = golds[ex.meta["question"]]
        assert ex.needles == (gold["ctxs"][0]["text"],)
        # the gold passage is the third document; no distractor contains an answer
        body = ex.prompt[ex.context_span.start : ex.context_span.end]
        assert body.index(gold["ctxs"][0]["text"]) > body.index("Document [3]") > body.index("Document [2]")
        docs = body.split("\nDocument [")
        # whole normalized tokens (the filter's rule), checked here with a regex
        assert sum(any(normalize_answer(a) and re.search(rf"(?<!\S){re.escape(normalize_answer(a))}(?!\S)",
                                                         normalize_answer(d)) for a in gold["answers"])
                   for d in docs) == 1


def test_mdqa_fixture_drops_are_counted(char_tok):
    from tasks import mdqa

    res = mdqa.build("real", sources={"train": SOURCES["mdqa"]["train"], "pool": str(NQ)}, options={},
                     tokenizer=char_tok, target_tokens=1500, n=4, seed=0, split="train")
    assert res.dropped["answer_not_in_gold_passage"] == 1  # "teal" is not in its gold passage
    assert {ex.meta["question"].split()[0] for ex in res.examples} == {"who", "when", "where"}
    limited = mdqa.build("real_limited", sources={"train": SOURCES["mdqa"]["train"], "pool": str(NQ)},
                         options={"question_types": ["who"]}, tokenizer=char_tok, target_tokens=1500, n=4, seed=0,
                         split="train")
    assert [ex.answers for ex in limited.examples] == [("Mara K. Olsen", "Olsen")]
    assert limited.dropped["question_type_not_limited"] == 3


def test_musique_keeps_only_linear_three_hop(char_tok):
    from tasks import musique

    res = musique.build("real", sources=SOURCES["musique"], options={}, tokenizer=char_tok, target_tokens=1500,
                        n=10, seed=0, split="train")
    assert sorted(ex.meta["musique_id"] for ex in res.examples) == ["3hop1__1_2_3", "3hop1__4_5_6"]
    assert res.dropped["not_linear_3hop"] == 2 and res.dropped["unanswerable"] == 1
    assert res.dropped["answer_not_in_supporting"] == 1
    limited = musique.build("real_limited", sources=SOURCES["musique"], options={"limited_sources": ["kb"]},
                            tokenizer=char_tok, target_tokens=1500, n=10, seed=0, split="train")
    assert [ex.meta["musique_id"] for ex in limited.examples] == ["3hop1__4_5_6"]  # the other has a text hop


def test_summhay_insight_in_exactly_two(char_tok):
    from tasks import summhay

    topic = json.loads((FIXTURES / "summhay_topic.json").read_text())
    insights = {i["insight_id"]: i["insight"] for s in topic["subtopics"] for i in s["insights"]}
    res = summhay.build("real", sources=SOURCES["summhay"], options={}, tokenizer=char_tok, target_tokens=3000,
                        n=6, seed=0, split="train")
    assert res.dropped["insight_in_fewer_than_two_documents"] == 1  # i4 is in one document only
    assert len(res.examples) == 6
    for ex in res.examples:
        text = insights[ex.meta["insight_id"]]
        forms = {text, text.replace("most", "many")}  # the fixture words one copy differently
        docs = ex.prompt[ex.context_span.start : ex.context_span.end].split("Document [")[1:]
        cited = [i + 1 for i, d in enumerate(docs) if any(f in d for f in forms)]
        assert len(cited) == 2 and ex.target == " " + "".join(f"[{i}]" for i in cited)
        assert all(n in forms for n in (n.strip() for n in ex.needles))


def test_bad_input_errors(tmp_path, char_tok):
    from tasks import mdqa, musique

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answers": ["a"], "ctxs": []}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        mdqa.build("real", sources={"train": str(bad)}, options={}, tokenizer=char_tok, target_tokens=500, n=1,
                   seed=0, split="train")
    with pytest.raises(DataError, match="source 'train' file .*missing.jsonl does not exist"):
        musique.build("real", sources={"train": str(tmp_path / "missing.jsonl")}, options={}, tokenizer=char_tok,
                      target_tokens=500, n=1, seed=0, split="train")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"wrong.jsonl:1: MuSiQue question lacks key"):
        musique.build("real", sources={"train": str(wrong)}, options={}, tokenizer=char_tok, target_tokens=500, n=1,
                      seed=0, split="train")
    with pytest.raises(DataError, match="unknown option.*'colour'.*valid options"):
        mdqa.build("hh", sources={}, options={"colour": 1}, tokenizer=char_tok, target_tokens=500, n=1, seed=0,
                   split="train")
    with pytest.raises(ValueError, match="valid tasks"):
        get_task("nope")


class EchoSynth:
    """Returns LLM-like text: every other paragraph loses its answer."""

    def __init__(self):
        self.calls = 0

    def generate(self, requests):
        self.calls += 1
        out = []
        for i, r in enumerate(requests):
            answer = r.get("answer") or r.get("value")
            if answer and i % 2 == 1:
                out.append(r.template.replace(answer, "someone else"))
            elif r.kind == "rephrase_insight":
                out.append("In other words: " + r.field("insight"))
            else:
                out.append(r.template)
        return out


@pytest.mark.parametrize("task", ["mdqa", "musique", "summhay"])
def test_synth_text_is_located_or_counted(task, char_tok):
    synth = EchoSynth()
    module = get_task(task)
    res = module.build("hh", sources={}, options={"pool_size": 40}, tokenizer=char_tok, target_tokens=1500, n=6,
                       seed=0, split="train", synth=synth)
    assert synth.calls >= 1
    for ex in res.examples:
        _check_example(module, ex, 1500)
    if task != "summhay":
        assert res.dropped.get("answer_not_in_needle", 0) > 0
        assert len(res.examples) + res.dropped["answer_not_in_needle"] == 6
    else:
        assert all(n.startswith("In other words") for ex in res.examples for n in ex.needles)


def test_small_vocabulary_options(char_tok):
    from tasks import musique

    opts = {"filler": "dog cat. cow pig.", "symbol_alphabet": "ab", "symbol_length": 6, "pool_size": 10}
    res = musique.build("ll", sources={}, options=opts, tokenizer=char_tok, target_tokens=600, n=3, seed=0,
                        split="train")
    for ex in res.examples:
        assert set(ex.answers[0]) <= {"a", "b"} and len(ex.answers[0]) == 6
        body = ex.prompt[ex.context_span.start : ex.context_span.end]
        for n in ex.needles:
            body = body.replace(n, "")
        assert set(body.split()) <= {"dog", "cat.", "cow", "pig.", "dog", "cat", "cow", "pig"}


@pytest.mark.parametrize("variant", ["real", "hh", "hl", "lh", "ll", "symbolic"])
def test_musique_written_hops(variant, char_tok):
    """answer_hops: the target lists each hop's answer before the final one, F1 is on the final
    answer alone, and every hop's answer in its needle joins y*."""
    from tasks import musique

    kwargs = dict(sources=SOURCES["musique"], tokenizer=char_tok, target_tokens=1500, n=2, seed=0, split="train")
    plain = musique.build(variant, options={"pool_size": 60}, **kwargs).examples
    hops = musique.build(variant, options={"pool_size": 60, "answer_hops": True}, **kwargs).examples
    assert len(plain) == len(hops) == 2
    for p, h in zip(plain, hops):
        written = h.meta["hops"]
        assert len(written) == 3 and h.target == " " + " ; ".join(written) and p.target == " " + written[-1]
        assert h.prompt == p.prompt and h.answers == p.answers
        assert musique.score(h.target, h) == {"f1": 1.0, "em": 1.0}
        assert musique.score(" " + written[-1], h)["em"] == 1.0  # the final answer alone is right too
        assert musique.score(f" {written[-1]} ; {written[0]}", h)["em"] == 0.0  # the last item decides
        located = {h.prompt[s.start : s.end] for s in h.answer_spans}
        assert located == set(written), (located, written)
        assert {p.prompt[s.start : s.end] for s in p.answer_spans} == {written[-1]}
        for span in h.answer_spans:
            assert any(n.start <= span.start and span.end <= n.end for n in h.needle_spans)
    if variant == "real":  # the fixture's decompositions, hop by hop
        assert sorted(ex.meta["hops"] for ex in hops) == [["Ida Brandt", "Hollin", "the River Tam"],
                                                          ["Veland", "Port Ellis", "Dr. A. Moreau-Smith"]]


def test_every_registered_task_is_a_task_and_a_partial_module_is_not():
    import types

    from tasks import Task, head_kind, mdqa

    assert sorted(TASKS) == ["mdqa", "musique", "needle", "summhay"]
    assert all(isinstance(m, Task) for m in TASKS.values())
    partial = types.ModuleType("partial")
    for name in ("NAME", "VARIANTS", "SOURCES", "OPTIONS", "MAX_NEW_TOKENS", "STOP_STRINGS", "build", "score"):
        setattr(partial, name, getattr(mdqa, name))
    assert not isinstance(partial, Task)  # no HEAD_KIND
    partial.HEAD_KIND = "retrieval"
    assert isinstance(partial, Task)
    assert [head_kind(t) for t in ("mdqa", "musique", "summhay", "needle", "gone")] == \
        ["retrieval", "retrieval", "insight", "retrieval", "retrieval"]


@pytest.mark.parametrize("task", ["mdqa", "musique", "summhay"])
def test_the_shared_build_refuses_an_unknown_variant_naming_the_task(task, char_tok):
    with pytest.raises(DataError, match=rf"^{task}: unknown variant 'hx'; valid: \['real', 'real_limited', 'hh', "
                                        r"'hl', 'lh', 'll', 'symbolic'\]$"):
        get_task(task).build("hx", sources={}, options={}, tokenizer=char_tok, target_tokens=500, n=1, seed=0,
                             split="train")


def test_mdqa_checks_its_gold_position_through_the_shared_build(char_tok):
    with pytest.raises(DataError, match=r"^mdqa: option gold_position must be 'random', an index or a depth in "
                                        r"\[0, 1\], got 'middle'$"):
        get_task("mdqa").build("hh", sources={}, options={"gold_position": "middle"}, tokenizer=char_tok,
                               target_tokens=500, n=1, seed=0, split="train")
