"""Head-set stability, per-step head sets and intervals against hand computations on hand-made
per-example scores (every subset enumerated where the curve is exact)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analyses.head_examples import ExamplesError, example_scores, step_hits
from analyses.intervals import recall_interval, task_intervals
from analyses.stability import default_sizes, enough_examples, jaccard, run_stability, stability_curve
from analyses.steps import run_steps, step_sets
from engine.stats import mean_interval, proportion_interval

# 4 examples x 1 layer x 3 heads: head 0 scores in every example, head 1 in example 0 only,
# head 2 never.
SCORES = np.array([[[1.0, 0.5, 0.0]], [[0.5, 0.0, 0.0]], [[1.0, 0.0, 0.0]], [[0.25, 0.0, 0.0]]])


def test_jaccard_and_sizes():
    assert jaccard(np.array([1, 1, 0], bool), np.array([1, 0, 1], bool)) == pytest.approx(1 / 3)
    assert jaccard(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert default_sizes(10) == [1, 2, 4, 8, 10] and default_sizes(1) == [1]


def test_stability_curve_is_exact_when_every_subset_fits():
    rows = {r["n_examples"]: r for r in stability_curve(SCORES, draws=200)}
    assert set(rows) == {1, 2, 4}
    # H(all) = {0, 1}. A subset finds head 1 only if it holds example 0: Jaccard 1, else 1/2.
    for n, row in rows.items():
        subsets = list(itertools.combinations(range(4), n))
        want = [1.0 if 0 in s else 0.5 for s in subsets]
        assert row["draws"] == len(subsets) and row["jaccard_mean"] == pytest.approx(np.mean(want))
        assert row["jaccard_low"] == pytest.approx(np.percentile(want, 2.5))
        assert row["heads_mean"] == pytest.approx(np.mean([2 if 0 in s else 1 for s in subsets]))
        assert row["heads_all"] == 2 and row["n_total"] == 4
    assert rows[1]["jaccard_mean"] == pytest.approx(0.625) and rows[4]["jaccard_mean"] == 1.0
    assert enough_examples(list(rows.values())) == 4 and enough_examples(list(rows.values()), 0.6) == 1


def test_stability_threshold_lets_subsets_add_heads():
    # threshold 0.6: H(all) = {0} (mean 0.6875); example 0 alone also has no head 1 (0.5 < 0.6), but
    # examples {1, 3} have head 0 at 0.375: an empty H, Jaccard 0.
    rows = {r["n_examples"]: r for r in stability_curve(SCORES, sizes=(2,), threshold=0.6)}
    subsets = list(itertools.combinations(range(4), 2))
    want = [jaccard(SCORES[list(s)].mean(0) > 0.6, SCORES.mean(0) > 0.6) for s in subsets]
    assert rows[2]["jaccard_mean"] == pytest.approx(np.mean(want)) and min(want) == 0.0


def test_random_subsets_when_there_are_too_many():
    scores = np.zeros((12, 1, 2))
    scores[:, 0, 0] = 1.0
    scores[3, 0, 1] = 1.0
    row = next(r for r in stability_curve(scores, sizes=(6,), draws=50) if r["n_examples"] == 6)
    assert row["draws"] == 50  # C(12, 6) = 924 > 50
    assert 0.5 <= row["jaccard_low"] <= row["jaccard_mean"] <= row["jaccard_high"] <= 1.0
    assert stability_curve(scores, sizes=(6,), draws=50, seed=3) != stability_curve(scores, sizes=(6,), draws=50)


def hits(*steps):
    """`[steps, 1, 3]` from per-step lists of active heads."""
    out = np.zeros((len(steps), 1, 3), dtype=bool)
    for t, heads in enumerate(steps):
        out[t, 0, list(heads)] = True
    return out


def test_step_sets_by_hand():
    # example A: step 0 head 0, step 1 heads 0 and 1; example B: step 0 head 2 (3 steps), step 2 head 0
    rows = step_sets([hits([0], [0, 1]), hits([2], [], [0])])
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["n_examples"] for r in rows] == [2, 2, 1]
    assert [r["n_heads"] for r in rows] == [2, 2, 1] and {r["heads_all"] for r in rows} == {3}
    assert [r["coverage"] for r in rows] == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert [r["example_coverage"] for r in rows] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert [r["jaccard"] for r in rows] == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert step_sets([]) == []
    empty = step_sets([hits([], [])])
    assert empty[0]["heads_all"] == 0 and math.isnan(empty[0]["coverage"])


def write_examples(path, scores, step_lists, kind="retrieval"):
    rows = []
    for i, (s, steps) in enumerate(zip(scores, step_lists)):
        h = hits(*steps) if steps is not None else None
        rows.append({"index": i, "id": f"e{i}", "n_layers": 1, "n_heads": 3,
                     "retrieval": None if s is None else list(s), "insight": None,
                     "n_steps": 0 if h is None else len(h),
                     "retrieval_hits": None if h is None else np.flatnonzero(h).tolist(), "insight_hits": None})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_readers_skip_examples_that_count_for_no_head(tmp_path):
    path = write_examples(tmp_path / "head_examples.parquet",
                          [[1.0, 0.5, 0.0], [math.nan] * 3, [0.5, 0.0, 0.0]],
                          [[[0], [0, 1]], [[2]], [[0]]])
    np.testing.assert_array_equal(example_scores(path, "retrieval"), [[[1.0, 0.5, 0.0]], [[0.5, 0.0, 0.0]]])
    got = step_hits(path, "retrieval")
    assert len(got) == 2 and got[0].tolist() == hits([0], [0, 1]).tolist() and got[1].tolist() == hits([0]).tolist()
    with pytest.raises(ExamplesError, match="no insight scores"):
        example_scores(path, "insight")
    with pytest.raises(ExamplesError, match="nowhere.parquet: no per-example head scores"):
        example_scores(tmp_path / "nowhere.parquet", "retrieval")


def test_task_intervals_and_the_runners(tmp_path):
    real = [[1.0, 0.5, 0.0], [0.5, 0.0, 0.0], [1.0, 0.0, 0.25]]
    hh = [[0.0, 0.5, 0.0], [0.0, 1.0, 0.0]]
    for variant, scores, f1 in (("real", real, [1.0, 0.0, 1.0, 1.0]), ("hh", hh, [0.0, 0.0, 1.0, 0.5])):
        write_examples(tmp_path / "eval" / "mdqa" / variant / "own" / "head_examples.parquet", scores,
                       [[[0]]] * len(scores))
        (tmp_path / "eval" / "mdqa" / variant / "real").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([{"id": str(i), "f1": v} for i, v in enumerate(f1)]),
                       tmp_path / "eval" / "mdqa" / variant / "real" / "predictions.parquet")
    heads, metrics = task_intervals(tmp_path, "mdqa", ["real", "hh"], "retrieval")
    by = {(r["variant"], r["metric"]): r for r in metrics.to_pylist()}
    f1 = mean_interval([1.0, 0.0, 1.0, 1.0])
    assert (by[("real", "f1")]["estimate"], by[("real", "f1")]["ci_low"]) == pytest.approx((f1.estimate, f1.low))
    # H_real = {0, 1, 2}, H_hh = {1}: 1 of 3
    want = proportion_interval(1, 3)
    row = by[("hh", "recall_vs_real")]
    assert (row["estimate"], row["ci_low"], row["ci_high"], row["n"]) == pytest.approx(
        (1 / 3, want.low, want.high, 3))
    head0 = next(r for r in heads.to_pylist() if r["variant"] == "real" and r["head"] == 0)
    iv = mean_interval([1.0, 0.5, 1.0])
    assert (head0["score"], head0["ci_low"], head0["ci_high"], head0["n"]) == pytest.approx(
        (iv.estimate, iv.low, iv.high, 3))
    assert recall_interval(np.zeros((2, 1, 3)), np.zeros((2, 1, 3))).n == 0  # no real heads: undefined

    variants, kinds = {"mdqa": ["real", "hh", "absent"]}, {"mdqa": "retrieval"}
    stability = pq.read_table(run_stability(tmp_path, ["mdqa"], variants, kinds)["mdqa"]).to_pylist()
    assert {r["variant"] for r in stability} == {"real", "hh"}  # no per-example scores: not a curve
    steps = pq.read_table(run_steps(tmp_path, ["mdqa"], variants, kinds)["mdqa"]).to_pylist()
    assert [(r["variant"], r["n_heads"], r["heads_all"]) for r in steps] == [("real", 1, 1), ("hh", 1, 1)]
