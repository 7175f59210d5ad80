"""Reading run-directory artifacts for the report and the findings.

Every reader returns None (or NaN) for an artifact that does not exist, so a report section
can say "not run", and raises `ReportError` naming the file for one it cannot read.

Example:
    >>> f1(Path("runs/demo"), "mdqa", "real")       # mean F1 on the real evaluation set
    0.42
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from engine import layout
from engine.config import label_variant, variant_kind
from tasks import TASKS, VARIANT_ORDER, head_kind

TASK_ORDER = tuple(TASKS)  # the paper's three tasks in its order, then the registry's others
SYNTHETIC = ("hh", "hl", "lh", "ll", "symbolic")
PATCH_SETS = ("none", "inter", "compl", "random")
NOT_RUN = "_not run_"
REQUIRED_COLUMNS = {
    "predictions.parquet": ("f1",),
    "head_scores.parquet": ("layer", "head", "kind", "score"),
    "knockout.parquet": ("k", "selection", "f1"),
    "patching.parquet": ("set", "n_heads", "f1", "gain"),
    "counts.parquet": ("variant", "kind", "n_heads", "recall_vs_real", "cosine_vs_real", "f1"),
    "recall.parquet": ("row", "column", "recall"),
    "spearman.parquet": ("metric", "rho", "p_value", "n", "reason", "variants"),
    "cross_task_cosine.parquet": ("task_a", "task_b", "variant", "cosine"),
    "intervals.parquet": ("variant", "metric", "estimate", "ci_low", "ci_high", "n"),
    "head_intervals.parquet": ("variant", "kind", "layer", "head", "score", "ci_low", "ci_high", "n"),
    "stability.parquet": ("variant", "n_examples", "n_total", "jaccard_mean", "jaccard_low", "jaccard_high",
                          "heads_all", "draws", "threshold"),
    "steps.parquet": ("variant", "step", "n_examples", "n_heads", "heads_all", "coverage", "example_coverage"),
    "probe.parquet": ("task", "steps", "variant", "recall", "cosine", "probe_f1", "full_f1"),
    "correlation.parquet": ("task", "steps", "predictor", "rho", "p_value", "ci_low", "ci_high", "n"),
}


class ReportError(ValueError):
    """An artifact the report cannot read."""


def knockout_summary(rows: list[dict]) -> list[dict]:
    """Per k > 0 with a top-k row: top-k F1 and the random seeds' mean and std (NaN if none)."""
    out = []
    for k in sorted({int(r["k"]) for r in rows if int(r["k"]) > 0}):
        top = [r["f1"] for r in rows if int(r["k"]) == k and r["selection"] == "top"]
        rand = [r["f1"] for r in rows if int(r["k"]) == k and r["selection"] == "random"]
        if top:
            std = float(np.std(rand, ddof=1)) if len(rand) > 1 else 0.0 if rand else math.nan
            out.append(
                {
                    "k": k,
                    "top": float(np.mean(top)),
                    "random_mean": float(np.mean(rand)) if rand else math.nan,
                    "random_std": std,
                    "n_seeds": len(rand),
                }
            )
    return out


def unmasked_f1(run: Path, task: str, variant: str, rows: list[dict] | None) -> float:
    # A k = 0 row is the same evaluation pass as the masked ones; the stage-level F1 is the fallback.
    zero = [r["f1"] for r in rows or [] if int(r["k"]) == 0]
    return float(np.mean(zero)) if zero else f1(run, task, variant)


def patching_summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{set: {"f1", "gain", "n_heads"}} averaged over seeds."""
    out = {}
    for name in PATCH_SETS:
        sel = [r for r in rows if r["set"] == name]
        if sel:
            out[name] = {key: float(np.mean([as_float(r[key]) for r in sel])) for key in ("f1", "gain", "n_heads")}
    return out


def task_grids(run: Path, task: str) -> tuple[str, dict[str, np.ndarray]]:
    counts = read(layout.overlap(run, task) / "counts.parquet") or []
    kind = counts[0]["kind"] if counts else head_kind(task)
    tables = {v: read(layout.head_scores(run, task, v)) for v in variants(run, [task])}
    tables = {v: [r for r in t if r["kind"] == kind] for v, t in tables.items() if t}
    tables = {v: t for v, t in tables.items() if t}
    if not tables:
        return kind, {}
    rows = [r for t in tables.values() for r in t]
    shape = (1 + max(r["layer"] for r in rows), 1 + max(r["head"] for r in rows))
    grids = {}
    for v, t in tables.items():
        grids[v] = np.zeros(shape)
        for r in t:
            grids[v][r["layer"], r["head"]] = r["score"]
    return kind, grids


def example_f1(run: Path, task: str, variant: str) -> dict[str, float] | None:
    """F1 per example id of `variant` on the real task's evaluation set (every model is
    evaluated on the same set, so two of these pair by id)."""
    rows = read(layout.predictions(run, task, variant))
    return None if rows is None else {r["id"]: float(r["f1"]) for r in rows}


def paired(*by_id: dict[str, float]) -> list[np.ndarray]:
    """Values of the ids all mappings share, in one id order: one array per mapping."""
    common = sorted(set.intersection(*(set(m) for m in by_id)))
    return [np.asarray([m[i] for i in common], dtype=float) for m in by_id]


def f1(run: Path, task: str, variant: str) -> float:
    rows = read(layout.predictions(run, task, variant))
    return float(np.mean([r["f1"] for r in rows])) if rows else math.nan


def tasks(run: Path) -> list[str]:
    found = set()
    for stage in ("eval", "knockout", "patching", "overlap"):
        found |= set(subdirs(run / stage))
    return sorted(found, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))


def variants(run: Path, tasks: list[str]) -> list[str]:
    return ordered_names({v for t in tasks for v in subdirs(layout.evaluated_labels(run, t))})


def base(label: str) -> str:
    """The variant a label names: "hh-s1" and "hh@lr=0.0001" are both "hh"."""
    return label_variant(label)


def ordered_names(names) -> list[str]:
    """Labels in the paper's variant order; named limited subsets (real_limited_l1, ...) sit
    with real_limited, by name."""
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    return sorted(names, key=lambda v: (rank.get(variant_kind(base(v)), len(rank)), v))


def ordered(rows: list[dict], key: str) -> list[dict]:
    order = {v: i for i, v in enumerate(ordered_names({r[key] for r in rows}))}
    return sorted(rows, key=lambda r: order[r[key]])


def subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def read(path: Path) -> list[dict] | None:
    """The rows of an artifact, None when it does not exist."""
    if not path.is_file():
        return None
    table = pq.read_table(path)
    missing = [c for c in REQUIRED_COLUMNS.get(path.name, ()) if c not in table.column_names]
    if missing:
        raise ReportError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    return table.to_pylist()


def as_float(x) -> float:
    return math.nan if x is None else float(x)


def fmt(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
