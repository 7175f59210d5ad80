"""95% intervals for every head score, every F1 and every recall of a run.

The paper (Zhao, Yin, Durrett, ICML 2025) reports point estimates: F1 (Table 1), head scores
(Figures 6-9) and the recall of the real model's heads (Tables 5-10). F1 and head scores are
means over examples and get bootstrap intervals over them (`engine.stats`): F1 over the real
task's evaluation examples, a head's score over the examples of the model's own validation
data. The recall |H_X ∩ H_real| / |H_real| is a share of heads and gets the Wilson interval of
a proportion (`recall_interval` says why not a bootstrap).

Example:
    >>> paths = run_intervals("runs/demo", tasks=["summhay"], variants={"summhay": ["real", "hh"]},
    ...                       kind_by_task={"summhay": "insight"})
    >>> paths["summhay"]["intervals"]     # runs/demo/overlap/summhay/intervals.parquet

Outputs per task: `overlap/<task>/head_intervals.parquet` (variant, kind, layer, head, score,
ci_low, ci_high, n) and `overlap/<task>/intervals.parquet` (variant, metric "f1" |
"recall_vs_real", estimate, ci_low, ci_high, n).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from analyses.head_examples import ExamplesError, example_scores
from analyses.overlap import REFERENCE, _reference_label
from engine import layout
from engine.stats import Interval, column_intervals, mean_interval, proportion_interval
from engine.store import write_parquet

HEAD_SCHEMA = pa.schema([("variant", pa.string()), ("kind", pa.string()), ("layer", pa.int32()),
                         ("head", pa.int32()), ("score", pa.float64()), ("ci_low", pa.float64()),
                         ("ci_high", pa.float64()), ("n", pa.int64())])
METRIC_SCHEMA = pa.schema([("variant", pa.string()), ("metric", pa.string()), ("estimate", pa.float64()),
                           ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("n", pa.int64())])


def head_score_intervals(scores: np.ndarray) -> list[Interval]:
    """Every head's mean score with its interval, layer-major; `scores` is `[examples, layers, heads]`."""
    return column_intervals(scores.reshape(scores.shape[0], -1))


def f1_interval(predictions: str | Path) -> Interval:
    """Mean F1 of a predictions.parquet with its interval over the examples."""
    return mean_interval(pq.read_table(predictions, columns=["f1"]).column("f1").to_numpy())


def recall_interval(x: np.ndarray, real: np.ndarray) -> Interval:
    """|H_X ∩ H_real| / |H_real| with the Wilson interval of that proportion.

    Not a bootstrap over examples: H is the support of a union over examples, for which the
    bootstrap is inconsistent (a resample misses every head that one example alone brings, so
    the resampled recalls can all lie above or below the estimate; on 20 + 30 random examples
    of 32 heads: estimate 0.875, BCa interval [0.90, 0.96]). How H depends on the examples is
    measured directly by analyses/stability.py.

    Args:
        x, real: `[examples, layers, heads]` per-example scores of each model on its own data.
    """
    if x.shape[1:] != real.shape[1:]:
        raise ValueError(f"recall_interval: score grids {x.shape[1:]} and {real.shape[1:]} differ")
    h_x, h_real = x.mean(axis=0) > 0, real.mean(axis=0) > 0
    return proportion_interval(int((h_x & h_real).sum()), int(h_real.sum()))


def task_intervals(run_dir: Path, task: str, labels: Sequence[str], kind: str,
                   reference: str = REFERENCE) -> tuple[pa.Table, pa.Table]:
    """The head-score table and the F1/recall table of one task (schemas above)."""
    heads, metrics = [], []
    grids: dict[str, np.ndarray] = {}
    for v in labels:
        preds = layout.predictions(run_dir, task, v)
        if preds.is_file():
            metrics.append(_metric_row(v, "f1", f1_interval(preds)))
        try:
            grids[v] = example_scores(layout.head_examples(run_dir, task, v), kind)
        except ExamplesError:
            continue
        n_layers, n_heads = grids[v].shape[1:]
        for (layer, head), iv in zip(np.ndindex(n_layers, n_heads), head_score_intervals(grids[v])):
            heads.append({"variant": v, "kind": kind, "layer": layer, "head": head, "score": iv.estimate,
                          "ci_low": iv.low, "ci_high": iv.high, "n": iv.n})
    ref = _reference_label(list(grids), reference)
    if ref in grids:
        for v, grid in grids.items():
            metrics.append(_metric_row(v, "recall_vs_real", recall_interval(grid, grids[ref])))
    return (pa.Table.from_pylist(heads, schema=HEAD_SCHEMA), pa.Table.from_pylist(metrics, schema=METRIC_SCHEMA))


def run_intervals(run_dir: str | Path, tasks: Sequence[str], variants: Mapping[str, Sequence[str]],
                  kind_by_task: Mapping[str, str], reference: str = REFERENCE) -> dict[str, dict[str, Path]]:
    """Writes every task's `head_intervals.parquet` and `intervals.parquet` under overlap/<task>/."""
    run_dir = Path(run_dir)
    written = {}
    for task in tasks:
        heads, metrics = task_intervals(run_dir, task, variants[task], kind_by_task[task], reference)
        written[task] = {
            "head_intervals": write_parquet(heads, layout.overlap(run_dir, task) / "head_intervals.parquet"),
            "intervals": write_parquet(metrics, layout.overlap(run_dir, task) / "intervals.parquet"),
        }
    return written


def _metric_row(variant: str, metric: str, iv: Interval) -> dict:
    return {"variant": variant, "metric": metric, "estimate": iv.estimate, "ci_low": iv.low, "ci_high": iv.high,
            "n": iv.n}
