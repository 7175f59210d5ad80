"""engine/pipeline.py end to end on a tiny miniature: every stage through real Ray, resumable,
re-running only what changed, and a driver killed mid-run that resumes to the same results."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.config import load_experiment
from engine.pipeline import plan, run_experiment
from engine.store import RunStore
from tiny import TINY_MINIATURE

ROOT = Path(__file__).parents[2]

EXPERIMENT = """
name: tiny
run_dir: {run_dir}
model: {{name: mini, path: miniature, rope_base: 40000, max_context: 512, dtype: float32}}
""" + TINY_MINIATURE + """
tasks:
  mdqa:
    variants: [real, {limited}hl, base]
    limited_variants:
      real_limited_who: {{question_types: [who]}}
      real_limited_where: {{question_types: [where]}}
    n_train: 10
    n_eval: 6
    target_tokens: 160
train: {{batch_size: 1, grad_accum: 1, lr: 1.0e-3, max_steps: 2, max_length: 200, save_steps: 1}}
evaluate: {{batch_size: 4, shard_size: 4, max_new_tokens: 4}}
knockout: {{ks: [0, 1, 2], seeds: [0, 1]}}
patching: {{seeds: [0]}}
"""


LIMITED = ("real_limited_who", "real_limited_where")


def write_experiment(tmp: Path, run_dir: Path, limited: bool = True) -> Path:
    """The tiny grid; `limited` adds two named limited subsets (MDQA questions by first word)."""
    path = tmp / "tiny.yaml"
    variants = "".join(f"{v}, " for v in LIMITED) if limited else ""
    path.write_text(textwrap.dedent(EXPERIMENT.format(run_dir=run_dir, limited=variants)))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, needlework_cache, ray_cluster):
    tmp = tmp_path_factory.mktemp("pipeline")
    path = write_experiment(tmp, tmp / "run")
    report = run_experiment(load_experiment(path))
    return path, tmp / "run", report


def manifest_times(run_dir: Path) -> dict[str, float]:
    return {k: v["finished"] for k, v in RunStore(run_dir).manifest().items()}


def test_every_stage_writes_its_artifacts(finished_run):
    _, run_dir, report = finished_run
    assert report == run_dir / "report" / "report.md"
    for rel in [
        "config.yaml",
        "data/mdqa/real/train.parquet", "data/mdqa/real/val.parquet", "data/mdqa/real/eval.parquet",
        "data/mdqa/hl/train.parquet",
        "models/mdqa/real/adapter_model.safetensors", "models/mdqa/hl/adapter_model.safetensors",
        "eval/mdqa/real/real/predictions.parquet", "eval/mdqa/hl/own/head_scores.parquet",
        "eval/mdqa/base/real/predictions.parquet",
        "knockout/mdqa/real/knockout.parquet", "patching/mdqa/hl/patching.parquet",
        "overlap/mdqa/recall.parquet", "report/findings.json",
    ]:
        assert (run_dir / rel).exists(), rel
    n_eval = pq.read_table(run_dir / "data/mdqa/real/eval.parquet").num_rows
    preds = pq.read_table(run_dir / "eval/mdqa/hl/real/predictions.parquet")
    assert preds.num_rows == n_eval and len(set(preds.column("id").to_pylist())) == n_eval
    knock = pq.read_table(run_dir / "knockout/mdqa/real/knockout.parquet").to_pylist()
    assert {(r["k"], r["selection"]) for r in knock} >= {(1, "top"), (1, "random"), (2, "top")}
    timings = json.loads((run_dir / "timings.json").read_text())
    stages = ["base_model", "data", "train", "evaluate", "knockout", "patching", "report"]
    assert set(timings) == {*stages, "total", "provenance"}, timings
    assert all(timings[s] >= 0 for s in stages) and all(timings[s] > 0 for s in ("data", "train", "evaluate")), timings
    assert timings["total"] == pytest.approx(sum(timings[s] for s in stages), abs=0.1)
    text = report.read_text()
    for heading in ("Table 1", "Tables 5-10", "Table 4", "Table 2", "Tables 3, 11", "Figure 3", "Findings"):
        assert heading in text


def test_named_limited_variants_flow_into_the_recall_table(finished_run):
    _, run_dir, report = finished_run
    for variant, word in zip(LIMITED, ("who", "where")):
        rows = [r for split in ("train", "val")
                for r in pq.read_table(run_dir / f"data/mdqa/{variant}/{split}.parquet").to_pylist()]
        assert rows and {r["variant"] for r in rows} == {variant}
        assert {json.loads(r["meta"])["question"].split()[0].lower() for r in rows} == {word}
        for rel in (f"models/mdqa/{variant}/adapter_model.safetensors", f"eval/mdqa/{variant}/real/predictions.parquet",
                    f"patching/mdqa/{variant}/patching.parquet"):
            assert (run_dir / rel).exists(), rel
    real = pq.read_table(run_dir / "data/mdqa/real/train.parquet").to_pylist()
    assert len({json.loads(r["meta"])["question"].split()[0].lower() for r in real}) > 2

    def head_set(variant: str) -> set:
        rows = pq.read_table(run_dir / f"eval/mdqa/{variant}/own/head_scores.parquet").to_pylist()
        return {(r["layer"], r["head"]) for r in rows if r["kind"] == "retrieval" and r["score"] > 0}

    labels = ["real", *LIMITED, "hl", "base"]
    sets = {v: head_set(v) for v in labels}
    cells = {(r["row"], r["column"]): r for r in pq.read_table(run_dir / "overlap/mdqa/recall.parquet").to_pylist()}
    assert set(cells) == {(x, y) for x in labels for y in labels}
    for (x, y), cell in cells.items():
        assert (cell["n_row"], cell["n_column"], cell["n_intersection"]) == (len(sets[x]), len(sets[y]),
                                                                              len(sets[x] & sets[y]))
        want = len(sets[x] & sets[y]) / len(sets[y]) if sets[y] else float("nan")
        assert cell["recall"] == pytest.approx(want, nan_ok=True)
    counts = {r["variant"] for r in pq.read_table(run_dir / "overlap/mdqa/counts.parquet").to_pylist()}
    assert counts == set(labels)
    for row in pq.read_table(run_dir / "overlap/mdqa/spearman.parquet").to_pylist():
        assert row["variants"] == [*LIMITED, "hl"]  # every training variant but the reference
    table1 = report.read_text().split("## Head recall")[0]
    assert all(f"| {v} |" in table1 for v in LIMITED)


def copied_run(finished_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the finished run to change without touching the module's run."""
    path, run_dir, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return path, copy


def test_rerun_runs_nothing_and_plan_says_done(finished_run):
    path, run_dir, _ = finished_run
    before = manifest_times(run_dir)
    rows = plan(load_experiment(path))
    assert rows and all(r["done"] for r in rows)
    # plan and run describe the same cells: every recorded output is one row of the plan (the
    # data rows of `base` and `real` are the one real dataset)
    assert {r["key"] for r in rows} == set(before)
    assert sorted({r["stage"] for r in rows}) == ["data", "evaluate:own", "evaluate:real", "knockout", "patching",
                                                   "train"]
    run_experiment(load_experiment(path))
    after = manifest_times(run_dir)
    assert after == before


def test_changing_one_variant_reruns_only_what_depends_on_it(finished_run, tmp_path):
    path, run_dir = copied_run(finished_run, tmp_path)  # the module's run stays as it finished
    before = manifest_times(run_dir)
    adapters = {v: (run_dir / "models/mdqa" / v / "adapter_model.safetensors").read_bytes() for v in ("real", "hl")}
    exp = load_experiment(path, overrides=[f"run_dir={run_dir}", "tasks.mdqa.variant_options.hl.filler=The sky is blue."])
    run_experiment(exp)
    after = manifest_times(run_dir)
    rerun = {k for k in after if after[k] != before.get(k)}
    assert rerun == {"data/mdqa/hl", "train/mdqa/hl", "evaluate/mdqa/hl/real", "evaluate/mdqa/hl/own",
                     "patching/mdqa/hl"}
    # hl was really trained again on its new data (its old adapter was once kept and recorded as new)
    assert (run_dir / "models/mdqa/hl/adapter_model.safetensors").read_bytes() != adapters["hl"]
    assert (run_dir / "models/mdqa/real/adapter_model.safetensors").read_bytes() == adapters["real"]


def test_killed_driver_resumes_to_the_same_results(finished_run, tmp_path):
    path, reference_dir, _ = finished_run
    run_dir = tmp_path / "run"
    exp_path = write_experiment(tmp_path, run_dir, limited=False)  # real and base are what it compares
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "engine.cli", "run", str(exp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    manifest = run_dir / "manifest.json"
    deadline = time.time() + 900  # a hang guard: the loop ends as soon as training is recorded
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and any(k.startswith("train/") for k in RunStore(run_dir).manifest()):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    done_before = set(RunStore(run_dir).manifest())
    assert not any(k.startswith("evaluate/") for k in done_before)
    times = manifest_times(run_dir)
    finished = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    after = manifest_times(run_dir)
    assert all(after[k] == times[k] for k in done_before)  # finished work was skipped
    for rel in ("eval/mdqa/real/real/predictions.parquet", "eval/mdqa/real/own/head_scores.parquet",
                "eval/mdqa/base/real/predictions.parquet", "knockout/mdqa/real/knockout.parquet"):
        got, want = pq.read_table(run_dir / rel), pq.read_table(reference_dir / rel)
        assert got.to_pylist() == want.to_pylist(), rel


# ----------------------------------------------------------------------------- heads, probe


def own_scores(run_dir: Path, variant: str) -> dict:
    rows = pq.read_table(run_dir / f"eval/mdqa/{variant}/own/head_scores.parquet").to_pylist()
    return {(r["layer"], r["head"]): r["score"] for r in rows if r["kind"] == "retrieval"}


def test_heads_cli_exports_compares_and_measures_the_run(finished_run, tmp_path, capsys):
    from engine.cli import main

    _, run_dir, _ = finished_run
    real_dir, hl_dir = run_dir / "eval/mdqa/real/own", run_dir / "eval/mdqa/hl/own"
    # per-example scores average to the stage's head scores
    examples = pq.read_table(real_dir / "head_examples.parquet").to_pylist()
    per_example = np.array([r["retrieval"] for r in examples], dtype=float)
    means = own_scores(run_dir, "real")
    np.testing.assert_allclose(np.nanmean(per_example, axis=0), [means[h] for h in sorted(means)])

    assert main(["heads", "export", str(real_dir), str(tmp_path / "real.json"), "--kind", "retrieval"]) == 0
    (line,) = (tmp_path / "real.json").read_text().splitlines()  # one line, as Retrieval_Head writes it
    exported = json.loads(line)
    assert list(exported) == [f"{l}-{h}" for l, h in sorted(means)]  # layer-major, every head
    assert {k: np.mean(v) for k, v in exported.items()} == pytest.approx(
        {f"{l}-{h}": s for (l, h), s in means.items()})

    assert main(["heads", "compare", str(hl_dir), str(real_dir), "--kind", "retrieval",
                 "--json", str(tmp_path / "cmp.json")]) == 0
    result = json.loads((tmp_path / "cmp.json").read_text())
    cell = next(r for r in pq.read_table(run_dir / "overlap/mdqa/recall.parquet").to_pylist()
                if r["row"] == "hl" and r["column"] == "real")
    # the overlap stage's recall; JSON has no NaN, so an undefined recall (|H_real| = 0) is null
    recall = None if np.isnan(cell["recall"]) else pytest.approx(cell["recall"])
    assert result["recall_b_in_a"] == recall
    assert (result["n_a"], result["n_b"], result["n_intersection"]) == (cell["n_row"], cell["n_column"],
                                                                        cell["n_intersection"])
    assert result["provenance"]["git"]["commit"]
    assert main(["heads", "compare", str(tmp_path / "real.json"), str(real_dir), "--kind", "retrieval"]) == 0
    assert "recall of B's heads in A" in capsys.readouterr().out

    assert main(["heads", "stability", str(run_dir), "--draws", "20"]) == 0
    rows = pq.read_table(run_dir / "overlap/mdqa/stability.parquet").to_pylist()
    full = [r for r in rows if r["variant"] == "real" and r["n_examples"] == r["n_total"]]
    assert full and full[0]["jaccard_mean"] == 1.0 and full[0]["heads_all"] == sum(s > 0 for s in means.values())
    assert (run_dir / "report/figures/stability_mdqa.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["heads", "steps", str(run_dir), "--task", "mdqa"]) == 0
    steps = pq.read_table(run_dir / "overlap/mdqa/steps.parquet").to_pylist()
    for variant in {r["variant"] for r in steps}:
        h_x = sum(s > 0 for s in own_scores(run_dir, variant).values())
        assert {r["heads_all"] for r in steps if r["variant"] == variant} == {h_x}
    assert (run_dir / "report/figures/steps_mdqa.png").is_file()
    assert main(["heads", "show", str(real_dir), "--kind", "retrieval", "--top", "3"]) == 0

    assert main(["heads", "compare", str(tmp_path / "nowhere.json"), str(real_dir)]) == 2
    assert "nowhere.json: no such head-score file" in capsys.readouterr().err


def test_knockout_and_patching_take_heads_from_a_published_list(finished_run, tmp_path):
    path, copy = copied_run(finished_run, tmp_path)
    qrhead = tmp_path / "qr_head.yaml"
    qrhead.write_text('attn_head_set: "0-3,0-1"\nmodel_base_class: "tiny"\n')  # QRHead's format
    exp = load_experiment(path, overrides=[f"run_dir={copy}", f"knockout.heads_from={qrhead}",
                                           f"patching.heads_from={qrhead}", "patching.variants=[hl]"])
    # every upstream stage too: each is a no-op where the copy holds its output for this config
    run_experiment(exp, stages=("data", "train", "evaluate", "knockout", "patching"))
    rows = pq.read_table(copy / "knockout/mdqa/real/knockout.parquet").to_pylist()
    top = {r["k"]: r["heads"] for r in rows if r["selection"] == "top"}
    assert top == {0: [], 1: ["0.3"], 2: ["0.1", "0.3"]}
    assert all(not set(r["heads"]) & set(top[r["k"]]) for r in rows if r["selection"] == "random")
    h_hl = {h for h, s in own_scores(copy, "hl").items() if s > 0}
    listed = {(0, 3), (0, 1)}
    patch = pq.read_table(copy / "patching/mdqa/hl/patching.parquet").to_pylist()
    assert {(r["size_inter"], r["size_compl"]) for r in patch} == {(len(listed & h_hl), len(listed - h_hl))}
    # the file's contents key the stage: the same name with another list is knockout still to run
    assert next(r for r in plan(exp) if r["stage"] == "knockout")["done"]
    qrhead.write_text('attn_head_set: "0-1,0-3"\n')
    assert not next(r for r in plan(exp) if r["stage"] == "knockout")["done"]


def test_probe_ranks_candidates_by_short_tunes(finished_run, tmp_path, capsys):
    from scipy import stats as sp

    from engine.cli import main

    path, copy = copied_run(finished_run, tmp_path)
    assert main(["probe", str(path), f"run_dir={copy}", "--steps", "1"]) == 0
    assert "Spearman rho with the full fine-tunes' F1" in capsys.readouterr().out
    rows = pq.read_table(copy / "probe/probe.parquet").to_pylist()
    candidates = [*LIMITED, "hl"]
    assert sorted(r["variant"] for r in rows) == sorted(candidates) and {r["steps"] for r in rows} == {1}
    real = {h for h, s in own_scores(copy, "real").items() if s > 0}
    for r in rows:
        probe_dir = copy / "probe/eval/mdqa" / r["variant"] / "steps1"
        assert (copy / "probe/models/mdqa" / r["variant"] / "steps1/adapter_model.safetensors").is_file()
        scores = pq.read_table(probe_dir / "head_scores.parquet").to_pylist()
        h_probe = {(s["layer"], s["head"]) for s in scores if s["kind"] == "retrieval" and s["score"] > 0}
        assert r["recall"] == pytest.approx(len(h_probe & real) / len(real) if real else float("nan"), nan_ok=True)
        full = pq.read_table(copy / f"eval/mdqa/{r['variant']}/real/predictions.parquet")["f1"].to_numpy()
        assert r["full_f1"] == pytest.approx(full.mean())
        probe_preds = pq.read_table(probe_dir / "predictions.parquet")
        real_val = pq.read_table(copy / "data/mdqa/real/val.parquet")
        assert probe_preds["id"].to_pylist() == real_val["id"].to_pylist()  # scored on the real validation data
        assert r["steps_fraction"] == pytest.approx(1 / 2)  # the full fine-tune: max_steps 2
    corr = {c["predictor"]: c for c in pq.read_table(copy / "probe/correlation.parquet").to_pylist()}
    assert set(corr) == {"recall", "cosine", "probe_f1"}
    for predictor, c in corr.items():  # pairs with an undefined side (recall with |H_real| = 0) drop out
        assert c["n"] == sum(not (np.isnan(r[predictor]) or np.isnan(r["full_f1"])) for r in rows), predictor
    by_variant = sorted(rows, key=lambda r: r["variant"])
    x, y = [r["probe_f1"] for r in by_variant], [r["full_f1"] for r in by_variant]
    want = sp.spearmanr(x, y).statistic if len(set(x)) > 1 and len(set(y)) > 1 else float("nan")
    assert corr["probe_f1"]["rho"] == pytest.approx(want, nan_ok=True)
    assert json.loads((copy / "probe/probe.json").read_text())["provenance"]["git"]["commit"]
    assert "## Probe: ranking candidate datasets" in write_report_text(copy)
    before = {k: v["finished"] for k, v in RunStore(copy).manifest().items() if k.startswith("probe/")}
    assert len(before) == 6  # three short tunes, three scorings
    assert main(["probe", str(path), f"run_dir={copy}", "--steps", "1"]) == 0
    assert {k: v["finished"] for k, v in RunStore(copy).manifest().items() if k.startswith("probe/")} == before


def write_report_text(run_dir: Path) -> str:
    from engine.report import write_report

    return write_report(run_dir).read_text()
