"""The miniature: world determinism, public source formats, tokenizer, cached base model, checks."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import string
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.miniature import (
    MiniatureError,
    MiniatureSpec,
    SourceSizes,
    build_tokenizer,
    build_world,
    ensure_base_model,
    render_sources,
    retrieval_accuracy,
    sources_of,
    spec_hash,
    summary,
)
from engine.miniature import pretrain as pretrain_module
from engine.miniature.corpus import COPY_MARK, KINDS, TASK_OPTIONS, PretrainingMix, copy_sequence, token_ids
from engine.miniature.drills import drill
from engine.miniature.spec import Stage
from engine.miniature.world import WORD_PATTERN

SMALL = SourceSizes(mdqa_train=30, mdqa_eval=10, mdqa_pool=20, musique_train=20, musique_eval=10,
                    summhay_train=3, summhay_eval=2)
# A recipe small enough for a test; it cannot do the tasks, so it keeps its model with a warning.
TINY = MiniatureSpec(n_layers=1, n_heads=2, n_kv_heads=1, head_dim=None, hidden=32, intermediate=64, context=64,
                     steps=3, phase1_steps=2, batch_size=4, warmup_steps=1, qa_per_task=3, min_accuracy=0.0,
                     check_probes=4, threads=1, rope_jitter=1.0, on_failed_check="warn",
                     mix=(0.5, 0.1, 0.2, 0.0, 0.0, 0.2))  # no MuSiQue or SummHay drill fits in 64 tokens
pytestmark = pytest.mark.filterwarnings("ignore:the miniature pretrained from this recipe")


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0)


@pytest.fixture(scope="module")
def sources(world, tmp_path_factory):
    return render_sources(world, tmp_path_factory.mktemp("mini_sources"), SMALL)


@pytest.fixture(scope="module")
def tokenizer(world, tmp_path_factory):
    from engine.models import load_tokenizer

    path = tmp_path_factory.mktemp("mini_tok")
    build_tokenizer(world, path)
    return load_tokenizer(str(path))


@pytest.fixture(scope="module")
def prompt_tokenizer(world, sources, tmp_path_factory):
    """The pretraining's tokenizer: the tasks' prompt words whole, as `pretrain` builds it."""
    from engine.miniature.corpus import prompt_words
    from engine.models import load_tokenizer

    path = tmp_path_factory.mktemp("mini_prompt_tok")
    build_tokenizer(world, path, extra_texts=(" ".join(prompt_words(build_tokenizer(world), sources, 0)),))
    return load_tokenizer(str(path))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------- world and sources


def test_world_is_deterministic_per_seed(tmp_path):
    assert build_world(3) == build_world(3)
    assert build_world(3).entities != build_world(4).entities
    a = render_sources(build_world(3), tmp_path / "a", SMALL)
    b = render_sources(build_world(3), tmp_path / "b", SMALL)
    for task in a:
        for key in a[task]:
            pa, pb = Path(a[task][key]), Path(b[task][key])
            files_a = sorted(pa.rglob("*")) if pa.is_dir() else [pa]
            files_b = sorted(pb.rglob("*")) if pb.is_dir() else [pb]
            assert [f.read_bytes() for f in files_a] == [f.read_bytes() for f in files_b]


def test_names_are_unique_and_never_template_words(world):
    names = [e.name for kind in world.entities for e in world.entities[kind]]
    assert len(names) == len(set(names))
    singles = {w for n in names for w in n.split()}
    assert not singles & {"The", "Grass", "Copy", "Query", "Document"}


def test_mdqa_records_follow_lost_in_the_middle(sources):
    rows = read_jsonl(sources["mdqa"]["train"])
    assert len(rows) == SMALL.mdqa_train
    for row in rows:
        assert set(row) == {"question", "answers", "ctxs"}
        assert len(row["ctxs"]) == SMALL.mdqa_docs
        gold = [c for c in row["ctxs"] if c["isgold"]]
        assert len(gold) == 1
        assert gold[0]["title"] in row["question"]  # the question is about the gold entity
        for ctx in row["ctxs"]:
            assert set(ctx) == {"id", "title", "text", "hasanswer", "isgold"}
            assert ctx["hasanswer"] == (row["answers"][0] in ctx["text"])
        assert gold[0]["hasanswer"]
        # Distractors never talk about the question's subject.
        assert sum(c["title"] == gold[0]["title"] for c in row["ctxs"]) == 1
    pool = read_jsonl(sources["mdqa"]["pool"])
    assert len(pool) == SMALL.mdqa_pool and all({"title", "text"} <= set(p) for p in pool)


def test_answers_are_only_knowable_from_context(sources):
    """Facts are drawn per record: the same question gets different answers, and the pool
    and the two splits never share a question subject."""
    train, evals = read_jsonl(sources["mdqa"]["train"]), read_jsonl(sources["mdqa"]["eval"])
    subjects = lambda rows: {c["title"] for r in rows for c in r["ctxs"] if c["isgold"]}
    assert not subjects(train) & subjects(evals)
    assert not (subjects(train) | subjects(evals)) & {p["title"] for p in read_jsonl(sources["mdqa"]["pool"])}
    rng = random.Random(0)
    world = build_world(0)
    facts = [world.random_fact(rng, "born_in", subject=world.of_kind("person")[0]) for _ in range(20)]
    assert len({f.object.name for f in facts}) > 5  # the same subject, fresh values every time


def test_musique_records_are_linear_three_hop(sources):
    for row in read_jsonl(sources["musique"]["eval"]):
        assert set(row) == {"id", "paragraphs", "question", "question_decomposition", "answer",
                            "answer_aliases", "answerable"}
        assert row["id"].startswith("3hop1__") and row["answerable"]
        steps = row["question_decomposition"]
        assert len(steps) == 3 and steps[-1]["answer"] == row["answer"]
        assert [p["idx"] for p in row["paragraphs"]] == list(range(len(row["paragraphs"])))
        supporting = {p["idx"] for p in row["paragraphs"] if p["is_supporting"]}
        assert supporting == {s["paragraph_support_idx"] for s in steps}
        previous = None
        for h, step in enumerate(steps):
            paragraph = row["paragraphs"][step["paragraph_support_idx"]]
            assert step["answer"] in paragraph["paragraph_text"]
            if h == 0:
                assert paragraph["title"] in row["question"]
            else:
                assert f"#{h}" in step["question"] and paragraph["title"] == previous
            previous = step["answer"]


def test_summhay_topics_put_each_insight_in_exactly_two_documents(sources):
    topics = json.loads(Path(sources["summhay"]["train"]).read_text())
    assert len(topics) == SMALL.summhay_train
    for topic in topics:
        assert {"topic_id", "topic", "subtopics", "documents"} <= set(topic)
        insights = [i for s in topic["subtopics"] for i in s["insights"]]
        assert all(set(i) == {"insight_id", "insight_name", "insight"} for i in insights)
        assert len(insights) == SMALL.summhay_insights
        docs = topic["documents"]
        assert len(docs) == SMALL.summhay_docs and all(d["insights_included"] for d in docs)
        for insight in insights:
            listed = [d for d in docs if insight["insight_id"] in d["insights_included"]]
            written = [d for d in docs if insight["insight"] in d["document_text"]]
            assert len(listed) == 2 and listed == written


@pytest.mark.parametrize("task", ["mdqa", "musique", "summhay"])
def test_rendered_sources_load_through_the_task_code(task, sources, prompt_tokenizer):
    """The demo's real data goes through the same loaders as the public datasets, with the
    demo's options and the pretraining's tokenizer, at the short pretraining length and at
    4x, and `real_limited` finds its subset."""
    from tasks import get_task

    module = get_task(task)
    for variant, target in (("real", 256), ("real", 1024), ("real_limited", 512)):
        result = module.build(variant, sources=sources[task], options=TASK_OPTIONS[task], tokenizer=prompt_tokenizer,
                              target_tokens=target, n=4, seed=0, split="eval")
        assert len(result.examples) == 4, (variant, result.dropped)
        for example in result.examples:
            assert example.n_tokens <= target * 1.02
            assert module.score(example.target, example)["f1"] == 1.0
            for span in example.answer_spans:  # the answer is read from the context
                assert span.text(example.prompt).strip() in example.target


def test_sources_hold_qa_per_task_distinct_training_examples(world, tokenizer, tmp_path):
    """More QA than the default sources hold comes from more records, never from repeats
    (a model shown the same few hundred prompts dozens of times memorizes them)."""
    from engine.miniature.corpus import task_examples
    from engine.miniature.pretrain import source_sizes

    defaults = SourceSizes()
    assert source_sizes(TINY) == defaults  # small asks keep the default files
    sizes = source_sizes(dataclasses.replace(TINY, qa_per_task=650))
    assert (sizes.mdqa_train, sizes.musique_train, sizes.summhay_train) == (650, 650, 55)  # 55 topics x 12
    assert (sizes.mdqa_eval, sizes.mdqa_pool) == (defaults.mdqa_eval, defaults.mdqa_pool)
    paths = render_sources(world, tmp_path, dataclasses.replace(sizes, musique_train=1, summhay_train=1))
    prompts = [p for p, _ in task_examples(tokenizer, paths, 128, 650, seed=0)["mdqa"]]
    assert len(prompts) == len(set(prompts)) == 650 > defaults.mdqa_train


def test_short_summhay_prompts_give_every_document_text(world, sources, tmp_path):
    """At the pretraining length a SummHay prompt must be answered by reading: with ten
    documents in 112 tokens all but the two cited ones came out empty, and "cite the
    documents that have text" scored 0.96 at 128 tokens and nothing beyond. At 192 tokens
    the miniature's eight documents each keep a sentence."""
    import re

    from engine.miniature.corpus import prompt_words, task_examples
    from engine.models import load_tokenizer

    # the pretraining's tokenizer: prompt words whole, as `pretrain` builds it
    build_tokenizer(world, tmp_path, extra_texts=(" ".join(prompt_words(build_tokenizer(world), sources, 0)),))
    pairs = task_examples(load_tokenizer(str(tmp_path)), sources, 192, 20, seed=0)["summhay"]
    assert len(pairs) >= 10
    for prompt, target in pairs:
        bodies = re.split(r"Document \[\d+\]:", prompt.split("\n\nStatement:")[0])[1:]
        assert len(bodies) == 8 and all(re.search(r"[A-Za-z]{3,}", body) for body in bodies), prompt
        cited = [int(n) for n in re.findall(r"\[(\d+)\]", target)]
        assert len(cited) == 2 and max(cited) <= len(bodies)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_keeps_every_world_word_whole(tokenizer, sources):
    texts = [c["text"] for r in read_jsonl(sources["mdqa"]["train"])[:10] for c in r["ctxs"]]
    texts += [r["question"] for r in read_jsonl(sources["musique"]["train"])]
    texts.append("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.")
    texts.append("Answer: [3][7] and [10]")
    for text in texts:
        assert tokenizer.tokenize(text) == re.findall(WORD_PATTERN, text)
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids and ids[0] == tokenizer.bos_token_id
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert re.findall(WORD_PATTERN, decoded) == re.findall(WORD_PATTERN, text)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ", min_size=1, max_size=40))
def test_tokenizer_never_emits_unk(text):
    tok = _shared_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert "".join(tok.decode(ids).split()) == "".join(text.split())


def test_unseen_symbols_fall_back_to_characters(tokenizer):
    assert tokenizer.tokenize("xq7b") == ["x", "##q", "##7", "##b"]
    assert tokenizer.convert_tokens_to_string(tokenizer.tokenize("xq7b")) == "xq7b"


_TOKENIZER = []


def _shared_tokenizer():
    if not _TOKENIZER:
        _TOKENIZER.append(build_tokenizer(build_world(0)))
    return _TOKENIZER[0]


# ----------------------------------------------------------------------------- pretraining corpus


def test_copy_sequences_put_needles_at_random_depths(tokenizer):
    tokens = token_ids(tokenizer)
    rng = random.Random(0)
    depths = set()
    for _ in range(50):
        ids, start = copy_sequence(rng, tokens, 64, 8)
        first = ids.index(tokens.copy_mark)
        assert len(ids) == 64 and ids[start - 1] == tokens.copy_mark
        assert ids[first + 1 : first + 9] == ids[start:]  # the copy repeats the marked span
        depths.add(first)
    assert len(depths) > 20


def test_pretraining_mix_puts_loss_on_copies_and_answers_only(tokenizer):
    mix = PretrainingMix(tokenizer, [], context=64, size=40, seed=0)
    for i in range(40):
        item = mix[i]
        assert len(item["input_ids"]) == len(item["labels"]) <= 64
        scored = [j for j, label in enumerate(item["labels"]) if label != -100]
        assert scored and scored == list(range(scored[0], len(item["labels"])))
        assert item == mix[i]  # deterministic per index


def test_pretraining_mix_draws_whole_batches_in_two_phases(tokenizer):
    """Every batch has one kind and one length (no padding); phase 1 is short copy probes
    alone, phase 2 mixes all kinds at lengths up to the context; items past the end raise
    IndexError so iteration stops."""
    qa = [([tokenizer.bos_token_id] + [7] * 60, 50)] * 5
    mix = PretrainingMix(tokenizer, qa, context=128, size=16 * 200, seed=0, batch_size=16, phase1=80,
                         phase1_length=64)
    tokens = token_ids(tokenizer)
    early_lengths, late_lengths, kinds_early, kinds_late = [], [], set(), []
    for b in range(200):
        items = [mix[b * 16 + j] for j in range(16)]
        kinds = {"qa" if it["input_ids"] in [q[0] for q in qa]
                 else "copy" if tokens.copy_mark in it["input_ids"] else "lookup" for it in items}
        assert len(kinds) == 1, (b, kinds)
        kind = kinds.pop()
        if kind == "copy":
            assert len({len(it["input_ids"]) for it in items}) == 1
        (kinds_early if b < 80 else set()).add(kind)
        if b >= 80:
            kinds_late.append(kind)
        if kind != "qa":
            (early_lengths if b < 80 else late_lengths).append(len(items[0]["input_ids"]))
    assert kinds_early == {"copy"} and max(early_lengths) <= 64 and len(set(early_lengths)) > 5
    assert max(late_lengths) > 128 * 0.9 and set(kinds_late) == {"copy", "lookup", "qa"}
    # Phase 2 follows the (copy, lookup, qa) weights (0.5, 0.2, 0.3): 120 batches, loose bounds.
    assert 0.3 < kinds_late.count("copy") / 120 < 0.7 and 0.15 < kinds_late.count("qa") / 120 < 0.45
    assert len(list(mix)) == len(mix)


NAME = r"[A-Z][a-z]+(?: [A-Z][a-z]+)?"


def _stated(docs: str, subject: str, relation) -> list[str]:
    """Objects the documents state for (subject, relation), read with the world's templates."""
    found = []
    for template in relation.statements:
        sentence = re.escape(template.format(s=subject, o="@@").rstrip(".")).replace("@@", f"({NAME})")
        found += re.findall(r"(?:^|(?<= ))" + sentence + r"(?= \.)", docs.replace(".", " ."))
    return found


def _drill_text(tokenizer, task: str, seed: int, length: int):
    rng, world = random.Random(seed), build_world(0)
    made = drill(task, rng, world, tokenizer, length)
    while made is None:  # a draw that does not fit: the next draw, as the pretraining mix does
        made = drill(task, rng, world, tokenizer, length)
    ids, labels = made
    assert len(ids) == len(labels) <= length and ids[0] == tokenizer.bos_token_id
    scored = [i for i, label in zip(ids, labels) if label != -100]
    text = tokenizer.decode(ids[1:])
    docs, _, rest = text.partition(" Question" if task != "summhay" else " Statement")
    return docs, rest, tokenizer.decode(scored)


def test_mdqa_drill_answers_are_stated_once_in_their_documents(prompt_tokenizer):
    """Each question's labelled answer is the object of the one sentence in the documents
    that states (subject, relation): re-read from the decoded text with the world's
    templates, independently of how the sequence was assembled."""
    from engine.miniature.world import RELATIONS

    for seed in range(30):
        docs, rest, scored = _drill_text(prompt_tokenizer, "mdqa", seed, 192)
        pairs = re.findall(r"Question : (.+?\?) Reply with only the answer, no other words. Answer : (.+?) </s>",
                           "Question" + rest)
        assert 1 <= len(pairs) <= 3 and scored == " ".join(f"{answer} </s>" for _, answer in pairs)
        for question, answer in pairs:
            matches = []
            for relation in RELATIONS:
                asked = re.fullmatch(re.escape(relation.question).replace(re.escape("{s}"), "(.+)"), question)
                if asked:
                    matches += _stated(docs, asked.group(1), relation)
            assert matches == [answer], (seed, question, answer, matches)


def test_musique_drill_hops_follow_the_chain_in_the_documents(prompt_tokenizer):
    """"What is the R3 of the R2 of the R1 of S?": the labelled answer lists the object of
    (S, R1), then of (that, R2), then of (that, R3), each stated once in the documents."""
    from engine.miniature.world import RELATIONS

    by_noun = {r.noun.replace(" {s}", ""): r for r in RELATIONS}  # "the birthplace of" -> born_in
    sizes = []
    for seed in range(30):
        docs, rest, scored = _drill_text(prompt_tokenizer, "musique", seed, 192)
        pairs = re.findall(r"Question : (?:What|Who) is (.+?)\? Reply with only the answer, no other words. "
                           r"Answer : (.+?) </s>", "Question" + rest)
        assert pairs and scored == " ".join(f"{answer} </s>" for _, answer in pairs)
        for phrase, answer in pairs:
            nouns = re.findall("|".join(map(re.escape, by_noun)), phrase)
            entity = phrase.split(" of ")[-1]
            hops = []
            for noun in reversed(nouns):
                (entity,) = _stated(docs, entity, by_noun[noun])
                hops.append(entity)
            assert " ; ".join(hops) == answer, (seed, phrase, answer)
            sizes.append(len(hops))
    assert set(sizes) == {1, 2, 3} and sizes.count(3) == 30  # every drill asks the three-hop question


def test_summhay_drill_cites_the_two_documents_holding_each_statement(prompt_tokenizer):
    counts = []
    for seed in range(30):
        docs, rest, scored = _drill_text(prompt_tokenizer, "summhay", seed, 192)
        bodies = re.split(r"Document \[\d+\] :", docs)[1:]
        pairs = re.findall(r"Statement : (.+?) Reply with only .+? Answer : (\[\d+\] \[\d+\]) </s>", "Statement" + rest)
        assert pairs and scored == " ".join(f"{answer} </s>" for _, answer in pairs)
        for statement, answer in pairs:
            holding = [i + 1 for i, body in enumerate(bodies) if statement in body]
            assert answer == f"[{holding[0]}] [{holding[1]}]" and len(holding) == 2, (seed, statement, holding)
        assert all(re.search(r"[A-Za-z]{3,}", body) for body in bodies)  # no document is empty
        counts.append(len(bodies))
    assert min(counts) >= 2 and max(counts) >= 6


@pytest.mark.parametrize("task", ["mdqa", "musique", "summhay"])
def test_drills_fit_their_length_or_say_none(task, prompt_tokenizer):
    world = build_world(0)
    for length in (64, 96, 128, 192):
        for seed in range(10):
            made = drill(task, random.Random(seed), world, prompt_tokenizer, length)
            assert made is None or len(made[0]) <= length


def test_a_mix_whose_drill_cannot_fit_its_context_is_refused(prompt_tokenizer, world):
    """No MuSiQue drill (three hop paragraphs and their questions) fits in 64 tokens: the mix
    says so when it is built instead of drawing forever."""
    musique_only = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0)
    with pytest.raises(MiniatureError, match=r"miniature.context 64: no musique drill fits in 64 tokens"):
        PretrainingMix(prompt_tokenizer, [], 64, 8, 0, weights=musique_only, world=world)
    mix = PretrainingMix(prompt_tokenizer, [], 192, 8, 0, weights=musique_only, world=world)
    assert all(len(mix[i]["input_ids"]) <= 192 for i in range(8))


def test_lm_share_puts_loss_on_every_token_of_drills_and_prompts(tokenizer, world):
    qa = [([tokenizer.bos_token_id] + [7] * 60, 50)] * 5
    weights = (0.2, 0.0, 0.2, 0.2, 0.2, 0.2)
    for share, expect_full in ((1.0, True), (0.0, False)):
        mix = PretrainingMix(tokenizer, qa, context=192, size=8 * 60, seed=0, batch_size=8, weights=weights,
                             world=world, lm_share=share)
        for b in range(60):
            kind, _ = mix.batch_plan(b)
            item = mix[b * 8]
            full = item["labels"] == item["input_ids"]
            assert full == (expect_full and kind != "copy"), (share, kind)


def test_pretraining_mix_ramp_grows_length_and_other_kinds_together(tokenizer, world):
    qa = [([tokenizer.bos_token_id] + [7] * 60, 50)] * 5
    mix = PretrainingMix(tokenizer, qa, context=192, size=8 * 300, seed=0, batch_size=8, phase1=50,
                         phase1_length=48, ramp=200, weights=(0.2, 0.1, 0.2, 0.1, 0.1, 0.3), world=world)
    plans = [mix.batch_plan(b) for b in range(300)]
    assert {k for k, _ in plans[:50]} == {"copy"} and max(n for _, n in plans[:50]) <= 48
    early, late = plans[50:100], plans[200:250]
    assert max(n for _, n in early) < max(n for _, n in late)
    assert sum(k == "copy" for k, _ in early) > sum(k == "copy" for k, _ in late)
    assert {k for k, _ in plans[250:]} == set(KINDS)
    for task in ("mdqa", "musique", "summhay"):
        b = next(b for b, (k, _) in enumerate(plans) if k == task)
        assert any(label != -100 for label in mix[b * 8]["labels"])


def _kind(item, tokens, qa) -> str:
    ids = item["input_ids"]
    return ("qa" if ids in [q[0] for q in qa] else "copy" if tokens.copy_mark in ids
            else "lookup" if tokens.lookup_mark in ids else "drill")


def test_a_curriculum_stage_ends_at_its_gate_or_its_max_steps(tokenizer):
    """Phase 1, then each stage's own kinds and longest length; a stage whose gate passed
    ends before the next batch not yet read, one whose gate never passes after max_steps;
    then the final mix."""
    qa = [([tokenizer.bos_token_id] + [7] * 60, 50)] * 5
    stages = (Stage("copy", (1, 0, 0, 0, 0, 0), longest=56, gate="copy", max_steps=5),
              Stage("lookup", (0, 1, 0, 0, 0, 0), longest=96, gate="mdqa", max_steps=4))
    tokens = token_ids(tokenizer)

    def read(mix, batches):
        return [{_kind(mix[b * 2 + j], tokens, qa) for j in range(2)} for b in batches]

    mix = PretrainingMix(tokenizer, qa, context=128, size=2 * 20, seed=0, batch_size=2, phase1=3,
                         phase1_length=64, weights=(0, 0, 0, 0, 0, 1), stages=stages)
    assert read(mix, range(6)) == [{"copy"}] * 6 and mix.starts == [3]
    assert max(len(mix[b * 2]["input_ids"]) for b in range(3, 6)) <= 56
    assert mix.end_stage(0) == 6 and mix.end_stage(0) is None  # the gate passed after batch 5 was read
    assert read(mix, range(6, 12)) == [{"lookup"}] * 4 + [{"qa"}] * 2
    assert mix.starts == [3, 6, 10] and mix.stage_of(9) == 1 and mix.stage_of(10) == 2
    assert mix.end_stage(1) is None  # no longer the current stage

    untouched = PretrainingMix(tokenizer, qa, context=128, size=2 * 20, seed=0, batch_size=2, phase1=3,
                               phase1_length=64, weights=(0, 0, 0, 0, 0, 1), stages=stages)
    assert read(untouched, range(14)) == [{"copy"}] * 8 + [{"lookup"}] * 4 + [{"qa"}] * 2
    assert untouched.starts == [3, 8, 12]


def test_stages_are_validated_where_the_recipe_names_them(tmp_path):
    from engine.config import ConfigError, load_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("context: 192\nstages:\n  - {name: a, mix: [1, 0, 0, 0, 0, 0], gate: mqda}\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: stages\[0\]: stage 'a': gate 'mqda'; "
                                         r"choose from copy, mdqa, musique, summhay or null$"):
        load_recipe(recipe)
    recipe.write_text("context: 192\nstages:\n  - {name: a, mix: [1, 0, 0, 0, 0, 0], longst: 96}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\]: unknown key 'longst' \(did you mean 'longest'\?\)"):
        load_recipe(recipe)
    recipe.write_text("context: 192\nstages:\n  - {name: a, mix: [1, 0, 0, 0, 0, 0], longest: 384}\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: miniature.stages: longest 384 exceeds the context 192$"):
        load_recipe(recipe)
    recipe.write_text("context: 192\nstages:\n  - {name: a, mix: [1, 0, 0, 0, 0, 0], longest: 32}\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: stages\[0\]: stage 'a': longest 32 must be >= 48 tokens"):
        load_recipe(recipe)
    shipped = load_recipe(Path(__file__).parents[2] / "experiments" / "miniature_curriculum.yaml")
    assert [s.gate for s in shipped.stages] == ["copy", "copy", "mdqa", "musique", "summhay"]
    # a recipe without stages keeps the identity it had before the curriculum existed
    assert spec_hash(MiniatureSpec()) != spec_hash(dataclasses.replace(MiniatureSpec(), stages=shipped.stages))
    assert spec_hash(MiniatureSpec()) == spec_hash(dataclasses.replace(MiniatureSpec(), gate_every=7))


CURRICULUM = dataclasses.replace(
    TINY, steps=8, phase1_steps=1, ramp_steps=0, gate_every=1, gate_probes=4,
    stages=(Stage("copy", (1, 0, 0, 0, 0, 0), longest=48, gate="copy", bar=0.0, max_steps=3),
            Stage("lookup", (0.5, 0.5, 0, 0, 0, 0), gate="mdqa", bar=1.1, max_steps=2)))


def test_a_gated_pretraining_switches_stages_and_resumes_where_it_switched(tmp_path, monkeypatch):
    """The copy stage's gate (bar 0) passes at its first check, after step 2: the trainer has
    read batch 2 by then (it reads one batch ahead), so the next stage starts at batch 3; that
    stage's gate (bar 1.1) never passes and it ends after its 2 steps. Killed after step 4 and
    resumed from the step-3 checkpoint, the run switches at the same steps and ends with the
    same weights."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    monkeypatch.setattr(pretrain_module, "SHIPPED", tmp_path / "no-shipped-base")
    monkeypatch.setattr(pretrain_module, "CHECKPOINT_STEPS", 3)
    whole = ensure_base_model(CURRICULUM, cache_dir=tmp_path / "whole", progress=False)
    record = json.loads((whole / "miniature.json").read_text())["curriculum"]
    assert [(s["name"], s["start"], s["end"], s["passed"]) for s in record["stages"]] == [
        ("copy", 1, 3, True), ("lookup", 3, 5, False)]
    assert record["final_mix_start"] == 5
    assert [(c["step"], c["stage"], c["gate"]) for c in record["checks"]] == [(2, "copy", "copy"), (4, "lookup", "mdqa")]

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    real_train = pretrain_module.train_model
    monkeypatch.setattr(pretrain_module, "train_model", lambda *a, **k: real_train(*a[:5], (*a[5], Kill())))
    with pytest.raises(KeyboardInterrupt):
        ensure_base_model(CURRICULUM, cache_dir=tmp_path / "resumed", progress=False)
    work = tmp_path / "resumed" / f".work-{spec_hash(CURRICULUM)}"
    assert json.loads((work / "curriculum.json").read_text())["starts"] == [1, 3]
    monkeypatch.setattr(pretrain_module, "train_model", real_train)
    resumed = ensure_base_model(CURRICULUM, cache_dir=tmp_path / "resumed", progress=False)
    assert json.loads((resumed / "miniature.json").read_text())["curriculum"] == record
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- retrieval check


class CopyModel(torch.nn.Module):
    """A reference copier: position t predicts token t + 1 by a fixed offset (positional) or
    by finding the previous copy mark (content)."""

    def __init__(self, vocab: int, mark: int, offset: int | None):
        super().__init__()
        self.vocab, self.mark, self.offset = vocab, mark, offset

    def forward(self, input_ids):
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.vocab)
        for b in range(batch):
            row = input_ids[b].tolist()
            marks = [i for i, t in enumerate(row) if t == self.mark]
            for t in range(length):
                if self.offset is not None:
                    source = t + 1 - self.offset
                else:
                    after = [m for m in marks if m <= t]
                    source = marks[0] + 1 + (t - after[-1]) if len(after) >= 2 else -1
                if 0 <= source < length:
                    logits[b, t, row[source]] = 1.0
        return type("Out", (), {"logits": logits})()


def test_retrieval_check_tells_content_from_position(tokenizer):
    mark = tokenizer.convert_tokens_to_ids(COPY_MARK)
    content = CopyModel(len(tokenizer), mark, offset=None)
    rows = retrieval_accuracy(content, tokenizer, lengths=[48, 96], n=12, seed=0, span=8, batch_size=4)
    assert summary(rows) == {48: 1.0, 96: 1.0}
    assert {r["depth"] for r in rows} - {"all"}  # depth bins are reported
    # "MARK span MARK span" with no gap: a shortcut copying from 9 tokens back is perfect
    # on fixed-gap data and must fail at random depths.
    positional = CopyModel(len(tokenizer), mark, offset=9)
    rng, tokens = random.Random(1), token_ids(tokenizer)
    fixed = [copy_sequence(rng, tokens, 48, 8, gap=0) for _ in range(8)]
    from engine.miniature.checks import copy_correct

    assert all(copy_correct(positional, [f[0] for f in fixed], [f[1] for f in fixed]))
    assert summary(retrieval_accuracy(positional, tokenizer, lengths=[96], n=24, seed=0, span=8))[96] < 0.3


# ----------------------------------------------------------------------------- cached base model


def test_base_model_cache_is_keyed_and_loadable(tmp_path, monkeypatch, capsys):
    from engine.models import architecture, load_model, load_tokenizer

    monkeypatch.setattr(pretrain_module, "SHIPPED", tmp_path / "no-shipped-base")
    calls = []
    real = pretrain_module.pretrain
    monkeypatch.setattr(pretrain_module, "pretrain", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = ensure_base_model(TINY, cache_dir=tmp_path, progress=False)
    assert ensure_base_model(TINY, cache_dir=tmp_path, progress=False) == path and len(calls) == 1
    assert "'loss'" not in capsys.readouterr().out  # no per-log dicts from the Trainer's printer
    assert MiniatureSpec(mix=list(MiniatureSpec().mix)) == MiniatureSpec() and spec_hash(TINY) == path.name
    # `rope_jitter: 32` in YAML or on a command line names the same model as 32.0
    assert spec_hash(MiniatureSpec(rope_jitter=32, rope_base=10000)) == spec_hash(MiniatureSpec(rope_jitter=32.0))
    # what to do about a missed gate is not part of the model
    assert spec_hash(dataclasses.replace(TINY, on_failed_check="raise")) == spec_hash(TINY)
    model, tok = load_model(str(path)), load_tokenizer(str(path))
    arch = architecture(model)
    assert (arch.n_layers, arch.n_heads, arch.n_kv_heads) == (1, 2, 1)
    assert tok.tokenize("xq7b") == ["x", "##q", "##7", "##b"]
    meta = json.loads((path / "miniature.json").read_text())
    assert {r["length"] for r in meta["retrieval"]} == {64, 256} and meta["spec_hash"] == path.name
    assert set(meta["gates"]["answers"]) == {"mdqa", "musique", "summhay"} and meta["gates"]["passed"] is False
    assert all(Path(p).exists() for paths in sources_of(path).values() for p in paths.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".work-"))]
    # A changed spec is a new entry; the stand-in pretraining only writes the marker file.
    monkeypatch.setattr(pretrain_module, "pretrain",
                        lambda spec, out, **k: calls.append(2) or (out.mkdir(parents=True, exist_ok=True),
                                                                    (out / "miniature.json").write_text("{}")))
    changed = ensure_base_model(MiniatureSpec(**{**TINY.__dict__, "steps": 4}), cache_dir=tmp_path, progress=False)
    assert changed != path and calls == [1, 2]
    assert ensure_base_model(TINY, cache_dir=tmp_path, progress=False) == path and calls == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted([path.name, changed.name])


def test_the_shipped_base_is_used_only_for_its_own_recipe(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "miniature.json").write_text(json.dumps({"spec_hash": spec_hash(TINY)}))
    monkeypatch.setattr(pretrain_module, "SHIPPED", shipped)
    monkeypatch.setattr(pretrain_module, "pretrain", lambda *a, **k: pytest.fail("pretrained despite the shipped base"))
    assert ensure_base_model(TINY, cache_dir=tmp_path / "cache", progress=False) == shipped
    assert pretrain_module.shipped_base(dataclasses.replace(TINY, steps=4), shipped) is None
    assert not (tmp_path / "cache").exists()


def test_shipped_sources_are_rendered_once_into_the_cache(tmp_path):
    """The shipped base keeps no sources: they are rendered on first use, exactly as a
    pretraining renders them."""
    spec = dataclasses.replace(TINY, qa_per_task=1)
    model_dir = tmp_path / "shipped"
    model_dir.mkdir()
    reference = render_sources(build_world(spec.seed), tmp_path / "reference", pretrain_module.source_sizes(spec))
    rel = {t: {k: str(Path(p).relative_to(tmp_path / "reference")) for k, p in v.items()} for t, v in reference.items()}
    (model_dir / "miniature.json").write_text(json.dumps({"spec": dataclasses.asdict(spec),
                                                          "spec_hash": spec_hash(spec), "sources": rel}))
    paths = sources_of(model_dir, cache_dir=tmp_path / "cache")
    assert Path(paths["mdqa"]["train"]).parent.parent == tmp_path / "cache" / f"sources-{spec_hash(spec)}"
    for task in reference:
        for key in reference[task]:
            assert Path(paths[task][key]).read_bytes() == Path(reference[task][key]).read_bytes()
    stamp = Path(paths["mdqa"]["train"]).stat().st_mtime_ns
    assert sources_of(model_dir, cache_dir=tmp_path / "cache") == paths
    assert Path(paths["mdqa"]["train"]).stat().st_mtime_ns == stamp  # not rendered twice


def test_a_missed_gate_raises_and_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_module, "SHIPPED", tmp_path / "no-shipped-base")
    strict = dataclasses.replace(TINY, on_failed_check="raise")
    with pytest.raises(MiniatureError, match=r"misses its competence gates(.|\n)*\| mdqa exact answers"):
        ensure_base_model(strict, cache_dir=tmp_path, progress=False)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(pretrain_module, "train_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ensure_base_model(TINY, cache_dir=tmp_path, progress=False)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_an_interrupted_pretraining_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Killed after its step-4 checkpoint, the pretraining resumes there and ends with the
    weights of an uninterrupted run."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    monkeypatch.setattr(pretrain_module, "SHIPPED", tmp_path / "no-shipped-base")
    monkeypatch.setattr(pretrain_module, "CHECKPOINT_STEPS", 4)
    # past phase 1 and the ramp, at 64 tokens: copy, lookup and QA (no task drill fits in 64)
    spec = dataclasses.replace(TINY, steps=8, phase1_steps=2, ramp_steps=2, mix=(0.6, 0.1, 0.0, 0.0, 0.0, 0.3))
    whole = ensure_base_model(spec, cache_dir=tmp_path / "whole", progress=False)

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise KeyboardInterrupt

    real_train = pretrain_module.train_model
    steps_seen = []

    class Count(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps_seen.append(state.global_step)

    monkeypatch.setattr(pretrain_module, "train_model", lambda *a, **k: real_train(*a[:5], callbacks=(Kill(),)))
    with pytest.raises(KeyboardInterrupt):
        ensure_base_model(spec, cache_dir=tmp_path / "resumed", progress=False)
    work = tmp_path / "resumed" / f".work-{spec_hash(spec)}"
    assert [p.name for p in (work / "trainer").glob("checkpoint-*")] == ["checkpoint-4"]
    monkeypatch.setattr(pretrain_module, "train_model", lambda *a, **k: real_train(*a[:5], callbacks=(Count(),)))
    resumed = ensure_base_model(spec, cache_dir=tmp_path / "resumed", progress=False)
    assert steps_seen == [4, 5, 6, 7] and not work.exists()
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


KILLED_PRETRAINING = """
import os, sys, time
from pathlib import Path
from engine.miniature import pretrain as p
from test_miniature import TINY

def stand_in(spec, out, **kwargs):
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(b"half")
    (Path(sys.argv[1]) / "started").write_text(str(os.getpid()))
    time.sleep(600)  # killed here

p.pretrain = stand_in
p.ensure_base_model(TINY, cache_dir=Path(sys.argv[1]), progress=False)
"""


def test_killed_pretraining_leaves_nothing_after_the_next_run(tmp_path, monkeypatch):
    import os
    import signal
    import subprocess
    import sys
    import time

    tests = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests), str(tests / "engine")])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PRETRAINING, str(tmp_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300  # a hang guard: the loop ends when the stand-in has started
    while time.time() < deadline and proc.poll() is None and not (tmp_path / "started").exists():
        time.sleep(0.1)
    assert (tmp_path / "started").exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    stale = tmp_path / f".tmp-{spec_hash(TINY)}-{proc.pid}"
    assert (stale / "model.safetensors").exists()  # the kill left its build directory
    live = tmp_path / f".tmp-0123456789abcdef-{os.getppid()}"  # a build of a process still running
    live.mkdir()

    monkeypatch.setattr(pretrain_module, "pretrain",
                        lambda spec, out, **k: (out.mkdir(parents=True, exist_ok=True),
                                                (out / "miniature.json").write_text("{}")))
    path = ensure_base_model(TINY, cache_dir=tmp_path, progress=False)
    assert (path / "miniature.json").exists() and not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == sorted(
        [path.name, live.name, "started"])


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NEEDLEWORK_CACHE", str(tmp_path))
    assert pretrain_module.default_cache_dir() == tmp_path / "miniature"


def test_missed_gates_in_warn_mode_keep_the_model_and_flag_it(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_module, "SHIPPED", tmp_path / "no-shipped-base")
    with pytest.warns(UserWarning, match="misses its competence gates"):
        path = ensure_base_model(dataclasses.replace(TINY, min_accuracy=0.99), cache_dir=tmp_path, progress=False)
    meta = json.loads((path / "miniature.json").read_text())
    assert meta["check"]["passed"] is False and meta["check"]["min_accuracy"] == 0.99
    assert meta["gates"]["copy"]["bar"] == 0.99 and meta["gates"]["query_heads"] == {"n": 2, "bar": 32, "passed": False}
    with pytest.raises(ValueError, match="on_failed_check"):
        MiniatureSpec(on_failed_check="ignore")
    with pytest.raises(ValueError, match="six weights"):
        MiniatureSpec(mix=(0.5, 0.5))


def test_the_recipe_file_is_the_default_recipe():
    from engine.config import load_recipe

    assert load_recipe(Path(__file__).parents[2] / "experiments" / "miniature.yaml") == MiniatureSpec()



def test_head_dim_widens_heads_without_changing_the_residual_width(tokenizer):
    from transformers import LlamaForCausalLM

    from engine.models import architecture

    default = LlamaForCausalLM(pretrain_module.llama_config(TINY, tokenizer))
    wide = LlamaForCausalLM(pretrain_module.llama_config(MiniatureSpec(**{**TINY.__dict__, "head_dim": 48}),
                                                         tokenizer))
    attn = wide.model.layers[0].self_attn
    assert (attn.q_proj.in_features, attn.q_proj.out_features) == (32, 2 * 48)
    assert (attn.k_proj.out_features, attn.o_proj.in_features) == (1 * 48, 2 * 48)
    assert architecture(wide).head_dim == 48 and architecture(default).head_dim == 32 // 2
    ids = torch.tensor([[tokenizer.bos_token_id, 5, 6, 7]])
    assert wide(ids).logits.shape == (1, 4, len(tokenizer))


def test_rope_jitter_trains_at_raised_bases_after_phase_one_and_restores_the_base(tokenizer):
    import math
    from types import SimpleNamespace

    from transformers import LlamaForCausalLM

    # rope_jitter_from None: jitter from the end of phase 1 (the shipped recipe starts it at step 5600)
    spec = MiniatureSpec(**{**TINY.__dict__, "phase1_steps": 3, "rope_jitter": 8.0, "rope_jitter_from": None})
    model = LlamaForCausalLM(pretrain_module.llama_config(spec, tokenizer))
    jitter = pretrain_module.rope_jitter_callback(spec)
    head_dim = spec.hidden // spec.n_heads

    def base_of(inv_freq):  # inv_freq[1] = base ** (-2 / head_dim)
        return float(inv_freq[1]) ** (-head_dim / 2)

    original = model.model.rotary_emb.inv_freq.clone()
    assert base_of(original) == pytest.approx(spec.rope_base, rel=1e-4)
    seen = []
    for step in range(12):  # steps 0-2: phase 1; then about half raised
        jitter.on_step_begin(None, SimpleNamespace(global_step=step), None, model=model)
        seen.append(base_of(model.model.rotary_emb.inv_freq))
        jitter.on_step_end(None, SimpleNamespace(global_step=step), None, model=model)
        assert torch.equal(model.model.rotary_emb.inv_freq, original)
    assert seen[:3] == pytest.approx([spec.rope_base] * 3, rel=1e-4)
    assert all(spec.rope_base * 0.999 <= b <= 8 * spec.rope_base * 1.001 for b in seen)
    raised = [b for b in seen[3:] if b > spec.rope_base * 1.001]
    assert 2 <= len(raised) <= 7 and len({round(math.log(b), 3) for b in raised}) == len(raised)


def test_the_demo_uses_the_task_options_and_rope_range_the_base_learned():
    """The demo's fine-tunes extend what the base does: the same task options as its
    pretraining prompts, a raised RoPE base inside the range it was jittered over, and 4x
    its pretraining length."""
    from engine.config import load_experiment

    demo = load_experiment(Path(__file__).parents[2] / "experiments" / "demo.yaml")
    spec = demo.miniature
    for task in demo.tasks:
        assert dict(task.options) == TASK_OPTIONS[task.name], task.name
        assert task.target_tokens == 4 * spec.context
    assert spec.rope_base < demo.model.rope_base <= spec.rope_base * spec.rope_jitter
