"""Head-score interop against files written by hand in the published formats: Retrieval_Head /
HeadKV JSON (one line, `{"layer-head": [per-example scores]}`), QRHead's YAML `attn_head_set`
and its detection JSON (`[["layer-head", score], ...]`), Parquet and CSV tables; the comparison
measures against hand computations and scipy."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats as sp

from analyses.interop import InteropError, compare, read_head_scores, top_k_overlap, write_head_scores
from analyses.knockout import KnockoutError, knockout_jobs
from analyses.patching import PatchingError, head_sets
from engine.config import EvaluateConfig, KnockoutConfig, ModelConfig
from engine.evaluate import ModelRef

# 2 layers x 3 heads, as Retrieval_Head writes it: ints 0, floats, per-example lists, and a head
# above 1 (Wu et al.'s code counts repeated steps; HeadKV's Llama-3-8B file has one at 1.009).
RETRIEVAL_HEAD = ('{"0-0": [0, 0, 0], "0-1": [0.5, 0.25, 0], "0-2": [0, 0, 0], '
                  '"1-0": [1.0, 1.5, 0.527], "1-1": [0, 0.1, 0], "1-2": [0, 0, 0]}\n')
QRHEAD_YAML = """# Default configuration for QRRetriever

attn_head_set: "1-2,0-0,1-0" # top3 qr heads
model_base_class: "Llama-3.1-8B-Instruct"
model_name_or_path: "meta-llama/Llama-3.1-8B-Instruct"
"""
QRHEAD_JSON = """[
    ["1-0", 0.75],
    ["0-1", 0.5],
    ["0-0", 0.0],
    ["0-2", -0.125],
    ["1-1", 0.25],
    ["1-2", 0.0]
]"""


def write(path, text):
    path.write_text(text)
    return path


def test_reads_the_retrieval_head_and_headkv_format(tmp_path):
    scores = read_head_scores(write(tmp_path / "Llama.json", RETRIEVAL_HEAD))
    assert scores.format == "retrieval_head" and scores.complete and scores.shape == (2, 3)
    assert not scores.ranked_only
    assert scores.scores[(0, 1)] == pytest.approx(0.25) and scores.scores[(1, 0)] == pytest.approx(3.027 / 3)
    assert scores.scores[(1, 1)] == pytest.approx(0.1 / 3) and scores.scores[(0, 0)] == 0.0
    assert scores.per_example[(1, 0)] == (1.0, 1.5, 0.527)
    assert scores.ranking()[:3] == [(1, 0), (0, 1), (1, 1)]  # then the zeros by (layer, head)
    assert scores.head_set() == {(1, 0), (0, 1), (1, 1)}


def test_reads_qrhead_ranked_lists(tmp_path):
    ranked = read_head_scores(write(tmp_path / "Llama-3.1-8B-Instruct_qr_head.yaml", QRHEAD_YAML))
    assert ranked.ranked_only and not ranked.complete and ranked.format == "qrhead"
    assert ranked.ranking() == [(1, 2), (0, 0), (1, 0)]
    assert ranked.scores == {(1, 2): 1.0, (0, 0): pytest.approx(2 / 3), (1, 0): pytest.approx(1 / 3)}
    assert ranked.head_set() == {(1, 2), (0, 0), (1, 0)}
    detected = read_head_scores(write(tmp_path / "qrhead_scores.json", QRHEAD_JSON))
    assert not detected.ranked_only and detected.complete and detected.per_example is None
    assert detected.ranking() == [(1, 0), (0, 1), (1, 1), (0, 0), (1, 2), (0, 2)]
    assert detected.head_set() == {(1, 0), (0, 1), (1, 1)}  # 0 and the negative score are not in H


def test_reads_tables_with_and_without_kind(tmp_path):
    rows = [{"layer": l, "head": h, "kind": k, "score": s} for (l, h), s in
            {(0, 0): 0.5, (0, 1): 0.0, (1, 0): 0.25, (1, 1): 0.0}.items() for k in ("retrieval", "insight")]
    rows = [dict(r, score=r["score"] if r["kind"] == "retrieval" else 1.0 - r["score"]) for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "scores.parquet")
    retrieval = read_head_scores(tmp_path / "scores.parquet", kind="retrieval")
    assert retrieval.scores == {(0, 0): 0.5, (0, 1): 0.0, (1, 0): 0.25, (1, 1): 0.0} and retrieval.complete
    assert read_head_scores(tmp_path / "scores.parquet", kind="insight").scores[(0, 1)] == 1.0
    with pytest.raises(InteropError, match=r"scores.parquet: holds kinds \['insight', 'retrieval'\]; say which"):
        read_head_scores(tmp_path / "scores.parquet")
    write(tmp_path / "theirs.csv", "layer,head,score\n0,0,0.5\n0,1,0\n1,0,0.25\n1,1,0\n")
    assert read_head_scores(tmp_path / "theirs.csv").scores == retrieval.scores


@pytest.mark.parametrize("name, text, message", [
    ("bad.json", '{"0-0": [1], "0:1": [0]}', r"bad.json: key '0:1': '0:1' is not a head"),
    ("bad.json", '{"0-0": [1], "0-0 ": [0]}', r"bad.json: head 0-0 listed twice"),
    ("bad.json", '{"0-0": ["high"]}', r"bad.json: key '0-0': expected a list of numbers"),
    ("bad.json", '{"0-0": [1]', r"bad.json: not valid JSON"),
    ("bad.yaml", "attn_head_set: full_heads\n", r"bad.yaml: attn_head_set is 'full_heads'"),
    ("bad.yaml", "heads: [1-2]\n", r"bad.yaml: expected QRHead's 'attn_head_set"),
    ("bad.yaml", 'attn_head_set: "1-2,x-3"\n', r"bad.yaml: entry 1: 'x-3' is not a head"),
    ("bad.csv", "layer,score\n0,1\n", r"bad.csv: missing column\(s\) \['head'\]"),
    ("bad.txt", "0-0 1", r"bad.txt: unknown head-score format '.txt'"),
])
def test_malformed_files_name_the_file_and_entry(tmp_path, name, text, message):
    with pytest.raises(InteropError, match=message):
        read_head_scores(write(tmp_path / name, text))


def test_export_writes_the_published_json_format(tmp_path):
    """Our head_scores.parquet + head_examples.parquet -> one line of Retrieval_Head JSON, which
    HeadKV's loader (the values in file order, averaged) turns into the layer-major score vector."""
    per_example = np.array([[[0.0, 0.5], [1.0, 0.0]], [[0.0, 0.25], [0.5, 0.0]], [[np.nan] * 2] * 2])
    mean = np.nanmean(per_example, axis=0)
    own = tmp_path / "eval" / "own"
    own.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"layer": l, "head": h, "kind": "retrieval", "score": float(mean[l, h]),
                                          "n_examples": 2} for l in range(2) for h in range(2)]),
                   own / "head_scores.parquet")
    pq.write_table(pa.Table.from_pylist([{"index": i, "id": str(i), "n_layers": 2, "n_heads": 2,
                                          "retrieval": per_example[i].ravel().tolist(), "insight": None,
                                          "n_steps": 0, "retrieval_hits": [], "insight_hits": None}
                                         for i in range(3)]), own / "head_examples.parquet")
    path = write_head_scores(read_head_scores(own, kind="retrieval"), tmp_path / "ours.json")
    text = path.read_text()
    # the third example had no located answer span: it counts for no head, as in Retrieval_Head
    assert text == '{"0-0": [0, 0], "0-1": [0.5, 0.25], "1-0": [1.0, 0.5], "1-1": [0, 0]}\n'
    with path.open() as f:
        head_list = json.loads(f.readline())  # exactly how HeadKV reads a head-score file
    np.testing.assert_allclose([np.mean(v) for v in head_list.values()], mean.ravel())
    back = read_head_scores(path)
    assert back.scores == pytest.approx(dict(read_head_scores(own, kind="retrieval").scores))


def test_export_to_qrhead_yaml_and_tables_round_trips(tmp_path):
    theirs = read_head_scores(write(tmp_path / "Llama.json", RETRIEVAL_HEAD))
    yaml_path = write_head_scores(theirs, tmp_path / "top.yaml", top=2)
    assert 'attn_head_set: "1-0,0-1"' in yaml_path.read_text()
    assert read_head_scores(yaml_path).ranking() == [(1, 0), (0, 1)]
    for suffix in (".parquet", ".csv"):
        table = read_head_scores(write_head_scores(theirs, tmp_path / f"t{suffix}"), kind="retrieval")
        assert table.scores == pytest.approx(dict(theirs.scores)) and table.complete


def test_compare_against_hand_computation(tmp_path):
    a = read_head_scores(write(tmp_path / "a.json", RETRIEVAL_HEAD))
    b = read_head_scores(write(tmp_path / "b.json", QRHEAD_JSON))
    result = compare(a, b, top_k=(1, 2, 3, 4))
    # H_A = {1-0, 0-1, 1-1}; H_B = {1-0, 0-1, 1-1}
    assert (result["n_a"], result["n_b"], result["n_intersection"]) == (3, 3, 3)
    assert result["recall_b_in_a"] == result["recall_a_in_b"] == result["jaccard"] == 1.0
    grid_a = np.array([[0, 0.25, 0], [3.027 / 3, 0.1 / 3, 0]])
    grid_b = np.array([[0, 0.5, -0.125], [0.75, 0.25, 0]])
    assert result["cosine"] == pytest.approx(float((grid_a * grid_b).sum() / np.linalg.norm(grid_a) /
                                                   np.linalg.norm(grid_b)))
    assert result["spearman_rho"] == pytest.approx(sp.spearmanr(grid_a.ravel(), grid_b.ravel()).statistic)
    assert result["spearman_n"] == 6 and 0 < result["spearman_p"] <= 1
    # top-1: 1-0 both; top-2: {1-0, 0-1} both; top-3 both {.., 1-1}; top-4: A has only 3 heads in H
    assert [result["top_k"][k] for k in (1, 2, 3)] == [1.0, 1.0, 1.0] and math.isnan(result["top_k"][4])
    ranked = read_head_scores(write(tmp_path / "q.yaml", QRHEAD_YAML))
    vs_list = compare(a, ranked, top_k=(1, 3))
    assert vs_list["cosine"] is None  # a ranked list has no scores
    assert vs_list["n_intersection"] == 1 and vs_list["recall_b_in_a"] == pytest.approx(1 / 3)
    assert vs_list["recall_a_in_b"] == pytest.approx(1 / 3) and vs_list["jaccard"] == pytest.approx(1 / 5)
    assert top_k_overlap(a, ranked, 1) == 0.0 and top_k_overlap(a, ranked, 3) == pytest.approx(1 / 3)


def test_compare_refuses_files_of_different_models(tmp_path):
    a = read_head_scores(write(tmp_path / "a.json", RETRIEVAL_HEAD))
    other = read_head_scores(write(tmp_path / "big.json", json.dumps({f"{l}-{h}": [0.1] for l in range(3)
                                                                       for h in range(3)})))
    with pytest.raises(InteropError, match="lists 2 layers x 3 heads, .*big.json 3 x 3: not the same model"):
        compare(a, other)
    outside = read_head_scores(write(tmp_path / "out.yaml", 'attn_head_set: "5-0"\n'))
    with pytest.raises(InteropError, match="out.yaml names head 5-0, outside the 2 x 3 heads"):
        compare(a, outside)


@pytest.fixture
def own_scores(tmp_path):
    """A 2 x 4 model's own scores: best heads 1-3, 0-0."""
    scores = {(0, 0): 0.5, (1, 3): 0.9, (0, 2): 0.1}
    rows = [{"layer": l, "head": h, "kind": "retrieval", "score": scores.get((l, h), 0.0), "n_examples": 3}
            for l in range(2) for h in range(4)]
    path = tmp_path / "own.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_knockout_ranks_by_an_external_file(tmp_path, own_scores):
    qrhead = write(tmp_path / "qr.yaml", 'attn_head_set: "0-3,1-1,0-0"\n')
    kw = dict(model=ModelRef(ModelConfig("m", "base")), task="mdqa", head_scores=own_scores, kind="retrieval",
              data_path="d.parquet", out_dir=str(tmp_path / "ko"), evaluate=EvaluateConfig())

    def sweep(ks, heads_from=None):
        return KnockoutConfig(ks=ks, seeds=(0, 1), heads_from=heads_from)

    runs = knockout_jobs(knockout=sweep((0, 1, 2, 3), str(qrhead)), **kw)
    top = {r.k: r.heads for r in runs if r.selection == "top"}
    assert top == {0: (), 1: ((0, 3),), 2: ((0, 3), (1, 1)), 3: ((0, 0), (0, 3), (1, 1))}
    for r in runs:
        if r.selection == "random":
            assert len(r.heads) == r.k and not set(r.heads) & set(top[r.k])  # drawn outside the file's top k
            assert r.job.knockout == r.heads
    own = {r.k: r.heads for r in knockout_jobs(knockout=sweep((0, 2)), **kw) if r.selection == "top"}
    assert own[2] == ((0, 0), (1, 3))  # without the file: the model's own ranking
    with pytest.raises(KnockoutError, match=r"ks \[0, 4\] must lie in \[0, 3\] \(heads ranked in .*qr.yaml\)"):
        knockout_jobs(knockout=sweep((0, 4), str(qrhead)), **kw)
    alien = write(tmp_path / "alien.yaml", 'attn_head_set: "0-3,7-1"\n')
    with pytest.raises(KnockoutError, match="alien.yaml: head 7-1 is not a head of the model"):
        knockout_jobs(knockout=sweep((1,), str(alien)), **kw)


def test_patching_takes_h_real_from_an_external_file(tmp_path, own_scores):
    qrhead = write(tmp_path / "qr.yaml", 'attn_head_set: "0-3,1-3"\n')
    sets = head_sets(own_scores, own_scores, "retrieval", heads_from=str(qrhead))
    assert sets.real == {(0, 3), (1, 3)} and sets.target == {(0, 0), (1, 3), (0, 2)}
    assert sets.inter == ((1, 3),) and sets.compl == ((0, 3),) and sets.n == 1
    with pytest.raises(PatchingError, match="bad.yaml: head 2-0 is not a head of the model"):
        head_sets(own_scores, own_scores, "retrieval", heads_from=str(write(tmp_path / "bad.yaml",
                                                                              'attn_head_set: "2-0"\n')))
