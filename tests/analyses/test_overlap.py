import itertools
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analyses.overlap import (
    OverlapError,
    cosine_similarity,
    cross_task_cosine,
    head_recall,
    head_set,
    read_head_scores,
    run_overlap,
    spearman,
)

N_LAYERS, N_HEADS = 32, 32
ALL_HEADS = [(layer, head) for layer in range(N_LAYERS) for head in range(N_HEADS)]


def write_scores(path: Path, scores: dict, kind: str = "retrieval", extra_kind: str | None = None) -> None:
    rows = [
        {"layer": l, "head": h, "kind": kind, "score": float(scores.get((l, h), 0.0)), "n_examples": 10}
        for l, h in ALL_HEADS
    ]
    if extra_kind:
        rows += [{"layer": l, "head": h, "kind": extra_kind, "score": 0.5, "n_examples": 10} for l, h in ALL_HEADS]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_predictions(path: Path, f1s: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": str(i), "prediction": "x", "f1": f, "em": float(f == 1), "n_tokens": 3} for i, f in enumerate(f1s)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def paper_musique_sets():
    """Head sets of the sizes in the paper's MuSiQue recall table: |real|=129, |hl|=112, 85 shared."""
    rng = np.random.default_rng(0)
    order = [ALL_HEADS[i] for i in rng.permutation(len(ALL_HEADS))]
    shared, only_real, only_hl = order[:85], order[85:129], order[129:156]
    real = {h: 0.1 + 0.01 * i for i, h in enumerate(shared + only_real)}
    hl = {h: 0.2 for h in shared + only_hl}
    return real, hl


def test_recall_reproduces_paper_musique_cells():
    real, hl = paper_musique_sets()
    h_real, h_hl = head_set(real), head_set(hl)
    assert (len(h_real), len(h_hl), len(h_real & h_hl)) == (129, 112, 85)
    assert round(head_recall(h_real, h_hl), 2) == 0.76  # row real, column hl: 85/112
    assert round(head_recall(h_hl, h_real), 2) == 0.66  # row hl, column real: 85/129


def test_run_overlap_writes_paper_cells_and_counts(tmp_path):
    real, hl = paper_musique_sets()
    for variant, scores, f1 in (("real", real, [0.6, 0.8]), ("hl", hl, [0.2, 0.4])):
        write_scores(tmp_path / "eval/musique" / variant / "own/head_scores.parquet", scores)
        write_predictions(tmp_path / "eval/musique" / variant / "real/predictions.parquet", f1)
    paths = run_overlap(tmp_path, ["musique"], ["real", "hl"], {"musique": "retrieval"})
    recall = {(r["row"], r["column"]): r for r in pq.read_table(paths["musique"]["recall"]).to_pylist()}
    assert round(recall["real", "hl"]["recall"], 2) == 0.76
    assert round(recall["hl", "real"]["recall"], 2) == 0.66
    assert recall["real", "real"]["recall"] == 1.0
    assert recall["hl", "real"]["n_intersection"] == 85
    counts = {r["variant"]: r for r in pq.read_table(paths["musique"]["counts"]).to_pylist()}
    assert counts["real"]["n_heads"] == 129 and counts["hl"]["n_heads"] == 112
    assert counts["hl"]["recall_vs_real"] == pytest.approx(85 / 129)
    assert counts["hl"]["f1"] == pytest.approx(0.3) and counts["hl"]["n_eval"] == 2
    assert counts["real"]["n_total_heads"] == N_LAYERS * N_HEADS
    # Cosine against numpy on the flattened grids, built independently here.
    a, b = np.zeros((N_LAYERS, N_HEADS)), np.zeros((N_LAYERS, N_HEADS))
    for (l, h), s in hl.items():
        a[l, h] = s
    for (l, h), s in real.items():
        b[l, h] = s
    expected = float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert counts["hl"]["cosine_vs_real"] == pytest.approx(expected)
    spearman_rows = pq.read_table(paths["musique"]["spearman"]).to_pylist()
    assert all(math.isnan(r["rho"]) and r["n"] == 1 and "< 3" in r["reason"] for r in spearman_rows)
    assert paths["cross_task"]["cosine"].is_file()


def test_cosine_matches_numpy_by_hand():
    a = np.array([[0.0, 0.5], [0.25, 1.0]])
    b = np.array([[0.1, 0.0], [0.5, 0.5]])
    by_hand = (0.25 * 0.5 + 1.0 * 0.5) / (math.sqrt(0.25 + 0.0625 + 1.0) * math.sqrt(0.01 + 0.25 + 0.25))
    assert cosine_similarity(a, b) == pytest.approx(by_hand)
    assert cosine_similarity(a, a) == pytest.approx(1.0)
    assert math.isnan(cosine_similarity(a, np.zeros_like(a)))
    with pytest.raises(OverlapError, match="shape"):
        cosine_similarity(a, np.zeros((3, 2)))


def test_spearman_rho_by_hand_and_exact_permutation_p():
    x, y = [0.1, 0.5, 0.3, 0.9, 0.7], [0.2, 0.1, 0.4, 0.8, 0.6]
    got = spearman(x, y)
    # Ranks x: 1 3 2 5 4, y: 2 1 3 5 4 -> sum d^2 = 1 + 4 + 1 = 6 -> rho = 1 - 6*6 / (5*24) = 0.7.
    assert got.rho == pytest.approx(0.7) and got.n == 5
    # p: the share of the 120 re-pairings whose |rho| reaches 0.7, counted from sum d^2.
    ranks = [1, 3, 2, 5, 4]
    hits = sum(abs(1 - 6 * sum((r - q) ** 2 for r, q in zip(ranks, perm)) / 120) >= 0.7 - 1e-9
               for perm in itertools.permutations([2, 1, 3, 5, 4]))
    assert got.p_value == pytest.approx(hits / 120)
    # Ranks x: 1 3 2 4, y: 1 4 2 3 -> sum d^2 = 2 -> rho = 1 - 6*2 / (4*15) = 0.8.
    assert spearman([0.1, 0.4, 0.2, 0.9], [10, 30, 20, 25]).rho == pytest.approx(0.8)


def test_spearman_degenerate_inputs_give_nan_with_reason():
    short = spearman([0.1, 0.2], [0.3, 0.4])
    assert math.isnan(short.rho) and math.isnan(short.p_value) and short.n == 2 and "< 3" in short.reason
    flat = spearman([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])
    assert math.isnan(flat.rho) and flat.reason == "constant x"
    flat_y = spearman([0.1, 0.2, 0.3], [0.4, 0.4, 0.4])
    assert math.isnan(flat_y.rho) and flat_y.reason == "constant y"
    with_nan = spearman([0.1, math.nan, 0.2, 0.3], [1.0, 2.0, 3.0, 4.0])
    assert with_nan.n == 3 and with_nan.rho == pytest.approx(1.0)


def test_head_sets_exclude_zero_scores_and_filter_kind(tmp_path):
    path = tmp_path / "head_scores.parquet"
    write_scores(path, {(0, 1): 0.3, (2, 5): 1e-4, (3, 3): 0.0}, extra_kind="insight")
    scores = read_head_scores(path, "retrieval")
    assert len(scores) == len(ALL_HEADS)
    assert head_set(scores) == {(0, 1), (2, 5)}
    assert len(head_set(read_head_scores(path, "insight"))) == len(ALL_HEADS)
    with pytest.raises(OverlapError, match="no .copy. scores"):
        read_head_scores(path, "copy")


def test_bad_inputs_name_the_path(tmp_path):
    with pytest.raises(OverlapError, match=r"eval/mdqa/hh/own/head_scores.parquet"):
        run_overlap(tmp_path, ["mdqa"], ["hh"], {"mdqa": "retrieval"})
    write_scores(tmp_path / "eval/mdqa/hh/own/head_scores.parquet", {(0, 0): 1.0})
    with pytest.raises(OverlapError, match=r"eval/mdqa/hh/real/predictions.parquet"):
        run_overlap(tmp_path, ["mdqa"], ["hh"], {"mdqa": "retrieval"})
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"layer": [0], "head": [0], "score": [1.0]}), bad)
    with pytest.raises(OverlapError, match=r"bad.parquet: missing column"):
        read_head_scores(bad, "retrieval")


def test_cross_task_cosine_shape_and_values():
    rng = np.random.default_rng(1)
    grids = {t: {v: rng.random((4, 3)) for v in ("real", "hh", "ll")} for t in ("mdqa", "musique", "summhay")}
    del grids["summhay"]["ll"]
    table = cross_task_cosine(grids).to_pylist()
    # 3 task pairs x shared variants: (mdqa, musique) 3, (mdqa, summhay) 2, (musique, summhay) 2.
    assert len(table) == 7
    row = next(r for r in table if (r["task_a"], r["task_b"], r["variant"]) == ("mdqa", "summhay", "real"))
    a, b = grids["mdqa"]["real"].ravel(), grids["summhay"]["real"].ravel()
    assert row["cosine"] == pytest.approx(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_spearman_across_variants_excludes_reference_and_base(tmp_path):
    # Recall vs real rises with F1 across hh < hl < lh < ll; real and base are not points.
    real = {h: 1.0 for h in ALL_HEADS[:10]}
    variants = {"real": (real, 0.9), "base": ({ALL_HEADS[0]: 1.0}, 0.95)}
    for i, v in enumerate(("hh", "hl", "lh", "ll")):
        variants[v] = ({h: 1.0 for h in ALL_HEADS[: 2 * (i + 1)]}, 0.1 * (i + 1))
    for v, (scores, f1) in variants.items():
        write_scores(tmp_path / "eval/mdqa" / v / "own/head_scores.parquet", scores)
        write_predictions(tmp_path / "eval/mdqa" / v / "real/predictions.parquet", [f1])
    paths = run_overlap(tmp_path, ["mdqa"], list(variants), {"mdqa": "retrieval"})
    rows = {r["metric"]: r for r in pq.read_table(paths["mdqa"]["spearman"]).to_pylist()}
    recall = rows["recall_vs_real"]
    assert recall["n"] == 4 and recall["rho"] == pytest.approx(1.0)
    assert sorted(recall["variants"]) == ["hh", "hl", "lh", "ll"]
    # rho = 1 over four points: 2 of the 4! re-pairings reach |rho| = 1.
    assert recall["p_value"] == pytest.approx(2 / 24)


def test_seeded_labels_use_first_real_seed_as_reference(tmp_path):
    real = {h: 1.0 for h in ALL_HEADS[:4]}
    runs = {"real-s0": (real, 0.9), "real-s1": (real, 0.85), "hh-s0": ({ALL_HEADS[0]: 1.0}, 0.3)}
    for v, (scores, f1) in runs.items():
        write_scores(tmp_path / "eval/mdqa" / v / "own/head_scores.parquet", scores)
        write_predictions(tmp_path / "eval/mdqa" / v / "real/predictions.parquet", [f1])
    paths = run_overlap(tmp_path, ["mdqa"], list(runs), {"mdqa": "retrieval"})
    counts = {r["variant"]: r for r in pq.read_table(paths["mdqa"]["counts"]).to_pylist()}
    assert counts["hh-s0"]["recall_vs_real"] == pytest.approx(0.25)
    spearman_rows = pq.read_table(paths["mdqa"]["spearman"]).to_pylist()
    assert all(r["variants"] == ["hh-s0"] for r in spearman_rows)


def test_named_limited_subsets_are_recall_rows_and_spearman_points(tmp_path):
    # The paper's MDQA L1-L3 (Tables 5, 8, 14): three limited subsets, each its own model.
    # H_real = 10 heads; each subset shares a different number of them, plus heads of its own.
    real = {h: 1.0 for h in ALL_HEADS[:10]}
    models = {
        "real": (real, [0.9]),
        "real_limited_l1": ({h: 0.5 for h in ALL_HEADS[:8] + ALL_HEADS[100:102]}, [0.7]),  # 8 shared, |H| 10
        "real_limited_l2": ({h: 0.5 for h in ALL_HEADS[:5] + ALL_HEADS[100:103]}, [0.5]),  # 5 shared, |H| 8
        "real_limited_l3": ({h: 0.5 for h in ALL_HEADS[:2]}, [0.2]),  # 2 shared, |H| 2
        "hh": ({h: 0.5 for h in ALL_HEADS[:4] + ALL_HEADS[200:206]}, [0.4]),  # 4 shared, |H| 10
        "base": ({ALL_HEADS[0]: 1.0}, [0.95]),
    }
    for v, (scores, f1) in models.items():
        write_scores(tmp_path / "eval/mdqa" / v / "own/head_scores.parquet", scores)
        write_predictions(tmp_path / "eval/mdqa" / v / "real/predictions.parquet", f1)
    paths = run_overlap(tmp_path, ["mdqa"], list(models), {"mdqa": "retrieval"})

    cells = {(r["row"], r["column"]): r["recall"] for r in pq.read_table(paths["mdqa"]["recall"]).to_pylist()}
    assert cells["real_limited_l1", "real"] == 8 / 10
    assert cells["real_limited_l2", "real"] == 5 / 10
    assert cells["real_limited_l3", "real"] == 2 / 10
    assert cells["real", "real_limited_l2"] == 5 / 8
    assert cells["real_limited_l1", "real_limited_l2"] == 7 / 8  # 5 real heads + heads 100, 101
    assert cells["real_limited_l2", "real_limited_l3"] == 2 / 2
    assert cells["hh", "real_limited_l1"] == 4 / 10
    counts = {r["variant"]: r for r in pq.read_table(paths["mdqa"]["counts"]).to_pylist()}
    assert [counts[v]["n_heads"] for v in ("real_limited_l1", "real_limited_l2", "real_limited_l3")] == [10, 8, 2]
    rows = {r["metric"]: r for r in pq.read_table(paths["mdqa"]["spearman"]).to_pylist()}
    recall = rows["recall_vs_real"]
    assert recall["variants"] == ["real_limited_l1", "real_limited_l2", "real_limited_l3", "hh"]
    # recall 0.8, 0.5, 0.2, 0.4 against F1 0.7, 0.5, 0.2, 0.4: identical ranks
    # exact permutation p: of the 24 re-pairings only the identity and the reversal reach |rho| = 1
    assert recall["n"] == 4 and recall["rho"] == pytest.approx(1.0) and recall["p_value"] == pytest.approx(2 / 24)
