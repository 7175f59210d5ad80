"""Readers of `head_examples.parquet`: each head's score on every example, and the per-step hits.

The evaluation stage (engine/evaluate.py) writes, beside a model's mean `head_scores.parquet`,
one row per evaluated example: its retrieval and insight score of every head (`[n_layers *
n_heads]`, NaN when the example had no located span) and the decoding steps at which each head
retrieved (Eq. 1's event) or looked into a needle (Eq. 2's), as flat indices into `[n_steps,
n_layers, n_heads]`. Intervals, stability and per-step head sets are computed from these.

Example:
    >>> scores = example_scores("runs/demo/eval/mdqa/real/own/head_examples.parquet", "retrieval")
    >>> scores.shape                       # (counted examples, layers, heads)
    >>> [h.shape for h in step_hits("runs/demo/eval/mdqa/real/own/head_examples.parquet", "retrieval")][:2]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

KINDS = ("retrieval", "insight")
COLUMNS = ("id", "n_layers", "n_heads", "retrieval", "insight", "n_steps", "retrieval_hits", "insight_hits")


class ExamplesError(ValueError):
    """A head_examples.parquet that cannot be read as asked; names the file."""


def _table(path: str | Path, kind: str):
    path = Path(path)
    if kind not in KINDS:
        raise ExamplesError(f"kind must be one of {KINDS}, got {kind!r}")
    if not path.is_file():
        raise ExamplesError(f"{path}: no per-example head scores (evaluated before head_examples.parquet existed?)")
    table = pq.read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ExamplesError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    return path, table


def example_scores(path: str | Path, kind: str) -> np.ndarray:
    """`[examples, layers, heads]` scores of the examples counted for `kind` (no NaN rows)."""
    path, table = _table(path, kind)
    values = table.column(kind).to_pylist()
    rows = [i for i, v in enumerate(values) if v is not None]
    if not rows:
        raise ExamplesError(f"{path}: no {kind} scores")
    n_layers, n_heads = int(table.column("n_layers")[rows[0]].as_py()), int(table.column("n_heads")[rows[0]].as_py())
    grid = np.asarray([values[i] for i in rows], dtype=float).reshape(len(rows), n_layers, n_heads)
    return grid[~np.isnan(grid).any(axis=(1, 2))]


def step_hits(path: str | Path, kind: str) -> list[np.ndarray]:
    """Per counted example, `[steps, layers, heads]` bool: did the head's event happen at that step."""
    path, table = _table(path, kind)
    scores = table.column(kind).to_pylist()
    out = []
    for i, row in enumerate(table.select(["n_layers", "n_heads", "n_steps", f"{kind}_hits"]).to_pylist()):
        if scores[i] is None or row[f"{kind}_hits"] is None or np.isnan(np.asarray(scores[i], dtype=float)).any():
            continue  # not scored, or no located span: the example counts for no head
        hits = np.zeros(row["n_steps"] * row["n_layers"] * row["n_heads"], dtype=bool)
        hits[np.asarray(row[f"{kind}_hits"], dtype=np.int64)] = True
        out.append(hits.reshape(row["n_steps"], row["n_layers"], row["n_heads"]))
    return out
