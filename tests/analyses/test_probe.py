"""The probe's tables against hand computations on hand-written evaluation directories; its
candidate selection and errors. (The probe end to end, with real short tunes on Ray Train, is
tested on the tiny miniature run in tests/engine/test_pipeline.py.)"""

from __future__ import annotations

import itertools
import math
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats as sp

from analyses.probe import ProbeError, candidates, correlation_table, probe_table, rank_correlation
from engine.config import load_experiment

HEADS = [(l, h) for l in range(2) for h in range(2)]


def write_eval(path, scores: dict, f1s: list[float] | None = None, kind="retrieval"):
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"layer": l, "head": h, "kind": kind, "score": scores.get((l, h), 0.0),
                                          "n_examples": 2} for l, h in HEADS]), path / "head_scores.parquet")
    if f1s is not None:
        pq.write_table(pa.Table.from_pylist([{"id": str(i), "f1": v} for i, v in enumerate(f1s)]),
                       path / "predictions.parquet")


def test_probe_table_by_hand(tmp_path):
    write_eval(tmp_path / "eval/mdqa/real/own", {(0, 0): 1.0, (0, 1): 0.5, (1, 1): 0.25})
    probes = {"hh": ({(0, 0): 0.5, (0, 1): 0.5}, [1.0, 0.0], [1.0, 1.0]),
              "ll": ({(1, 0): 1.0}, [0.0, 0.0], [0.0, 0.5])}
    for v, (scores, probe_f1, full_f1) in probes.items():
        write_eval(tmp_path / f"probe/eval/mdqa/{v}/steps4", scores, probe_f1)
        write_eval(tmp_path / f"eval/mdqa/{v}/real", {}, full_f1)
    rows = probe_table(tmp_path, [("mdqa", "hh", 4), ("mdqa", "ll", 4)], {"mdqa": "retrieval"},
                       {("mdqa", "hh"): 40, ("mdqa", "ll"): None}).to_pylist()
    hh, ll = rows
    real = np.array([1.0, 0.5, 0.0, 0.25])
    assert hh["recall"] == pytest.approx(2 / 3) and ll["recall"] == 0.0
    assert hh["cosine"] == pytest.approx(real @ [0.5, 0.5, 0, 0] / np.linalg.norm(real) / np.linalg.norm([0.5, 0.5]))
    assert ll["cosine"] == 0.0
    assert (hh["n_heads"], hh["n_real_heads"], ll["n_heads"]) == (2, 3, 1)
    assert (hh["probe_f1"], hh["full_f1"], ll["probe_f1"], ll["full_f1"]) == (0.5, 1.0, 0.0, 0.25)
    assert hh["steps_fraction"] == 0.1 and math.isnan(ll["steps_fraction"])


def test_rank_correlation_is_spearman_with_its_exact_permutation_p():
    x, y = [0.1, 0.4, 0.3, 0.9], [0.2, 0.5, 0.1, 0.7]
    rank, iv = rank_correlation(x, y)
    rho = sp.spearmanr(x, y).statistic
    perms = [sp.spearmanr(x, p).statistic for p in itertools.permutations(y)]
    assert rank.rho == pytest.approx(rho) and rank.n == 4
    assert rank.p_value == pytest.approx(sum(abs(r) >= abs(rho) - 1e-12 for r in perms) / 24)
    assert -1.0 <= iv.low <= iv.high <= 1.0
    # perfectly monotone: every resample that has an order has rho 1; the ~1.6% without one (all
    # four draws the same candidate) fall below the 2.5th percentile
    _, perfect = rank_correlation([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4])
    assert (perfect.low, perfect.high) == (1.0, 1.0)
    undefined, _ = rank_correlation([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])
    assert math.isnan(undefined.rho)


def test_correlation_table_per_task_budget_and_predictor():
    rows = []
    for steps, recalls in ((4, [0.2, 0.1, 0.5, 0.4]), (16, [0.1, 0.2, 0.4, 0.5])):
        for v, r, full in zip(("hh", "hl", "lh", "ll"), recalls, (0.1, 0.2, 0.3, 0.4)):
            rows.append({"task": "mdqa", "steps": steps, "variant": v, "recall": r, "cosine": 1 - r,
                         "probe_f1": 0.0, "full_f1": full})
    rows.append({"task": "musique", "steps": 4, "variant": "hh", "recall": 0.3, "cosine": 0.3, "probe_f1": 0.1,
                 "full_f1": math.nan})
    table = {(r["task"], r["steps"], r["predictor"]): r for r in correlation_table(rows).to_pylist()}
    assert set(table) == {(t, s, p) for t, s in (("mdqa", 4), ("mdqa", 16), ("musique", 4))
                          for p in ("recall", "cosine", "probe_f1")}
    assert table[("mdqa", 16, "recall")]["rho"] == pytest.approx(sp.spearmanr([0.1, 0.2, 0.4, 0.5],
                                                                                [0.1, 0.2, 0.3, 0.4]).statistic)
    assert table[("mdqa", 4, "recall")]["rho"] == pytest.approx(sp.spearmanr([0.2, 0.1, 0.5, 0.4],
                                                                               [0.1, 0.2, 0.3, 0.4]).statistic)
    assert table[("mdqa", 4, "cosine")]["rho"] == pytest.approx(-table[("mdqa", 4, "recall")]["rho"])
    assert math.isnan(table[("mdqa", 4, "probe_f1")]["rho"]) and "constant" in table[("mdqa", 4, "probe_f1")]["note"]
    assert table[("musique", 4, "recall")]["note"] == "no full fine-tunes of the candidates"


def test_candidates_and_bad_requests(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent("""
        name: grid
        model: {name: tiny, path: /models/tiny}
        tasks:
          mdqa: {variants: [real, hh, ll, base]}
          summhay: {variants: [real, symbolic]}
    """))
    exp = load_experiment(path)
    assert [(r.task, r.variant) for r in candidates(exp)] == [("mdqa", "hh"), ("mdqa", "ll"), ("summhay", "symbolic")]
    assert [r.variant for r in candidates(exp, variants=["ll"])] == ["ll"]
    assert [r.task for r in candidates(exp, tasks=["summhay"])] == ["summhay"]
    with pytest.raises(ProbeError, match=r"--variants: 'base' is not a candidate of grid \(fine-tuned, not real: "
                                         r"hh, ll, symbolic\)"):
        candidates(exp, variants=["base"])
    with pytest.raises(ProbeError, match=r"--tasks: 'musique' is not a task of grid"):
        candidates(exp, tasks=["musique"])
