"""Head-set stability: how many scored examples it takes to find a model's retrieval heads.

"Can a few samples stably detect retrieval heads?" (a question users of Wu et al.'s
Retrieval_Head ask; its README says few samples find the strongest heads). For a model X,
H_X(all) is the set of heads with score > 0 over all N examples of its own validation data
(Zhao, Yin, Durrett, ICML 2025, Sec. 3). For each n of a grid, every subset of n examples when
there are at most `draws` of them, else `draws` random subsets (without replacement, seeded),
each gives H_X(n); the curve is the Jaccard index
|H_X(n) ∩ H_X(all)| / |H_X(n) ∪ H_X(all)|, its mean and 2.5-97.5 percentiles over the draws.
With the paper's threshold (score > 0) and scores >= 0, H_X(n) is a subset of H_X(all), so the
Jaccard index is also the share of H_X(all) found; a positive `threshold` (Retrieval_Head
calls heads above 0.1 retrieval heads) lets subsets add heads too.

Example:
    >>> curve = stability_curve(scores, sizes=(1, 2, 4, 8), draws=200)   # scores: [n, layers, heads]
    >>> run_stability("runs/demo", ["summhay"], {"summhay": ["real", "hh"]}, {"summhay": "insight"})

Output `overlap/<task>/stability.parquet`: variant, n_examples, n_total, jaccard_mean,
jaccard_low, jaccard_high, heads_mean (mean |H_X(n)|), heads_all (|H_X(all)|), draws, threshold.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from analyses.head_examples import ExamplesError, example_scores
from engine import layout
from engine.store import write_parquet

DRAWS = 200
SEED = 0
ENOUGH = 0.9  # the mean Jaccard index at which the report calls n examples enough
SCHEMA = pa.schema([("variant", pa.string()), ("n_examples", pa.int64()), ("n_total", pa.int64()),
                    ("jaccard_mean", pa.float64()), ("jaccard_low", pa.float64()), ("jaccard_high", pa.float64()),
                    ("heads_mean", pa.float64()), ("heads_all", pa.int64()), ("draws", pa.int64()),
                    ("threshold", pa.float64())])


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two boolean head masks; 1 when both are empty (the same set)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def default_sizes(n_total: int) -> list[int]:
    """1, 2, 4, ... below n_total, then n_total."""
    sizes, n = [], 1
    while n < n_total:
        sizes.append(n)
        n *= 2
    return sizes + [n_total]


def stability_curve(scores: np.ndarray, sizes: Sequence[int] | None = None, draws: int = DRAWS,
                    threshold: float = 0.0, seed: int = SEED) -> list[dict]:
    """Jaccard of H(n) against H(all) for each subset size n (rows of SCHEMA without `variant`).

    Args:
        scores: `[examples, layers, heads]` per-example scores (counted examples only).
        sizes: subset sizes; default `default_sizes`. Sizes above the number of examples are dropped.
        draws: subsets per size: all of them when there are at most `draws`, else `draws` random ones.
        threshold: H = heads with mean score above it (0: the paper's H).
        seed: of the subset draws.
    """
    n_total = scores.shape[0]
    full = scores.mean(axis=0) > threshold
    rng = np.random.default_rng(seed)
    rows = []
    for n in sorted({int(s) for s in (sizes or default_sizes(n_total)) if 1 <= int(s) <= n_total}):
        if math.comb(n_total, n) <= draws:  # few enough: every subset, so the curve is exact
            subsets = [list(c) for c in itertools.combinations(range(n_total), n)]
        else:
            subsets = [rng.choice(n_total, size=n, replace=False) for _ in range(draws)]
        k = len(subsets)
        values, sizes_n = np.empty(k), np.empty(k)
        for d, subset in enumerate(subsets):
            h_n = scores[subset].mean(axis=0) > threshold
            values[d], sizes_n[d] = jaccard(h_n, full), h_n.sum()
        rows.append({"n_examples": n, "n_total": n_total, "jaccard_mean": float(values.mean()),
                     "jaccard_low": float(np.percentile(values, 2.5)),
                     "jaccard_high": float(np.percentile(values, 97.5)), "heads_mean": float(sizes_n.mean()),
                     "heads_all": int(full.sum()), "draws": k, "threshold": float(threshold)})
    return rows


def enough_examples(rows: Sequence[dict], level: float = ENOUGH) -> int | None:
    """The smallest n whose mean Jaccard index reaches `level` (None if no n does)."""
    return next((int(r["n_examples"]) for r in sorted(rows, key=lambda r: r["n_examples"])
                 if r["jaccard_mean"] >= level), None)


def run_stability(run_dir: str | Path, tasks: Sequence[str], variants: Mapping[str, Sequence[str]],
                  kind_by_task: Mapping[str, str], draws: int = DRAWS, threshold: float = 0.0,
                  seed: int = SEED) -> dict[str, Path]:
    """Writes `overlap/<task>/stability.parquet` for every variant with per-example scores."""
    run_dir = Path(run_dir)
    written = {}
    for task in tasks:
        rows = []
        for v in variants[task]:
            try:
                scores = example_scores(layout.head_examples(run_dir, task, v),
                                        kind_by_task[task])
            except ExamplesError:
                continue
            rows += [{"variant": v, **r} for r in stability_curve(scores, draws=draws, threshold=threshold, seed=seed)]
        written[task] = write_parquet(pa.Table.from_pylist(rows, schema=SCHEMA),
                                      layout.overlap(run_dir, task) / "stability.parquet")
    return written
