"""Head knockout: real-task F1 with the top-k scored heads zeroed vs k random other heads.

Source: Zhao, Yin, Durrett, "Understanding Synthetic Context Extension via Retrieval Heads"
(ICML 2025), Sec. 4, Figure 3. A model's heads are ranked by their score (retrieval, Eq. 1,
or insight, Eq. 2) on its own validation data; for each k of a sweep, the k best heads have
their outputs zeroed (input slice of o_proj, every position, prefill and decode) and the
model is evaluated on the real task. The control zeroes k heads drawn at random from the
heads OUTSIDE the top k (unlike Wu et al.'s public code, whose random draw may include them),
once per seed. All runs go through one actor pool (`engine.evaluate.run_jobs`). With
`heads_from`, the ranking comes from a head-score file of any format `analyses.interop` reads
(a published Retrieval_Head/HeadKV score file, a QRHead list, another model's scores) instead
of the model's own scores; the random control still draws from every other head of the model.

Example:
    >>> from engine.config import EvaluateConfig, KnockoutConfig, ModelConfig
    >>> from engine.evaluate import ModelRef
    >>> table = run_knockout(
    ...     model=ModelRef(ModelConfig("mini", "runs/demo/base"), "runs/demo/models/mdqa/real"), task="mdqa",
    ...     head_scores="runs/demo/eval/mdqa/real/own/head_scores.parquet", kind="retrieval",
    ...     data_path="runs/demo/data/mdqa/real/eval.parquet", out_dir="runs/demo/knockout/mdqa/real",
    ...     knockout=KnockoutConfig(ks=(0, 4, 8), seeds=(0, 1, 2)), evaluate=EvaluateConfig())
    >>> knockout_curve(table).to_pylist()   # k, selection, f1_mean, f1_std, n_runs

Output `knockout.parquet`: k, selection ("top" | "random"), seed (-1 for top), heads (list of
"layer.head"), f1, em, n, and example_f1 (F1 per evaluation example, in the evaluation set's
order, so that top-k and random-k runs can be compared example by example).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from analyses import interop
from engine.config import EvaluateConfig, KnockoutConfig
from engine.evaluate import EvalJob, ModelRef, run_jobs
from engine.head_scores import Head
from engine.store import read_parquet, write_parquet

KNOCKOUT_SCHEMA = pa.schema(
    [
        ("k", pa.int64()),
        ("selection", pa.string()),
        ("seed", pa.int64()),
        ("heads", pa.list_(pa.string())),
        ("f1", pa.float64()),
        ("em", pa.float64()),
        ("n", pa.int64()),
        ("example_f1", pa.list_(pa.float64())),
    ]
)


class KnockoutError(ValueError):
    """A head ranking or sweep the knockout cannot use."""


@dataclass(frozen=True)
class KnockoutRun:
    """One knocked-out head set and the evaluation job that measures it."""

    k: int
    selection: str  # "top" | "random"
    seed: int  # -1 for top
    heads: tuple[Head, ...]
    job: EvalJob


def head_label(head: Head) -> str:
    return f"{head[0]}.{head[1]}"


def ranked_heads(head_scores: pa.Table, kind: str, source: str = "head_scores") -> list[Head]:
    """Every head of `kind`, best score first; ties and unscored (NaN) heads by (layer, head).

    Args:
        head_scores: table with layer, head, kind, score (`engine.head_scores.score_table`).
        kind: "retrieval" or "insight".
        source: file name for error messages.
    """
    try:
        return interop.table_head_scores(head_scores, kind, source, columns=("kind",)).ranking()
    except interop.InteropError as err:
        raise KnockoutError(str(err)) from None


def external_ranking(heads_from: str, kind: str, model_heads: Sequence[Head]) -> tuple[list[Head], int]:
    """The model's heads ranked by a head-score file: its ranking first, then the heads it does
    not list (by layer, head). Returns the ranking and how many heads the file ranks.

    Raises:
        KnockoutError: the file names a head the model does not have.
    """
    external = interop.read_head_scores(heads_from, kind=kind)
    known = set(model_heads)
    outside = [h for h in external.scores if h not in known]
    if outside:
        raise KnockoutError(f"{heads_from}: head {outside[0][0]}-{outside[0][1]} is not a head of the model "
                            f"({len(known)} heads)")
    ranked = external.ranking()
    rest = sorted(known - set(ranked))
    return ranked + rest, len(ranked)


def random_heads(ranking: Sequence[Head], k: int, seed: int) -> tuple[Head, ...]:
    """k heads drawn uniformly, without replacement, from outside the top k of `ranking`."""
    outside = sorted(ranking[k:])
    if k > len(outside):
        raise KnockoutError(f"k={k}: only {len(outside)} heads lie outside the top {k} to draw from")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(outside), size=k, replace=False)
    return tuple(sorted(outside[i] for i in picked))


def knockout_jobs(
    *,
    model: ModelRef,
    task: str,
    head_scores: str,
    kind: str,
    data_path: str,
    out_dir: str,
    knockout: KnockoutConfig,
    evaluate: EvaluateConfig,
) -> list[KnockoutRun]:
    """The knockout sweep as evaluation jobs (no head scoring), top and random per k.

    k = 0 is the intact model (one "top" run, no random runs). Jobs write under
    `<out_dir>/jobs/<name>/`. `head_scores` (the model's own) lists every head of the model;
    `knockout.heads_from`, when given, ranks them instead (`external_ranking`). The k sweep and
    the random seeds are `knockout.ks` and `knockout.seeds`; each job decodes with `evaluate`.
    """
    ranking = ranked_heads(read_parquet(head_scores), kind, source=head_scores)
    ranked, source = len(ranking), head_scores
    if knockout.heads_from is not None:
        ranking, ranked = external_ranking(knockout.heads_from, kind, ranking)
        source = knockout.heads_from
    ks = sorted({int(k) for k in knockout.ks})
    if ks and (ks[0] < 0 or ks[-1] > ranked):
        raise KnockoutError(f"ks {ks} must lie in [0, {ranked}] (heads ranked in {source})")

    def job(name: str, heads: tuple[Head, ...]) -> EvalJob:
        return EvalJob(
            name=f"knockout/{Path(out_dir).name}/{name}",
            model=model,
            task=task,
            data_path=data_path,
            out_dir=str(Path(out_dir) / "jobs" / name),
            evaluate=evaluate,
            scoring=None,
            knockout=heads or None,
        )

    runs = []
    for k in ks:
        top = tuple(sorted(ranking[:k]))
        runs.append(KnockoutRun(k, "top", -1, top, job(f"k{k}-top", top)))
        if k == 0:
            continue
        for seed in knockout.seeds:
            heads = random_heads(ranking, k, int(seed))
            runs.append(KnockoutRun(k, "random", int(seed), heads, job(f"k{k}-random-s{seed}", heads)))
    return runs


def run_knockout(
    *,
    model: ModelRef,
    task: str,
    head_scores: str,
    kind: str,
    data_path: str,
    out_dir: str,
    knockout: KnockoutConfig,
    evaluate: EvaluateConfig,
    show_progress: bool = True,
    scorer=None,
) -> pa.Table:
    """Runs the knockout sweep on one actor pool and writes `<out_dir>/knockout.parquet`.

    Args: as `knockout_jobs` (`evaluate` also sizes the actor pool), plus `show_progress` and
    `scorer` (a task-like object instead of the task registry, see `engine.evaluate.run_jobs`).

    Returns:
        The knockout table (KNOCKOUT_SCHEMA), one row per run.
    """
    runs = knockout_jobs(model=model, task=task, head_scores=head_scores, kind=kind, data_path=data_path,
                         out_dir=out_dir, knockout=knockout, evaluate=evaluate)
    summaries = run_jobs([r.job for r in runs], show_progress=show_progress, scorer=scorer)
    table = pa.Table.from_pylist(
        [
            {
                "k": r.k,
                "selection": r.selection,
                "seed": r.seed,
                "heads": [head_label(h) for h in r.heads],
                "f1": summaries[r.job.name]["f1"],
                "em": summaries[r.job.name]["em"],
                "n": summaries[r.job.name]["n"],
                "example_f1": example_f1(r.job),
            }
            for r in runs
        ],
        schema=KNOCKOUT_SCHEMA,
    )
    write_parquet(table, Path(out_dir) / "knockout.parquet")
    return table


def example_f1(job: EvalJob) -> list[float]:
    """F1 per example of a finished evaluation job, in its data's order."""
    return read_parquet(Path(job.out_dir) / "predictions.parquet")["f1"].to_pylist()


def knockout_curve(table: pa.Table) -> pa.Table:
    """Mean and sample standard deviation of F1 per (k, selection), for Figure 3.

    The single "top" run of each k has std 0.
    """
    grouped = table.group_by(["k", "selection"]).aggregate(
        [("f1", "mean"), ("f1", "stddev", pc.VarianceOptions(ddof=1)), ("f1", "count")]
    )
    curve = pa.table(
        {
            "k": grouped["k"],
            "selection": grouped["selection"],
            "f1_mean": grouped["f1_mean"],
            "f1_std": pc.fill_null(grouped["f1_stddev"], 0.0),
            "n_runs": grouped["f1_count"],
        }
    )
    return curve.sort_by([("selection", "descending"), ("k", "ascending")])
