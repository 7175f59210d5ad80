"""Validators, parsers, prompts, requests and the cache, against hand-written expectations."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from engine.synth.cache import GenerationCache, generation_key
from engine.synth.config import SynthConfig, synth_config_from_dict
from engine.synth.prompts import build_chat
from engine.synth.request import KINDS, SynthRequest, make_request, read_requests, write_requests
from engine.synth.validate import check, format_paragraph, parse_paragraph, split_lines


def needle(**kw):
    return make_request("paraphrase_needle", template="Zorb lives in Paris.", sentence="Zorb lives in Paris.",
                        answer="Paris", question="Where does Zorb live?", **kw)


def test_paraphrase_needle_keeps_answer_and_strips_wrapping():
    r = needle()
    assert check(r, 'Paraphrase: "The city Zorb calls home is Paris."\nHope this helps!').text == (
        "The city Zorb calls home is Paris."
    )
    assert check(r, "<think>hmm, Paris</think>Zorb resides in Paris.").text == "Zorb resides in Paris."
    assert check(r, "Zorb resides in France.").reason == "answer missing"
    assert check(r, "Zorb lives in paris.").reason == "answer missing"  # verbatim, case included
    assert check(r, "Zorb lives in Paris.").reason == "unchanged"
    assert check(r, "   ").reason == "empty"
    assert check(r, "Paris " * 40).reason == "too long"


def test_fictional_paragraph_with_question_and_answer():
    r = make_request("fictional_paragraph", template="", entity="Velmora Abbey", qa="yes")
    raw = (
        "Title: Velmora Abbey\nParagraph: Velmora Abbey is a ruined monastery founded in 1204\n"
        "by the monk Oswin Tarr.\nQuestion: Who founded Velmora Abbey?\nAnswer: Oswin Tarr\n"
    )
    v = check(r, raw)
    assert v.ok
    p = parse_paragraph(v.text)
    assert (p.title, p.question, p.answer) == ("Velmora Abbey", "Who founded Velmora Abbey?", "Oswin Tarr")
    assert p.paragraph == "Velmora Abbey is a ruined monastery founded in 1204 by the monk Oswin Tarr."
    assert check(r, raw.replace("Answer: Oswin Tarr", "Answer: Brother Oswin")).reason == "answer missing"
    assert check(r, raw.replace("Question: Who founded Velmora Abbey?", "Question: Did Oswin Tarr found it?")
                 ).reason == "question gives away answer"
    assert check(r, "Velmora Abbey is a monastery.").reason.startswith("unparsable")
    assert check(r, "Title: X\nParagraph: about nothing\nQuestion: q?\nAnswer: nothing").reason == "entity missing"
    fixed = make_request("fictional_paragraph", template="", entity="Velmora Abbey", qa="yes", answer="1204")
    assert check(fixed, raw).reason == "wrong answer"


def test_fictional_paragraph_without_qa_round_trips_through_format():
    r = make_request("fictional_paragraph", template="", entity="Quill Harbor")
    text = format_paragraph("Quill Harbor", "Quill Harbor is a port town.")
    assert check(r, text).text == text
    assert parse_paragraph(text).question is None
    with pytest.raises(ValueError, match="missing paragraph"):
        parse_paragraph("Title: only a title")


def test_fictional_paragraph_without_qa_may_come_bare_and_loses_a_cut_last_sentence():
    r = make_request("fictional_paragraph", template="", entity="Quill Harbor", answer="Ossa Vey")
    bare = 'Quill Harbor is a port town.\nIts harbor master is Ossa Vey. Ships from the "north'
    assert check(r, bare).text == "Title: Quill Harbor\nParagraph: Quill Harbor is a port town. Its harbor master is Ossa Vey."
    # the cut sentence held the answer, which the kept paragraph must contain
    assert check(r, "Quill Harbor is a port town. It was built by Ossa Vey").reason == "answer missing"
    assert check(r, "Quill Harbor, built by Ossa Vey").text == "Title: Quill Harbor\nParagraph: Quill Harbor, built by Ossa Vey"
    assert check(r, 'Ossa Vey said "no."').reason == "entity missing"
    # the entity only in a sentence cut short: what is kept does not name it
    assert check(r, "Ossa Vey keeps the port. It is called Quill Harbor by").reason == "entity missing"
    assert check(r, "Title: Quill Harbor\nParagraph: Ossa Vey runs it. And the").text == (
        "Title: Quill Harbor\nParagraph: Ossa Vey runs it."
    )
    assert check(r, "  ").reason == "empty"
    with_qa = make_request("fictional_paragraph", template="", entity="Quill Harbor", qa="yes")
    assert check(with_qa, "Quill Harbor is a port town.").reason == "unparsable: missing title"


def test_entity_sentence_and_insights():
    r = make_request("entity_sentence", template="", entity="Zorb Kel", relation="mother", value="Ilsa Varn")
    assert check(r, "Zorb Kel was raised by his mother, Ilsa Varn.").ok
    assert check(r, "His mother was Ilsa Varn.").reason == "entity missing"
    assert check(r, "Zorb Kel had a mother.").reason == "answer missing"

    insight = "Remote workers report higher satisfaction but feel isolated from their teams."
    split = make_request("split_insight", template="", insight=insight, n=2)
    v = check(split, "1. Remote workers report higher satisfaction.\n2. Remote workers feel isolated from teams.")
    assert split_lines(v.text) == ["Remote workers report higher satisfaction.", "Remote workers feel isolated from teams."]
    assert check(split, "1. Only one sentence here.").reason == "wrong sentence count (1 != 2)"
    simplify = make_request("simplify_insight", template="", insight=insight)
    assert check(simplify, "Remote workers are happier but lonely.").ok
    assert check(simplify, insight * 3).reason == "not simpler"
    rephrase = make_request("rephrase_insight", template="", insight=insight)
    assert check(rephrase, insight).reason == "unchanged"
    assert check(rephrase, "Teams see remote staff happier yet more isolated than before.").ok


def test_prompts_carry_the_inputs():
    for kind, fields in {
        "paraphrase_needle": dict(sentence="S1", answer="A1"),
        "fictional_paragraph": dict(entity="E1", qa="yes", answer="A1"),
        "entity_sentence": dict(entity="E1", relation="R1", value="V1"),
        "rephrase_insight": dict(insight="I1"),
        "simplify_insight": dict(insight="I1"),
        "split_insight": dict(insight="I1", n=3),
    }.items():
        chat = build_chat(make_request(kind, template="t", **fields))
        assert [m["role"] for m in chat] == ["system", "user"]
        for value in fields.values():
            if value not in ("yes",):
                assert str(value) in chat[1]["content"], (kind, value)
    with pytest.raises(KeyError, match="no field 'answer'"):
        build_chat(make_request("paraphrase_needle", template="t", sentence="S"))


def test_requests_round_trip_parquet(tmp_path):
    reqs = [make_request(k, template=f"t{i}", seed=i, insight="x", n=2) for i, k in enumerate(KINDS)]
    write_requests(tmp_path / "r.parquet", reqs)
    assert read_requests(tmp_path / "r.parquet") == reqs
    with pytest.raises(ValueError, match="kind 'poem'"):
        SynthRequest("poem", (), "t")


def test_config_rejects_unknown_keys_and_bad_values():
    assert synth_config_from_dict({"backend": "hf", "model": "m"}).backend == "hf"
    with pytest.raises(ValueError, match=r"exp.yaml: unknown synth key\(s\) \['temprature'\]"):
        synth_config_from_dict({"temprature": 0.1}, source="exp.yaml")
    with pytest.raises(ValueError, match="synth.model is required"):
        SynthConfig(backend="vllm")
    with pytest.raises(ValueError, match="on_invalid"):
        SynthConfig(on_invalid="ignore")


def test_cache_is_content_addressed_and_persistent(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    ident = SynthConfig(backend="hf", model="m", temperature=0).identity()
    k = generation_key(chat, 0, ident)
    assert k == generation_key([dict(content="hi", role="user")], 0, dict(ident))
    assert k != generation_key(chat, 1, ident)
    assert k != generation_key(chat, 0, SynthConfig(backend="hf", model="m", temperature=0.5).identity())
    assert k != generation_key(chat, 0, SynthConfig(backend="hf", model="other", temperature=0).identity())
    assert generation_key(chat, 0, SynthConfig(backend="hf", model="m", temperature=0, concurrency=4).identity()) == k

    cache = GenerationCache(tmp_path)
    shard = cache.put({k: "hello"}, model="m")
    assert cache.put({k: "hello"}) is None  # already there: no new shard
    assert [p.name for p in tmp_path.iterdir()] == [shard.name]  # no temporary file left
    assert pq.read_table(shard).to_pylist() == [{"key": k, "text": "hello", "model": "m"}]
    assert GenerationCache(tmp_path).get(k) == "hello"
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="junk.parquet"):
        GenerationCache(tmp_path)
