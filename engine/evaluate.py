"""Sharded greedy evaluation on a Ray actor pool: F1/EM and per-head scores in one pass.

Every evaluation in the study (Zhao, Yin, Durrett, ICML 2025, Sec. 4) decodes greedily; the
same decode yields the answers for F1 and, through `engine.decode`, each head's retrieval
score (Eq. 1) and insight score (Eq. 2). Knockout and patching runs are evaluation jobs with
an intervention.

An evaluation set is cut into shards of `evaluate.shard_size` examples. Actors of the pool
(`engine.pool`) load a model pair once (the evaluated model and, for patching, the source
model) and keep it while they take more shards of the same pair. Each finished shard is
written atomically to `<out_dir>/shards/`; a re-run skips shards whose file exists, so a
crashed driver resumes where it stopped. When every shard of a job is in, they are merged
into `predictions.parquet`, `head_scores.parquet` (per-head means), `head_examples.parquet`
(per-example scores and per-step hit events, for intervals, stability and per-step head sets)
and `summary.json` (with the provenance of the result, `engine.provenance`), and that
directory replaces `out_dir` whole: a job's outputs appear together or not at all.

A job carries the experiment's sections whole: the `model` section (with `path` the local
base checkpoint) and the `evaluate` and `scoring` sections. Each actor places its models as
`engine.placement.resolve_placement` says for `evaluate.gpus_per_actor` (device, `model.dtype`,
`model.attn_implementation`), and every summary records where its result was computed.

Example:
    >>> ref = ModelRef(ModelConfig("mini", "runs/demo/base"), "runs/demo/models/mdqa/real")
    >>> job = EvalJob("mdqa/real/real", ref, "mdqa", "runs/demo/data/mdqa/real/eval.parquet",
    ...               "runs/demo/eval/mdqa/real/real", EvaluateConfig(cpus_per_actor=1))
    >>> run_jobs([job])["mdqa/real/real"]["f1"]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.eval_jobs import (POOL_SETTINGS, EvalError, EvalJob, ModelRef, TaskScorer, check_heads, job_hash,
                              read_examples)
from engine.eval_shards import (EXAMPLE_COLUMNS, PLACEMENT_COLUMNS, PREDICTION_SCHEMA, SHARD_SCHEMA, EvalWorker,
                                LoadedModels, evaluate_shard, load_models, task_scorer)
from engine.head_scores import HeadError, score_table
from engine.pool import PoolStats, WorkItem, run_pool
from engine.provenance import provenance
from engine.store import atomic_dir, read_json, write_json, write_parquet

# The stage's public face: jobs (engine.eval_jobs), shards (engine.eval_shards) and the driver.
__all__ = ["EvalError", "EvalJob", "EvalWorker", "LoadedModels", "ModelRef", "PREDICTION_SCHEMA", "SHARD_SCHEMA",
           "evaluate_shard", "job_hash", "load_models", "read_examples", "run_eval_pool", "run_jobs"]


@dataclass(frozen=True)
class _JobPlan:
    job: EvalJob
    digest: str
    n_examples: int
    shard_paths: tuple[Path, ...]
    torch_threads: int = 1  # each actor's torch threads (its CPUs)


def _shard_path(job: EvalJob, digest: str, start: int, end: int) -> Path:
    return Path(job.out_dir) / "shards" / f"{digest}-{start:06d}-{end:06d}.parquet"


def merge_shards(plan: _JobPlan, keep_shards: bool) -> dict:
    """Merges a job's shards into predictions / head scores / summary; returns the summary."""
    job, out = plan.job, Path(plan.job.out_dir)
    table = pa.concat_tables([pq.read_table(p, schema=SHARD_SCHEMA) for p in plan.shard_paths])
    table = table.sort_by("index")
    index = table.column("index").to_numpy()
    if not np.array_equal(index, np.arange(plan.n_examples)):
        raise EvalError(f"job {job.name}: shards hold rows {index.tolist()[:20]}..., expected 0..{plan.n_examples - 1}")
    summary = {
        "name": job.name,
        "hash": plan.digest,
        "f1": float(np.mean(table.column("f1").to_numpy())),
        "em": float(np.mean(table.column("em").to_numpy())),
        "n": table.num_rows,
        "out_dir": str(out),
        "scoring": {"argmax_over": job.scoring.argmax_over, "count": job.scoring.count,
                    "insight_strict": job.evaluate.insight_strict} if job.scoring is not None else None,
        # where each shard's model sat: one entry unless shards ran on different hardware
        "placement": [dict(zip(PLACEMENT_COLUMNS, p)) for p in
                      sorted(set(zip(*(table.column(c).to_pylist() for c in PLACEMENT_COLUMNS))))],
        "provenance": provenance(actor_torch_threads=plan.torch_threads),  # greedy decoding: no seed
    }
    # The shards stay in the old out_dir until the new one replaces it: a crash before the
    # swap leaves them for the next run to merge again.
    with atomic_dir(out) as tmp:
        write_parquet(table.select(PREDICTION_SCHEMA.names), tmp / "predictions.parquet")
        if job.scoring is not None:
            write_parquet(score_table(_stack(table, "retrieval"), _stack(table, "insight")),
                          tmp / "head_scores.parquet")
            write_parquet(table.select(EXAMPLE_COLUMNS), tmp / "head_examples.parquet")
        write_json(summary, tmp / "summary.json")
        if keep_shards:
            (tmp / "shards").mkdir()
            for path in plan.shard_paths:
                os.replace(path, tmp / "shards" / path.name)
    return summary


def _stack(table: pa.Table, kind: str) -> np.ndarray | None:
    """`[n_examples, n_layers, n_heads]` with NaN rows for unscored examples; None if none scored."""
    values = table.column(kind).to_pylist()
    scored = [i for i, v in enumerate(values) if v is not None]
    if not scored:
        return None
    n_layers, n_heads = table.column("n_layers")[scored[0]].as_py(), table.column("n_heads")[scored[0]].as_py()
    out = np.full((len(values), n_layers, n_heads), np.nan)
    for i in scored:
        out[i] = np.asarray(values[i], dtype=np.float64).reshape(n_layers, n_heads)
    return out


def _finished(job: EvalJob, digest: str) -> dict | None:
    out = Path(job.out_dir)
    path = out / "summary.json"
    if not path.exists() or not (out / "predictions.parquet").exists():
        return None
    summary = read_json(path)
    heads = ("head_scores.parquet", "head_examples.parquet") if job.scoring is not None else ()
    if summary.get("hash") != digest or not all((out / name).exists() for name in heads):
        return None
    return summary


def run_eval_pool(
    jobs: Sequence[EvalJob],
    show_progress: bool = True,
    scorer: TaskScorer | None = None,
) -> tuple[dict[str, dict], PoolStats]:
    """`run_jobs` that also returns the pool's statistics (actors, startup, wall time, retries)."""
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise EvalError(f"job names must be unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
    outs = [str(Path(job.out_dir).resolve()) for job in jobs]
    if len(set(outs)) != len(outs):
        raise EvalError("jobs must write to different out_dirs")
    if scorer is None:
        for task in sorted({job.task for job in jobs}):
            task_scorer(task)  # an unknown task fails here, not on every actor
    for job in jobs:
        check_heads(job)
    pools = {tuple(getattr(job.evaluate, key) for key in POOL_SETTINGS) for job in jobs}
    if len(pools) > 1:
        raise EvalError(f"jobs of one pool must agree on evaluate.{', '.join(POOL_SETTINGS)}; got {sorted(pools)}")
    if not jobs:
        return {}, PoolStats()
    pool = jobs[0].evaluate

    summaries: dict[str, dict] = {}
    plans: dict[str, _JobPlan] = {}
    missing: dict[str, set[Path]] = {}
    items: list[WorkItem] = []
    for job in jobs:
        digest = job_hash(job)
        done = _finished(job, digest)
        if done is not None:
            summaries[job.name] = done
            continue
        rows = read_examples(job.data_path, job.evaluate.limit)
        paths = []
        for start in range(0, len(rows), pool.shard_size):
            end = min(start + pool.shard_size, len(rows))
            path = _shard_path(job, digest, start, end)
            paths.append(path)
            if not path.exists():
                items.append(
                    WorkItem(key=str(path), affinity=job.models_key, payload=(job, start, rows[start:end]),
                             size=end - start)
                )
        plans[job.name] = _JobPlan(job, digest, len(rows), tuple(paths), max(1, int(pool.cpus_per_actor)))
        missing[job.name] = {p for p in paths if not p.exists()}
        if not missing[job.name]:
            summaries[job.name] = merge_shards(plans[job.name], pool.keep_shards)

    def on_result(item: WorkItem, table: pa.Table) -> None:
        job = item.payload[0]
        path = Path(item.key)
        write_parquet(table, path)
        missing[job.name].discard(path)
        if not missing[job.name]:  # merge as soon as a job is complete, not at the end of the stage
            summaries[job.name] = merge_shards(plans[job.name], pool.keep_shards)

    from engine.models import ModelError  # torch: loaded where a pool runs, not where jobs are planned

    stats = run_pool(
        EvalWorker,
        {"torch_threads": max(1, int(pool.cpus_per_actor)), "scorer": scorer},
        items,
        pool,
        on_result,
        fatal=(EvalError, ModelError, HeadError),
        description=f"evaluate {len(plans)} job(s)",
        show_progress=show_progress,
    )
    return {job.name: summaries[job.name] for job in jobs}, stats


def run_jobs(
    jobs: Sequence[EvalJob],
    show_progress: bool = True,
    scorer: TaskScorer | None = None,
) -> dict[str, dict]:
    """Evaluates every job on one actor pool; finished jobs and shards are skipped.

    The pool is the jobs' `evaluate` section: actors, CPUs and GPUs per actor, shard size,
    retries, timeout and whether shards are kept, on which all jobs must agree.

    Args:
        jobs: evaluation jobs with unique names and out_dirs.
        show_progress: rich progress bar with examples per second.
        scorer: a task-like object for every job instead of the task registry (it is
            pickled to the actors).

    Returns:
        job name -> summary `{"f1", "em", "n", "out_dir", ...}`.
    """
    summaries, _ = run_eval_pool(jobs, show_progress=show_progress, scorer=scorer)
    return summaries
