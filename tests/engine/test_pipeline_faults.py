"""A fault per stage of engine/pipeline.py: the driver is killed as it publishes the stage's
output. Nothing partial may sit under a final name, the manifest must not record the output,
and after the next run the output is whole and no temporary entry is left anywhere.

Each test first runs the stages before its own (skipped when done), then clears its stage's
outputs, so the tests pass in any order; in file order each reuses the previous one's work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.config import STAGES, load_experiment
from engine.pipeline import run_experiment
from engine.store import TEMP_MARK, RunStore

ROOT = Path(__file__).parents[2]
KILLER = Path(__file__).with_name("kill_at_publish.py")
KILLED = 137

# The miniature of test_pipeline.py (the same spec, so the session pretrains it once).
EXPERIMENT = """
name: faults
run_dir: {run_dir}
model: {{name: mini, path: miniature, rope_base: 40000, max_context: 512, dtype: float32}}
miniature: {{n_layers: 1, n_heads: 4, n_kv_heads: 2, hidden: 32, intermediate: 64, context: 64, steps: 3,
            batch_size: 4, warmup_steps: 1, qa_per_task: 3, min_accuracy: 0.0, check_probes: 4, threads: 1,
            on_failed_check: warn}}  # a 3-step base passes no gate: warn and go on
tasks:
  mdqa:
    variants: [real, hl, base]
    n_train: 10
    n_eval: 4
    target_tokens: 160
train: {{batch_size: 1, grad_accum: 1, lr: 1.0e-3, max_steps: 2, max_length: 200, save_steps: 1,
        ray_env: {{RAY_TRAIN_ENABLE_PREEMPTION_WATCHER: "0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: "0.5"}}}}
evaluate: {{batch_size: 4, shard_size: 4, max_new_tokens: 4}}
knockout: {{ks: [0, 1], seeds: [0]}}
patching: {{seeds: [0]}}
"""

# stage: (the output the kill hits, its manifest key, what the stage writes), paths in the run directory
FAULTS = {
    "data": ("data/mdqa/hl", "data/mdqa/hl", ("data",)),
    "train": ("models/mdqa/real", "train/mdqa/real", ("models",)),
    "evaluate": ("eval/mdqa/real/real", "evaluate/mdqa/real/real", ("eval",)),
    "knockout": ("knockout/mdqa/real/knockout.parquet", "knockout/mdqa/real", ("knockout",)),
    "patching": ("patching/mdqa/hl/patching.parquet", "patching/mdqa/hl", ("patching",)),
    "report": ("report", None, ("report", "overlap")),
}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, needlework_cache, ray_cluster) -> Path:
    tmp = tmp_path_factory.mktemp("faults")
    path = tmp / "faults.yaml"
    path.write_text(textwrap.dedent(EXPERIMENT.format(run_dir=tmp / "run")))
    return path


def temporaries(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if TEMP_MARK in p.name)


def reset(store: RunStore, stage: str) -> None:
    """Forgets the stage's outputs and removes them, so that the stage has to run again."""
    for key in [k for k in store.manifest() if k.split("/", 1)[0] == stage]:
        store.forget(key)
    for name in FAULTS[stage][2]:
        shutil.rmtree(store.path(name), ignore_errors=True)


def kill_during(experiment: Path, stage: str, target: Path, ray_address: str) -> subprocess.CompletedProcess:
    """`needlework run --stages STAGE` in a process killed as it publishes `target`. It joins the
    session's Ray cluster (a dead driver's actors and workers go with it) instead of starting one."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_address, "NEEDLEWORK_PROGRESS_INTERVAL": "2"}
    return subprocess.run([sys.executable, str(KILLER), f"*{target}", "run", str(experiment), "--stages", stage],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)  # a hang guard


def complete(stage: str, path: Path) -> bool:
    """Whether `path` holds the stage's whole output (what a reader of it needs)."""
    if stage == "data":
        return {"train.parquet", "val.parquet", "build.json", "stats.json"} <= {p.name for p in path.iterdir()}
    if stage == "train":
        return (path / "done.json").exists() and (path / "adapter_model.safetensors").exists()
    if stage == "evaluate":
        return {"predictions.parquet", "head_scores.parquet", "summary.json"} <= {p.name for p in path.iterdir()}
    if stage in ("knockout", "patching"):
        return pq.read_table(path).num_rows > 0
    return (path / "report.md").exists() and (path / "findings.json").exists()


@pytest.mark.parametrize("stage", list(FAULTS))
def test_a_killed_stage_leaves_nothing_partial_and_the_next_run_nothing_stale(experiment, stage, ray_cluster):
    exp = load_experiment(experiment)
    store = RunStore(exp.resolved_run_dir())
    before = STAGES[: STAGES.index(stage)]
    if before:
        run_experiment(exp, stages=before)
    reset(store, stage)
    target, key, _ = FAULTS[stage]
    final = store.path(target)

    killed = kill_during(experiment, stage, final, ray_cluster.get_runtime_context().gcs_address)
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    assert not final.exists()  # the output was complete under a temporary name, and is not published
    leftovers = [p for p in final.parent.iterdir() if p.name.startswith(f".{final.name}{TEMP_MARK}")]
    assert leftovers, sorted(p.name for p in final.parent.iterdir())
    assert key is None or key not in store.manifest()
    if stage == "train":  # its output is a pipe: the long stage told the log how far it was
        assert any(line.startswith("train: 0/2 done, elapsed ") for line in killed.stdout.splitlines()), killed.stdout

    run_experiment(exp, stages=(stage,))
    assert complete(stage, final)
    assert temporaries(store.root) == []
    if key is not None:
        assert Path(store.manifest()[key]["path"]).exists()
    else:  # the report is rewritten on every run, not recorded
        assert json.loads(store.path("report", "latest.json").read_text())["report"] == str(final / "report.md")
