"""The SummHay loader on the public topic format (salesforce/summary-of-a-haystack data/topic_*.json).

The fixture is a small hand-written topic in that exact nesting: `topic_id`, `topic_metadata`,
`subtopics[]` (`subtopic_id`, `subtopic_name`, `subtopic`, `insights[]` of `insight_name` /
`insight` / `insight_id`, `query`, `retriever`, `summaries`, `eval_summaries`), `documents[]`
(`document_id`, `document_text`, `document_metadata`, `insights_included`, `idx`,
`label_<id>`), then `topic`.
"""

import json
from pathlib import Path

import pytest

from tasks import summhay
from tasks.build import DataError

TOPIC = Path(__file__).parents[1] / "fixtures" / "summhay_topic.json"


def _build(path, char_tok, variant="real", options=None, n=4):
    return summhay.build(variant, sources={"train": str(path)}, options=options or {}, tokenizer=char_tok,
                         target_tokens=3000, n=n, seed=0, split="train")


def test_fixture_has_the_public_nesting():
    topic = json.loads(TOPIC.read_text())
    assert list(topic) == ["topic_id", "topic_metadata", "subtopics", "documents", "topic"]
    for sub in topic["subtopics"]:
        assert {"subtopic_id", "subtopic_name", "subtopic", "insights", "query", "retriever", "summaries",
                "eval_summaries"} <= set(sub)
        assert all(set(i) == {"insight_name", "insight", "insight_id"} for i in sub["insights"])
    ids = {i["insight_id"] for s in topic["subtopics"] for i in s["insights"]}
    for doc in topic["documents"]:
        assert {"document_id", "document_text", "document_metadata", "insights_included", "idx"} <= set(doc)
        # the label columns the public loader derives agree with insights_included
        assert {k[len("label_"):] for k, v in doc.items() if k.startswith("label_") and v and k[6:] in ids} == \
            set(doc["insights_included"])


def test_real_limited_by_subtopic_name(char_tok):
    topic = json.loads(TOPIC.read_text())
    facilities = next(s for s in topic["subtopics"] if s["subtopic_name"] == "facilities")
    equipment, lisbon = (i["insight_id"] for i in facilities["insights"])

    res = _build(TOPIC, char_tok, "real_limited", {"limited_subtopics": ["facilities"]})

    assert {ex.meta["insight_id"] for ex in res.examples} == {equipment}
    assert res.dropped["insight_in_fewer_than_two_documents"] == 1  # the Lisbon insight: one document
    assert res.dropped["subtopic_not_limited"] == 2
    assert lisbon not in {ex.meta["insight_id"] for ex in res.examples}


def test_jsonl_and_directory_sources_read_the_same_topics(tmp_path, char_tok):
    topic = json.loads(TOPIC.read_text())
    (tmp_path / "topics.jsonl").write_text(json.dumps(topic) + "\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "topic_news1.json").write_text(json.dumps(topic))

    prompts = [[ex.prompt for ex in _build(p, char_tok).examples]
               for p in (TOPIC, tmp_path / "topics.jsonl", tmp_path / "dir")]

    assert prompts[0] and prompts[0] == prompts[1] == prompts[2]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["documents"][3].pop("insights_included"), r"topic 0: documents\[3\] lacks 'document_text'"),
    (lambda t: t["subtopics"][1].update(insights="none"), r"topic 0: subtopics\[1\] lacks the list 'insights'"),
    (lambda t: t["subtopics"][0]["insights"][1].pop("insight_id"), r"subtopics\[0\]\.insights\[1\] lacks"),
    (lambda t: t.pop("documents"), "expected a SummHay topic with lists 'subtopics' and 'documents'"),
])
def test_malformed_topic_names_the_place(tmp_path, char_tok, edit, message):
    topic = json.loads(TOPIC.read_text())
    edit(topic)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(topic))

    with pytest.raises(DataError, match=message):
        _build(bad, char_tok)


@pytest.mark.parametrize("variant", ["real", "symbolic"])
def test_short_prompts_never_leave_a_document_empty(char_tok, variant):
    """Too short for a sentence in every document, a prompt is dropped as too long: one whose
    only documents with text are the cited ones is answered without reading them."""
    built, dropped = 0, 0
    for target in range(150, 1200, 50):
        res = summhay.build(variant, sources={"train": str(TOPIC)}, options={"n_documents": 4}, tokenizer=char_tok,
                            target_tokens=target, n=3, seed=0, split="train")
        for ex in res.examples:
            bodies = ex.prompt[ex.context_span.start:ex.context_span.end].split("Document [")[1:]
            assert len(bodies) == 4 and all(b.split(":\n", 1)[1].strip() for b in bodies), ex.prompt
        built += len(res.examples)
        dropped += res.dropped.get("too_long_for_target", 0)
    assert built and dropped  # both sides of the boundary were reached
