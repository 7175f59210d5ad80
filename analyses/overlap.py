"""Head-set overlap between models: recall, cosine similarity and their correlation with F1.

Source: Zhao, Yin, Durrett, "Understanding Synthetic Context Extension via Retrieval Heads"
(ICML 2025), Sec. 3-4: Table 2 (cosine similarity of score vectors across tasks), Table 4
(Spearman correlation of recall with real-task F1), Tables 5-10 (pairwise head recall with
head counts), Figure 4 (similarity vs F1).

For model X, H_X is the set of heads with score > 0 on X's own validation data (retrieval
score for MDQA and MuSiQue, insight score for SummHay). The recall cell of row X and column
Y is |H_X ∩ H_Y| / |H_Y|, so the recall of a synthetic model against the real one is
|H_synth ∩ H_real| / |H_real|: the share of the real model's heads the synthetic one found.

Example:
    >>> from analyses.overlap import KIND_BY_TASK, run_overlap
    >>> paths = run_overlap("runs/demo", tasks=["mdqa"], variants=["real", "hh", "ll", "base"],
    ...                     kind_by_task=KIND_BY_TASK)
    >>> paths["mdqa"]["recall"]     # runs/demo/overlap/mdqa/recall.parquet
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from analyses import interop
from engine import layout
from engine.config import label_variant
from engine.stats import spearman_permutation
from engine.store import atomic_dir, write_parquet
from tasks import PAPER_TASKS, head_kind

KIND_BY_TASK = {name: head_kind(name) for name in PAPER_TASKS}  # as each task module states it
REFERENCE = "real"
# The reference is trivially perfect against itself (its other seeds nearly so) and `base`
# was never trained on any variant's data, so neither is a point in the correlation across
# training variants.
NOT_CORRELATED = (REFERENCE, "base")  # by variant name, whatever the seed or sweep suffix

Head = tuple[int, int]  # (layer, head)


class OverlapError(ValueError):
    """An artifact the overlap analysis cannot read."""


@dataclass(frozen=True)
class SpearmanResult:
    """Spearman's rank correlation; `rho` and `p_value` are NaN when `reason` says why."""

    rho: float
    p_value: float
    n: int
    reason: str = ""


def read_head_scores(path: str | Path, kind: str) -> dict[Head, float]:
    """Reads one model's head scores of one kind (`analyses.interop.read_head_scores`, the
    one reader of head-score files).

    Args:
        path: a `head_scores.parquet` (layer, head, kind, score, n_examples).
        kind: "retrieval" or "insight".

    Returns:
        {(layer, head): score} for every row of that kind.

    Raises:
        OverlapError: the file is missing, lacks a column, has no row of `kind`, or lists a
            head twice.
    """
    try:
        return dict(interop.read_head_scores(path, kind, columns=interop.ENGINE_COLUMNS).scores)
    except interop.InteropError as err:
        raise OverlapError(str(err)) from None


def score_grid(scores: Mapping[Head, float], shape: tuple[int, int]) -> np.ndarray:
    """The scores as a [layer, head] array; heads absent from `scores` score 0."""
    grid = np.zeros(shape, dtype=np.float64)
    for (layer, head), s in scores.items():
        grid[layer, head] = s
    return grid


def head_set(scores: Mapping[Head, float]) -> frozenset[Head]:
    """H_X: the heads with a score above zero."""
    return frozenset(h for h, s in scores.items() if s > 0)


def head_recall(h_x: frozenset[Head], h_y: frozenset[Head]) -> float:
    """|H_X ∩ H_Y| / |H_Y| (the cell of row X, column Y); NaN when H_Y is empty."""
    return len(h_x & h_y) / len(h_y) if h_y else math.nan


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two flattened score grids; NaN when either is all zeros or holds a NaN score."""
    if a.shape != b.shape:
        raise OverlapError(f"score grids differ in shape: {a.shape} vs {b.shape}")
    a, b = a.ravel(), b.ravel()
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> SpearmanResult:
    """Spearman's rho of paired values, skipping pairs with a NaN, with a two-sided
    permutation p-value (exact up to seven pairs: across a handful of variants the t
    approximation of `scipy.stats.spearmanr` is off).

    Returns NaN (with the reason) instead of failing when fewer than three pairs remain or
    either side is constant, since the rank correlation is undefined there.
    """
    if len(x) != len(y):
        raise OverlapError(f"spearman: {len(x)} x values but {len(y)} y values")
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    n = len(pairs)
    if n < 3:
        return SpearmanResult(math.nan, math.nan, n, f"n={n} < 3 pairs")
    xs, ys = zip(*pairs)
    if len(set(xs)) == 1:
        return SpearmanResult(math.nan, math.nan, n, "constant x")
    if len(set(ys)) == 1:
        return SpearmanResult(math.nan, math.nan, n, "constant y")
    result = spearman_permutation(xs, ys)
    return SpearmanResult(result.rho, result.p_value, n)


def recall_table(head_sets: Mapping[str, frozenset[Head]]) -> pa.Table:
    """Pairwise recall, one row per (row model, column model) cell."""
    rows = [
        {
            "row": x,
            "column": y,
            "n_row": len(hx),
            "n_column": len(hy),
            "n_intersection": len(hx & hy),
            "recall": head_recall(hx, hy),
        }
        for x, hx in head_sets.items()
        for y, hy in head_sets.items()
    ]
    return pa.Table.from_pylist(rows, schema=_RECALL_SCHEMA)


def cosine_table(grids: Mapping[str, np.ndarray]) -> pa.Table:
    """Pairwise cosine similarity of score grids, one row per (row, column) pair."""
    rows = [
        {"row": x, "column": y, "cosine": cosine_similarity(gx, gy)}
        for x, gx in grids.items()
        for y, gy in grids.items()
    ]
    return pa.Table.from_pylist(rows, schema=_COSINE_SCHEMA)


def cross_task_cosine(grids: Mapping[str, Mapping[str, np.ndarray]]) -> pa.Table:
    """Cosine of the same variant's score grids on two different tasks (Table 2).

    Args:
        grids: {task: {variant: [layer, head] scores}}; the `real` rows give the real-vs-real
            similarity across tasks.
    """
    tasks = list(grids)
    rows = []
    for i, task_a in enumerate(tasks):
        for task_b in tasks[i + 1 :]:
            for variant in grids[task_a]:
                if variant in grids[task_b]:
                    a, b = grids[task_a][variant], grids[task_b][variant]
                    rows.append(
                        {
                            "task_a": task_a,
                            "task_b": task_b,
                            "variant": variant,
                            "cosine": cosine_similarity(*_common_shape(a, b)),
                        }
                    )
    return pa.Table.from_pylist(rows, schema=_CROSS_SCHEMA)


def mean_f1(path: str | Path) -> tuple[float, int]:
    """Mean F1 and row count of a `predictions.parquet`."""
    path = Path(path)
    if not path.is_file():
        raise OverlapError(f"predictions not found: {path}")
    table = pq.read_table(path)
    if "f1" not in table.column_names:
        raise OverlapError(f"{path}: missing column 'f1'; has {table.column_names}")
    f1 = np.asarray(table.column("f1").to_pylist(), dtype=np.float64)
    if f1.size == 0:
        raise OverlapError(f"{path}: no predictions")
    return float(f1.mean()), int(f1.size)


def task_overlap(
    scores: Mapping[str, Mapping[Head, float]],
    f1: Mapping[str, float],
    kind: str,
    n_eval: Mapping[str, int] | None = None,
    reference: str = REFERENCE,
) -> tuple[dict[str, pa.Table], dict[str, np.ndarray]]:
    """All overlap tables of one task.

    Args:
        scores: {variant: {(layer, head): score}} on each variant's own validation data.
        f1: {variant: mean F1 on the real task's evaluation set}.
        kind: the score kind, recorded in the counts table.
        n_eval: {variant: number of evaluated examples}, recorded when given.
        reference: the variant whose heads the others are measured against; when only
            suffixed labels exist ("real-s0", "real-s1"), the first of them.

    Returns:
        ({"recall", "cosine", "spearman", "counts": table}, {variant: score grid}).
    """
    shape = (
        1 + max(layer for s in scores.values() for layer, _ in s),
        1 + max(head for s in scores.values() for _, head in s),
    )
    grids = {v: score_grid(s, shape) for v, s in scores.items()}
    sets = {v: head_set(s) for v, s in scores.items()}
    reference = _reference_label(list(scores), reference)
    has_ref = reference in scores
    counts = []
    for v in scores:
        counts.append(
            {
                "variant": v,
                "kind": kind,
                "n_heads": len(sets[v]),
                "n_total_heads": shape[0] * shape[1],
                "recall_vs_real": head_recall(sets[v], sets[reference]) if has_ref else math.nan,
                "cosine_vs_real": cosine_similarity(grids[v], grids[reference]) if has_ref else math.nan,
                "f1": f1.get(v, math.nan),
                "n_eval": (n_eval or {}).get(v, 0),
            }
        )
    excluded = {label_variant(reference), *NOT_CORRELATED}
    points = [c for c in counts if label_variant(c["variant"]) not in excluded]
    f1s = [c["f1"] for c in points]
    spearman_rows = []
    for metric in ("recall_vs_real", "cosine_vs_real"):
        r = spearman([c[metric] for c in points], f1s)
        if not has_ref:
            r = SpearmanResult(math.nan, math.nan, 0, f"no reference variant {reference!r}")
        spearman_rows.append(
            {
                "metric": metric,
                "rho": r.rho,
                "p_value": r.p_value,
                "n": r.n,
                "reason": r.reason,
                "variants": [c["variant"] for c in points],
            }
        )
    tables = {
        "recall": recall_table(sets),
        "cosine": cosine_table(grids),
        "spearman": pa.Table.from_pylist(spearman_rows, schema=_SPEARMAN_SCHEMA),
        "counts": pa.Table.from_pylist(counts, schema=_COUNTS_SCHEMA),
    }
    return tables, grids


def run_overlap(
    run_dir: str | Path,
    tasks: Sequence[str],
    variants: Sequence[str] | Mapping[str, Sequence[str]],
    kind_by_task: Mapping[str, str] = KIND_BY_TASK,
    reference: str = REFERENCE,
) -> dict[str, dict[str, Path]]:
    """Writes the overlap tables of a run directory.

    Reads `eval/<task>/<variant>/own/head_scores.parquet` (H_X) and
    `eval/<task>/<variant>/real/predictions.parquet` (F1) and writes
    `overlap/<task>/{recall,cosine,spearman,counts}.parquet` and
    `overlap/cross_task_cosine.parquet`.

    Args:
        run_dir: the run directory.
        tasks: task names.
        variants: variant labels for every task, or {task: labels}.
        kind_by_task: the head-score kind per task.
        reference: the variant others are compared with (the real-data model).

    Returns:
        {task: {table name: path}}, plus {"cross_task": {"cosine": path}}.

    Raises:
        OverlapError: a missing or malformed input, named by path.
    """
    run_dir = Path(run_dir)
    final = layout.overlap(run_dir)
    with atomic_dir(final) as out:  # every table of one run of the analysis, or none
        return _write_overlap(run_dir, out, final, tasks, variants, kind_by_task, reference)


def _write_overlap(run_dir: Path, out: Path, final: Path, tasks, variants, kind_by_task, reference) -> dict:
    written: dict[str, dict[str, Path]] = {}
    grids_by_task: dict[str, dict[str, np.ndarray]] = {}
    for task in tasks:
        if task not in kind_by_task:
            raise OverlapError(f"no head-score kind for task {task!r}; kind_by_task has {sorted(kind_by_task)}")
        labels = variants[task] if isinstance(variants, Mapping) else variants
        if not labels:
            raise OverlapError(f"no variants given for task {task!r}")
        kind = kind_by_task[task]
        scores, f1, n_eval = {}, {}, {}
        for v in labels:
            scores[v] = read_head_scores(layout.head_scores(run_dir, task, v), kind)
            f1[v], n_eval[v] = mean_f1(layout.predictions(run_dir, task, v))
        tables, grids_by_task[task] = task_overlap(scores, f1, kind, n_eval, reference)
        written[task] = {}
        for name, table in tables.items():
            write_parquet(table, out / task / f"{name}.parquet")
            written[task][name] = final / task / f"{name}.parquet"
    write_parquet(cross_task_cosine(grids_by_task), out / "cross_task_cosine.parquet")
    written["cross_task"] = {"cosine": final / "cross_task_cosine.parquet"}
    return written


def _reference_label(labels: list[str], reference: str) -> str:
    if reference in labels:
        return reference
    return next((v for v in labels if label_variant(v) == reference), reference)


def _common_shape(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Tables list only the heads they saw, so grids of one model read from two tasks can
    # differ in trailing all-zero rows or columns; padding with zeros restores equality.
    shape = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]))
    return tuple(np.pad(g, ((0, shape[0] - g.shape[0]), (0, shape[1] - g.shape[1]))) for g in (a, b))


_RECALL_SCHEMA = pa.schema(
    [
        ("row", pa.string()),
        ("column", pa.string()),
        ("n_row", pa.int64()),
        ("n_column", pa.int64()),
        ("n_intersection", pa.int64()),
        ("recall", pa.float64()),
    ]
)
_COSINE_SCHEMA = pa.schema([("row", pa.string()), ("column", pa.string()), ("cosine", pa.float64())])
_CROSS_SCHEMA = pa.schema(
    [("task_a", pa.string()), ("task_b", pa.string()), ("variant", pa.string()), ("cosine", pa.float64())]
)
_SPEARMAN_SCHEMA = pa.schema(
    [
        ("metric", pa.string()),
        ("rho", pa.float64()),
        ("p_value", pa.float64()),
        ("n", pa.int64()),
        ("reason", pa.string()),
        ("variants", pa.list_(pa.string())),
    ]
)
_COUNTS_SCHEMA = pa.schema(
    [
        ("variant", pa.string()),
        ("kind", pa.string()),
        ("n_heads", pa.int64()),
        ("n_total_heads", pa.int64()),
        ("recall_vs_real", pa.float64()),
        ("cosine_vs_real", pa.float64()),
        ("f1", pa.float64()),
        ("n_eval", pa.int64()),
    ]
)
