"""engine/pipeline.py end to end on a tiny miniature: every stage through real Ray, resumable,
re-running only what changed, and a driver killed mid-run that resumes to the same results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.config import load_experiment
from engine.pipeline import plan, run_experiment
from engine.store import RunStore

ROOT = Path(__file__).parents[2]

EXPERIMENT = """
name: tiny
run_dir: {run_dir}
model: {{name: mini, path: miniature, rope_base: 40000, max_context: 512, dtype: float32}}
miniature: {{n_layers: 1, n_heads: 4, n_kv_heads: 2, hidden: 32, intermediate: 64, context: 64, steps: 3,
            batch_size: 4, warmup_steps: 1, qa_per_task: 3, min_accuracy: 0.0, check_probes: 4, threads: 1}}
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
def cache_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("NEEDLEWORK_CACHE")
    os.environ["NEEDLEWORK_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("NEEDLEWORK_CACHE", None)
    else:
        os.environ["NEEDLEWORK_CACHE"] = old


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_env, ray_cluster):
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


def test_rerun_runs_nothing_and_plan_says_done(finished_run):
    path, run_dir, _ = finished_run
    before = manifest_times(run_dir)
    rows = plan(load_experiment(path))
    assert rows and all(r["done"] for r in rows)
    run_experiment(load_experiment(path))
    after = manifest_times(run_dir)
    assert after == before


def test_changing_one_variant_reruns_only_what_depends_on_it(finished_run):
    path, run_dir, _ = finished_run
    before = manifest_times(run_dir)
    exp = load_experiment(path, overrides=["tasks.mdqa.variant_options.hl.filler=The sky is blue."])
    run_experiment(exp)
    after = manifest_times(run_dir)
    rerun = {k for k in after if after[k] != before.get(k)}
    assert rerun == {"data/mdqa/hl", "train/mdqa/hl", "evaluate/mdqa/hl/real", "evaluate/mdqa/hl/own",
                     "patching/mdqa/hl"}


def test_killed_driver_resumes_to_the_same_results(finished_run, tmp_path):
    path, reference_dir, _ = finished_run
    run_dir = tmp_path / "run"
    exp_path = write_experiment(tmp_path, run_dir, limited=False)  # real and base are what it compares
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "engine.cli", "run", str(exp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    manifest = run_dir / "manifest.json"
    deadline = time.time() + 300
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
    # (the reference's hl variant was changed by the test above; real and base were not)
    for rel in ("eval/mdqa/real/real/predictions.parquet", "eval/mdqa/real/own/head_scores.parquet",
                "eval/mdqa/base/real/predictions.parquet", "knockout/mdqa/real/knockout.parquet"):
        got, want = pq.read_table(run_dir / rel), pq.read_table(reference_dir / rel)
        assert got.to_pylist() == want.to_pylist(), rel
