"""`needlework probe`: rank candidate synthetic datasets by short tunes before full fine-tunes.

Source: the use the paper proposes for head recall (Zhao, Yin, Durrett, ICML 2025, Sec. 6):
synthetic data whose fine-tuned model finds the real model's retrieval heads extends context
better. The probe makes that a selection tool. For each task and each candidate dataset (every
fine-tuned variant of the experiment except the reference, `real`), and for each step budget b,
a LoRA tune of b optimizer steps (otherwise the experiment's train settings) is scored on the
real task's validation data; its heads H_probe are compared with the fully fine-tuned real-data
model's heads on the same data (`eval/<task>/real/own`, which the probe runs first if the run
directory lacks it). Candidates are ranked by recall |H_probe ∩ H_real| / |H_real| and by
cosine of the score grids; the probe model's own F1 on that validation data is a third
predictor, the baseline the heads must beat. Where the run directory holds full fine-tunes of
the candidates, the probe reports Spearman's rho of each predictor with their real-task F1
across candidates, per budget: how well, and from how few steps, the probe predicts.

Example:
    >>> from engine.config import load_experiment
    >>> run_probe(load_experiment("experiments/demo.yaml"), budgets=(4, 16))
    PosixPath('runs/demo/probe/probe.parquet')

Outputs under `<run_dir>/probe/`: `models/<task>/<label>/steps<b>/` (adapters),
`eval/<task>/<label>/steps<b>/` (scored evaluations), `probe.parquet` (task, steps, variant,
recall, cosine, n_heads, n_real_heads, probe_f1, full_f1, steps_fraction), `correlation.parquet`
(task, steps, predictor, rho, p_value, ci_low, ci_high, n, note) and `probe.json` (the budgets,
candidates and provenance).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from scipy import stats as sp

from analyses.overlap import cosine_similarity, head_recall, head_set, read_head_scores, score_grid
from engine import config as cfg
from engine import layout
from engine import pipeline as pl
from engine.evaluate import run_jobs
from engine.provenance import provenance
from engine.stats import Interval, RankCorrelation, bootstrap_interval, spearman_permutation
from engine.store import RunStore, read_parquet, write_json, write_parquet

REFERENCE = "real"
PREDICTORS = ("recall", "cosine", "probe_f1")
PROBE_SCHEMA = pa.schema([("task", pa.string()), ("steps", pa.int64()), ("variant", pa.string()),
                          ("recall", pa.float64()), ("cosine", pa.float64()), ("n_heads", pa.int64()),
                          ("n_real_heads", pa.int64()), ("probe_f1", pa.float64()), ("full_f1", pa.float64()),
                          ("steps_fraction", pa.float64())])
CORRELATION_SCHEMA = pa.schema([("task", pa.string()), ("steps", pa.int64()), ("predictor", pa.string()),
                                ("rho", pa.float64()), ("p_value", pa.float64()), ("ci_low", pa.float64()),
                                ("ci_high", pa.float64()), ("n", pa.int64()), ("note", pa.string())])


class ProbeError(ValueError):
    """A probe that cannot run as asked (no candidates, bad budgets, unknown variants)."""


@dataclasses.dataclass(frozen=True)
class ProbeRun:
    """One short tune: a candidate run of the grid at a step budget."""

    run: cfg.Run
    steps: int

    @property
    def key(self) -> str:
        return f"{self.run.task}/{self.run.label}/steps{self.steps}"


def candidates(experiment: cfg.Experiment, variants: Sequence[str] | None = None,
               tasks: Sequence[str] | None = None) -> list[cfg.Run]:
    """The grid's fine-tuned runs other than the reference, optionally only some variants or tasks."""
    runs = [r for r in cfg.expand(experiment) if r.fine_tuned and r.variant != REFERENCE]
    known_tasks = {t.name for t in experiment.tasks}
    for task in tasks or ():
        if task not in known_tasks:
            raise ProbeError(f"--tasks: {task!r} is not a task of {experiment.name} ({', '.join(sorted(known_tasks))})")
    if variants is not None:
        known = {r.variant for r in runs}
        unknown = [v for v in variants if v not in known]
        if unknown:
            raise ProbeError(f"--variants: {unknown[0]!r} is not a candidate of {experiment.name} "
                             f"(fine-tuned, not {REFERENCE}: {', '.join(sorted(known))})")
        runs = [r for r in runs if r.variant in variants]
    if tasks is not None:
        runs = [r for r in runs if r.task in tasks]
    if not runs:
        raise ProbeError(f"{experiment.name}: no candidate datasets to probe")
    return runs


def full_steps(experiment: cfg.Experiment, store: RunStore, run: cfg.Run) -> int | None:
    """Optimizer steps of the full fine-tune of `run` (max_steps, or epochs over its training data)."""
    train = cfg.train_config(experiment, run)
    if train.max_steps > 0:
        return train.max_steps
    path = layout.data(store.root, run.task, run.variant) / "train.parquet"
    if not path.is_file():
        return None
    rows = read_parquet(path).num_rows
    per_step = train.batch_size * train.grad_accum * train.num_workers
    return max(1, math.ceil(train.epochs * rows / per_step))


def probe_hash(experiment: cfg.Experiment, probe: ProbeRun) -> str:
    return cfg.content_hash("probe", cfg.train_hash(experiment, probe.run), probe.steps)


def probe_eval_hash(experiment: cfg.Experiment, probe: ProbeRun) -> str:
    real = cfg.Run(probe.run.task, REFERENCE, 0)
    return cfg.content_hash("probe-eval", probe_hash(experiment, probe), cfg.data_hash(experiment, real),
                            dataclasses.replace(experiment.evaluate, num_actors=None), experiment.scoring)


def run_probe(experiment: cfg.Experiment, budgets: Sequence[int], variants: Sequence[str] | None = None,
              tasks: Sequence[str] | None = None) -> Path:
    """Builds what is missing, runs every short tune and its scoring, and writes the probe tables.

    Args:
        experiment: the experiment whose candidate datasets are probed.
        budgets: optimizer steps of each short tune (every candidate is tuned once per budget).
        variants: candidate variants (default: every fine-tuned variant but `real`).
        tasks: tasks (default: all of the experiment's).

    Returns:
        The path of `probe/probe.parquet`.
    """
    from engine.train import train_all

    budgets = sorted({int(b) for b in budgets})
    if not budgets or budgets[0] < 1:
        raise ProbeError(f"--steps: budgets must be positive step counts, got {list(budgets)}")
    runs = candidates(experiment, variants, tasks)
    store = RunStore(experiment.resolved_run_dir())
    store.save_config(cfg.to_dict(experiment), experiment.name)
    base_model = pl.base_model_path(experiment)
    pl.init_ray()
    references = [r for r in cfg.expand(experiment) if r.variant == REFERENCE and r.task in {c.task for c in runs}]
    references = [next(r for r in references if r.task == t) for t in sorted({r.task for r in references})]
    missing = sorted({c.task for c in runs} - {r.task for r in references})
    if missing:
        raise ProbeError(f"{experiment.name}: tasks {missing} have no {REFERENCE!r} variant to compare heads with")
    pl.build_data(experiment, store, [*references, *runs], base_model)
    # the fully fine-tuned real-data model's heads on the real validation data: eval/<task>/real/own
    pl.train_models(experiment, store, references, base_model)
    pl.evaluate_models(experiment, store, references, base_model)

    probes = [ProbeRun(run, b) for run in runs for b in budgets]
    specs, trained = [], []
    for p in probes:
        key, digest = f"probe/train/{p.key}", probe_hash(experiment, p)
        if not store.is_done(key, digest):
            out = layout.probe_model(store.root, p.run.task, p.run.label, p.steps)
            specs.append(pl.train_spec(experiment, store, p.run, base_model, name=f"probe/{p.key}", out_dir=out,
                                       max_steps=p.steps, save_steps=p.steps))
            trained.append((key, digest, out))
    if specs:
        pl.console.print(f"[bold]probe[/] {len(specs)} short tune(s) of {budgets} steps")
        train_all(specs, max_concurrent=experiment.train.max_concurrent)
        for key, digest, out in trained:
            store.mark_done(key, digest, out)

    jobs, scored = [], []
    for p in probes:
        key, digest = f"probe/eval/{p.key}", probe_eval_hash(experiment, p)
        if store.is_done(key, digest):
            continue
        ref = dataclasses.replace(pl.model_ref(experiment, store, p.run, base_model),
                                  adapter_dir=str(layout.probe_model(store.root, p.run.task, p.run.label, p.steps)))
        out = layout.probe_evaluation(store.root, p.run.task, p.run.label, p.steps)
        jobs.append(pl.eval_job(experiment, f"probe/{p.key}", ref, p.run.task,
                                layout.data(store.root, p.run.task, REFERENCE) / "val.parquet", out))
        scored.append((key, digest, out))
    if jobs:
        pl.console.print(f"[bold]probe[/] scoring {len(jobs)} short tune(s) on the real validation data")
        run_jobs(jobs)
        for key, digest, out in scored:
            store.mark_done(key, digest, out)

    kinds = {t.name: pl.head_kind(experiment, t.name) for t in experiment.tasks}
    fractions = {(r.task, r.label): full_steps(experiment, store, r) for r in runs}
    table = probe_table(store.root, [(p.run.task, p.run.label, p.steps) for p in probes], kinds, fractions,
                        {r.task: r.label for r in references})
    path = write_parquet(table, layout.probe(store.root) / "probe.parquet")
    write_parquet(correlation_table(table.to_pylist()), layout.probe(store.root) / "correlation.parquet")
    write_json({"budgets": budgets, "candidates": sorted({f"{r.task}/{r.label}" for r in runs}),
                "provenance": provenance(seeds={"experiment": list(experiment.seeds), "bootstrap": 0})},
               layout.probe(store.root) / "probe.json")
    return path


def probe_table(run_dir: Path, probes: Sequence[tuple[str, str, int]], kinds: Mapping[str, str],
                full: Mapping[tuple[str, str], int | None] | None = None,
                references: Mapping[str, str] | None = None) -> pa.Table:
    """One row per (task, candidate, budget): its heads against the real model's, both scored
    on the real task's validation data, and the F1 of the probe and of the full fine-tune.

    Args:
        run_dir: the run directory.
        probes: (task, candidate label, budget) of each finished short tune.
        kinds: the head-score kind of each task.
        full: optimizer steps of each candidate's full fine-tune, for `steps_fraction`.
        references: the real-data model's label per task (default "real").
    """
    from analyses.overlap import mean_f1

    run_dir = Path(run_dir)
    rows = []
    for task, label, steps in probes:
        kind = kinds[task]
        reference = (references or {}).get(task, REFERENCE)
        real = read_head_scores(layout.head_scores(run_dir, task, reference), kind)
        probe_dir = layout.probe_evaluation(run_dir, task, label, steps)
        probe = read_head_scores(probe_dir / "head_scores.parquet", kind)
        shape = (1 + max(h[0] for h in real), 1 + max(h[1] for h in real))
        h_real, h_probe = head_set(real), head_set(probe)
        full_preds = layout.predictions(run_dir, task, label)
        total = (full or {}).get((task, label))
        rows.append({"task": task, "steps": steps, "variant": label, "recall": head_recall(h_probe, h_real),
                     "cosine": cosine_similarity(score_grid(probe, shape), score_grid(real, shape)),
                     "n_heads": len(h_probe), "n_real_heads": len(h_real),
                     "probe_f1": mean_f1(probe_dir / "predictions.parquet")[0],
                     "full_f1": mean_f1(full_preds)[0] if full_preds.is_file() else math.nan,
                     "steps_fraction": steps / total if total else math.nan})
    return pa.Table.from_pylist(rows, schema=PROBE_SCHEMA)


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> tuple[RankCorrelation, Interval]:
    """Spearman's rho of x with y, its permutation p-value, and a 95% percentile bootstrap interval
    over the candidates (pairs resampled; a resample whose x or y is constant has no rank order
    and counts as rho = 0)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    rank = spearman_permutation(x, y)
    if math.isnan(rank.rho):
        return rank, Interval(math.nan, math.nan, math.nan, rank.n)

    def rho(index, axis=-1):
        index = np.asarray(index, dtype=np.int64)  # [..., n]: resamples along the leading axes
        a, b = sp.rankdata(x[index], axis=-1), sp.rankdata(y[index], axis=-1)
        a, b = a - a.mean(axis=-1, keepdims=True), b - b.mean(axis=-1, keepdims=True)
        norm = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
        # Spearman's rho is Pearson's r of the ranks; a constant side has no order: 0
        return np.divide((a * b).sum(axis=-1), norm, out=np.zeros(norm.shape), where=norm > 0)

    # percentile: with a handful of candidates the jackknife behind BCa is too coarse to use
    iv = bootstrap_interval((np.arange(len(x)),), rho, methods=("percentile",), vectorized=True)
    return rank, Interval(rank.rho, iv.low, iv.high, rank.n)


def correlation_table(rows: Sequence[dict]) -> pa.Table:
    """Per task and budget, each predictor's rank correlation with the full fine-tunes' F1."""
    out = []
    for task, steps in sorted({(r["task"], r["steps"]) for r in rows}):
        group = [r for r in rows if r["task"] == task and r["steps"] == steps]
        full = [r["full_f1"] for r in group]
        for predictor in PREDICTORS:
            if all(math.isnan(f) for f in full):
                rank, iv, note = RankCorrelation(math.nan, math.nan, 0), None, "no full fine-tunes of the candidates"
            else:
                rank, iv = rank_correlation([r[predictor] for r in group], full)
                note = "" if not math.isnan(rank.rho) else f"undefined (n={rank.n}, or a constant side)"
            out.append({"task": task, "steps": steps, "predictor": predictor, "rho": rank.rho,
                        "p_value": rank.p_value, "ci_low": iv.low if iv else math.nan,
                        "ci_high": iv.high if iv else math.nan, "n": rank.n, "note": note})
    return pa.Table.from_pylist(out, schema=CORRELATION_SCHEMA)
