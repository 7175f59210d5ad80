"""Cross-model patching: head sets, the n = 0 case, and F1 through real Ray actors against
in-process patched decoding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_data import CharScorer, make_examples, mean_f1, reference_decode, write_eval_set
from tiny import save_tiny

from analyses.patching import HeadSets, PatchingError, head_sets, patch_runs, run_patching
from engine.config import EvaluateConfig, ModelConfig, PatchingConfig
from engine.evaluate import ModelRef
from engine.head_scores import score_table
from engine.heads import Patch
from engine.models import load_model, load_tokenizer

REAL = {(0, 0), (0, 1), (0, 2), (1, 0)}  # H_real
SYNTH = {(0, 0), (1, 1), (1, 2)}  # H_X: inter = {(0,0)}, compl = {(0,1), (0,2), (1,0)}, n = 1
POOL = EvaluateConfig(num_actors=2, shard_size=4, timeout_s=120)


def ref(path: str) -> ModelRef:
    return ModelRef(ModelConfig("tiny", path))


def scores_file(path, positive: set, kind: str = "retrieval") -> str:
    grid = np.zeros((1, 2, 4))
    for layer, head in positive:
        grid[0, layer, head] = 0.25 + 0.1 * head
    pq.write_table(score_table(grid if kind == "retrieval" else None, grid if kind == "insight" else None), path)
    return str(path)


def test_head_sets_and_sampling(tmp_path):
    sets = head_sets(scores_file(tmp_path / "a.parquet", REAL), scores_file(tmp_path / "b.parquet", SYNTH), "retrieval")
    assert sets.inter == ((0, 0),) and sets.compl == ((0, 1), (0, 2), (1, 0)) and sets.n == 1
    assert len(sets.all_heads) == 8
    big = HeadSets(real=frozenset((0, h) for h in range(20)), target=frozenset((0, h) for h in range(4)),
                   all_heads=tuple((l, h) for l in range(4) for h in range(20)))  # |inter| 4, |compl| 16
    kw = dict(target=ref("x"), source=ref("a"), task="kv", data_path="d", out_dir="o")
    runs = patch_runs(big, seeds=(0, 1), **kw)
    assert [(r.set, r.seed) for r in runs] == [("none", -1)] + [(s, seed) for seed in (0, 1) for s in ("inter", "compl", "random")]
    for r in runs[1:]:
        assert len(r.heads) == 4 and r.job.patch_heads == r.heads and r.job.patch_source == ref("a")
        assert r.job.scoring is None  # patched runs decode without head scores
        assert set(r.heads) <= {"inter": big.real & big.target, "compl": big.real - big.target,
                                "random": set(big.all_heads)}[r.set]
    assert runs[0].job.patch_source is None
    compl = [r.heads for r in runs if r.set == "compl"]
    assert compl[0] != compl[1]  # seeds differ
    assert compl == [r.heads for r in patch_runs(big, seeds=(0, 1), **kw) if r.set == "compl"]  # and reproduce
    inter = [r for r in runs if r.set == "inter"]
    assert inter[0].job is inter[1].job  # the whole H_inter each seed: one job
    with pytest.raises(PatchingError, match="no 'insight' scores"):
        head_sets(str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"), "insight")


def test_empty_intersection_is_recorded_not_run(tmp_path, tiny_checkpoints):
    ckpt = tiny_checkpoints["llama"]
    data = write_eval_set(tmp_path / "eval.parquet", 4, seed=5)
    examples = make_examples(4, seed=5)
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    decoded = reference_decode(model, tok, examples)
    scorer = CharScorer()
    pq.write_table(
        pa.table({"id": [e.id for e in examples], "prediction": [d.text for d in decoded],
                                     "f1": [scorer.score(d.text, e)["f1"] for e, d in zip(examples, decoded)],
                                     "em": [0.0] * 4, "n_tokens": [len(d.token_ids) for d in decoded]}),
        tmp_path / "predictions.parquet",
    )
    # H_X has none of H_real: H_inter is empty, n = 0, nothing is patched and no actor starts
    table = run_patching(
        target=ref(ckpt), source=ref(ckpt), task="kv",
        target_scores=scores_file(tmp_path / "x.parquet", {(1, 3)}), source_scores=scores_file(tmp_path / "a.parquet", REAL),
        kind="retrieval", data_path=data, out_dir=str(tmp_path / "out"), patching=PatchingConfig(seeds=(0,)),
        evaluate=POOL,
        unpatched_predictions=str(tmp_path / "predictions.parquet"), show_progress=False, scorer=scorer,
    )
    rows = table.to_pylist()
    assert [r["set"] for r in rows] == ["none", "inter", "compl", "random"]
    assert rows[0]["f1"] == pytest.approx(mean_f1(examples, decoded)) and rows[0]["gain"] == 0.0
    for r in rows[1:]:
        assert r["f1"] is None and r["gain"] is None and r["n_heads"] == 0
        assert "n = 0" in r["note"] and "H_inter is empty" in r["note"]
    assert all(r["size_inter"] == 0 and r["size_compl"] == 4 for r in rows)
    assert pq.read_table(tmp_path / "out" / "patching.parquet").equals(table)


def test_patching_end_to_end_through_ray(tmp_path, tiny_checkpoints, ray_cluster):
    real_ckpt = tiny_checkpoints["llama"]  # model A (real data)
    synth_ckpt = str(save_tiny("llama", tmp_path / "synth", seed=1))  # model X
    data = write_eval_set(tmp_path / "eval.parquet", 8, seed=4)
    real_scores = scores_file(tmp_path / "real.parquet", REAL)
    synth_scores = scores_file(tmp_path / "synth.parquet", SYNTH)
    kw = dict(task="kv", target_scores=synth_scores, source_scores=real_scores, kind="retrieval", data_path=data,
              patching=PatchingConfig(seeds=(0, 1)), evaluate=dataclasses.replace(POOL, batch_size=2),
              show_progress=False, scorer=CharScorer())
    table = run_patching(target=ref(synth_ckpt), source=ref(real_ckpt),
                         out_dir=str(tmp_path / "patching"), **kw)
    assert pq.read_table(tmp_path / "patching" / "patching.parquet").equals(table)
    rows = table.to_pylist()
    assert [(r["set"], r["seed"]) for r in rows] == [("none", -1)] + [
        (s, seed) for seed in (0, 1) for s in ("inter", "compl", "random")]
    assert all(r["size_inter"] == 1 and r["size_compl"] == 3 for r in rows)
    assert {r["n_heads"] for r in rows[1:]} == {1}
    assert all(r["heads"] == ["0.0"] for r in rows if r["set"] == "inter")
    assert all(r["heads"][0] in {"0.1", "0.2", "1.0"} for r in rows if r["set"] == "compl")

    examples = make_examples(8, seed=4)
    synth, source, tok = load_model(synth_ckpt), load_model(real_ckpt), load_tokenizer(synth_ckpt)
    none_f1 = mean_f1(examples, reference_decode(synth, tok, examples, batch_size=2))
    for r in rows:
        heads = tuple(tuple(int(x) for x in h.split(".")) for h in r["heads"])
        intervention = Patch(source, heads) if heads else None
        want = mean_f1(examples, reference_decode(synth, tok, examples, batch_size=2, intervention=intervention))
        assert r["f1"] == pytest.approx(want, abs=1e-12), r
        assert r["gain"] == pytest.approx(want - none_f1, abs=1e-12)
    assert any(r["gain"] != 0 for r in rows)  # patching another model's heads changes answers
