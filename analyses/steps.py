"""Per-step head sets: which heads retrieve at each decoding step, and how much of H_X one step covers.

The paper's H_X (Zhao, Yin, Durrett, ICML 2025, Sec. 3) pools every decoding step of every
example: a head is in H_X if it retrieved (Eq. 1) or looked into a needle (Eq. 2) at some step.
Retrieval heads change from step to step; from the per-step events the decoder records
(`head_examples.parquet`), H_X(t) is the set of heads whose event happened at step t of at
least one example, and a single example's step covers H_e(t). Since H_X is the union of all
H_e(t), each coverage |H(t) ∩ H_X| / |H_X| is at most 1 and the union over steps gives 1.

Example:
    >>> rows = step_sets(step_hits("runs/demo/eval/summhay/real/own/head_examples.parquet", "insight"))
    >>> run_steps("runs/demo", ["summhay"], {"summhay": ["real", "hh"]}, {"summhay": "insight"})

Output `overlap/<task>/steps.parquet`: variant, step, n_examples (examples decoded that far),
n_heads (|H(t)|), heads_all (|H_X|), coverage (|H(t) ∩ H_X| / |H_X|), example_coverage (mean over
those examples of |H_e(t) ∩ H_X| / |H_X|), jaccard (H(t) against H_X).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from analyses.head_examples import ExamplesError, step_hits
from analyses.stability import jaccard
from engine import layout
from engine.store import write_parquet

SCHEMA = pa.schema([("variant", pa.string()), ("step", pa.int64()), ("n_examples", pa.int64()),
                    ("n_heads", pa.int64()), ("heads_all", pa.int64()), ("coverage", pa.float64()),
                    ("example_coverage", pa.float64()), ("jaccard", pa.float64())])


def step_sets(hits: Sequence[np.ndarray]) -> list[dict]:
    """One row per decoding step (SCHEMA without `variant`) from per-example `[steps, layers, heads]` hits."""
    if not hits:
        return []
    h_x = np.any([h.any(axis=0) for h in hits], axis=0)  # H_X: an event at any step of any example
    size = int(h_x.sum())
    rows = []
    for t in range(max(len(h) for h in hits)):
        at_t = [h[t] for h in hits if len(h) > t]
        pooled = np.any(at_t, axis=0)
        per_example = [(e & h_x).sum() / size for e in at_t] if size else [math.nan]
        rows.append({"step": t, "n_examples": len(at_t), "n_heads": int(pooled.sum()), "heads_all": size,
                     "coverage": float((pooled & h_x).sum() / size) if size else math.nan,
                     "example_coverage": float(np.mean(per_example)), "jaccard": jaccard(pooled, h_x)})
    return rows


def run_steps(run_dir: str | Path, tasks: Sequence[str], variants: Mapping[str, Sequence[str]],
              kind_by_task: Mapping[str, str]) -> dict[str, Path]:
    """Writes `overlap/<task>/steps.parquet` for every variant with per-step hits."""
    run_dir = Path(run_dir)
    written = {}
    for task in tasks:
        rows = []
        for v in variants[task]:
            try:
                hits = step_hits(layout.head_examples(run_dir, task, v), kind_by_task[task])
            except ExamplesError:
                continue
            rows += [{"variant": v, **r} for r in step_sets(hits)]
        written[task] = write_parquet(pa.Table.from_pylist(rows, schema=SCHEMA),
                                      layout.overlap(run_dir, task) / "steps.parquet")
    return written
