"""Knockout sweep: head selection rules, and F1 through real Ray actors against in-process decoding."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_data import CharScorer, make_examples, mean_f1, reference_decode, write_eval_set

from analyses.knockout import (
    KnockoutError,
    knockout_curve,
    knockout_jobs,
    random_heads,
    ranked_heads,
    run_knockout,
)
from engine.config import EvaluateConfig, KnockoutConfig, ModelConfig
from engine.evaluate import ModelRef
from engine.head_scores import score_table
from engine.heads import Knockout
from engine.models import load_model, load_tokenizer


def scores_file(path, grid: np.ndarray, kind: str = "retrieval") -> str:
    table = score_table(grid[None] if kind == "retrieval" else None, grid[None] if kind == "insight" else None)
    pq.write_table(table, path)
    return str(path)


def test_ranking_orders_by_score_then_head_and_puts_unscored_last():
    grid = np.array([[0.1, 0.5, np.nan, 0.0], [0.5, 0.0, 0.9, 0.2]])
    ranking = ranked_heads(score_table(grid[None], None), "retrieval")
    assert ranking == [(1, 2), (0, 1), (1, 0), (1, 3), (0, 0), (0, 3), (1, 1), (0, 2)]
    with pytest.raises(KnockoutError, match="no 'insight' scores"):
        ranked_heads(score_table(grid[None], None), "insight", source="x.parquet")


def test_random_heads_exclude_the_top_k_and_reproduce_by_seed():
    rng = np.random.default_rng(7)
    ranking = ranked_heads(score_table(rng.random((1, 8, 8)), None), "retrieval")
    for k in (1, 5, 20):  # (k = 32 of 64 heads leaves exactly 32 to draw: every seed takes all)
        top = set(ranking[:k])
        draws = {seed: random_heads(ranking, k, seed) for seed in (0, 1, 2)}
        for heads in draws.values():
            assert len(heads) == len(set(heads)) == k
            assert not top & set(heads)
            assert set(heads) <= set(ranking)
        assert draws[0] == random_heads(ranking, k, 0)  # same seed, same heads
        assert len(set(draws.values())) == 3  # different seeds, different heads
    with pytest.raises(KnockoutError, match="outside the top 33"):
        random_heads(ranking, 33, 0)


def test_jobs_cover_the_sweep(tmp_path):
    grid = np.arange(8, dtype=float).reshape(2, 4) / 10
    path = scores_file(tmp_path / "h.parquet", grid)
    runs = knockout_jobs(model=ModelRef(ModelConfig("m", "m")), task="kv", head_scores=path, kind="retrieval",
                         data_path="d.parquet", out_dir=str(tmp_path / "ko"),
                         knockout=KnockoutConfig(ks=(2, 0, 2), seeds=(0, 1, 2)), evaluate=EvaluateConfig())
    assert [(r.k, r.selection, r.seed) for r in runs] == [
        (0, "top", -1), (2, "top", -1), (2, "random", 0), (2, "random", 1), (2, "random", 2)]
    assert runs[1].heads == ((1, 2), (1, 3)) and runs[1].job.knockout == ((1, 2), (1, 3))
    assert runs[0].job.knockout is None and all(r.job.scoring is None for r in runs)
    assert len({r.job.out_dir for r in runs}) == len(runs)
    with pytest.raises(KnockoutError, match="must lie in"):
        knockout_jobs(model=ModelRef(ModelConfig("m", "m")), task="kv", head_scores=path, kind="retrieval",
                      data_path="d.parquet", out_dir=str(tmp_path), knockout=KnockoutConfig(ks=(9,)),
                      evaluate=EvaluateConfig())


def test_curve_mean_and_std():
    table = pa.table({"k": [0, 2, 2, 2, 2], "selection": ["top", "top", "random", "random", "random"],
                      "seed": [-1, -1, 0, 1, 2], "f1": [0.9, 0.2, 0.8, 0.6, 0.7]})
    curve = {(r["k"], r["selection"]): r for r in knockout_curve(table).to_pylist()}
    assert curve[(2, "random")]["f1_mean"] == pytest.approx(0.7)
    assert curve[(2, "random")]["f1_std"] == pytest.approx(np.std([0.8, 0.6, 0.7], ddof=1))
    assert curve[(2, "top")]["f1_std"] == 0.0 and curve[(2, "random")]["n_runs"] == 3


def test_knockout_end_to_end_through_ray(tmp_path, tiny_checkpoints, ray_cluster):
    ckpt = tiny_checkpoints["llama"]
    data = write_eval_set(tmp_path / "eval.parquet", 8, seed=3)
    grid = np.array([[0.0, 0.7, 0.1, 0.0], [0.4, 0.0, 0.0, 0.9]])  # top-2: (1,3), (0,1)
    scores = scores_file(tmp_path / "head_scores.parquet", grid)
    out = tmp_path / "knockout"
    table = run_knockout(
        model=ModelRef(ModelConfig("tiny", ckpt)), task="kv", head_scores=scores, kind="retrieval", data_path=data,
        out_dir=str(out), knockout=KnockoutConfig(ks=(0, 2), seeds=(0, 1)),
        evaluate=EvaluateConfig(num_actors=2, shard_size=4, timeout_s=120, batch_size=2),
        show_progress=False, scorer=CharScorer(),
    )
    assert pq.read_table(out / "knockout.parquet").equals(table)
    rows = table.to_pylist()
    assert [(r["k"], r["selection"], r["seed"]) for r in rows] == [
        (0, "top", -1), (2, "top", -1), (2, "random", 0), (2, "random", 1)]
    assert rows[1]["heads"] == ["0.1", "1.3"]
    for r in rows[2:]:
        assert not set(r["heads"]) & {"0.1", "1.3"} and len(r["heads"]) == 2
    assert rows[2]["heads"] != rows[3]["heads"]

    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    examples = make_examples(8, seed=3)
    for r in rows:
        heads = tuple(tuple(int(x) for x in h.split(".")) for h in r["heads"])
        decoded = reference_decode(model, tok, examples, score=False, batch_size=2,
                                   intervention=Knockout(heads) if heads else None)
        assert r["f1"] == pytest.approx(mean_f1(examples, decoded), abs=1e-12), r
        assert r["n"] == 8
    assert len({r["f1"] for r in rows}) > 1  # knockouts changed the answers
