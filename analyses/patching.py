"""Cross-model activation patching of head sets from the real-data model into a synthetic one.

Source: Zhao, Yin, Durrett, "Understanding Synthetic Context Extension via Retrieval Heads"
(ICML 2025), Sec. 4, Tables 3 and 11. For a model X fine-tuned on synthetic data and the
model fine-tuned on real data: H = heads with score > 0 on each model's own validation
data; H_inter = H_real ∩ H_X, H_compl = H_real \\ H_X, n = min(|H_inter|, |H_compl|). Per
seed, n heads are sampled from H_inter, from H_compl, and from all heads (the random
control); each set's outputs (o_proj input slices over the prompt) are patched from the
real-data model into X on the real task's evaluation set, then X decodes greedily without
patching. The table reports F1 per set and its gain over unpatched X. With n = 0 there is
nothing to patch: those rows carry a note and no F1. With `heads_from`, H_real is read from a
head-score file (`analyses.interop`: a published score file or list, another model's scores)
instead of the source model's own scores.

Example:
    >>> from engine.config import EvaluateConfig, ModelConfig, PatchingConfig
    >>> from engine.evaluate import ModelRef
    >>> mini = ModelConfig("mini", "runs/demo/base")
    >>> table = run_patching(
    ...     target=ModelRef(mini, "runs/demo/models/mdqa/hh"), source=ModelRef(mini, "runs/demo/models/mdqa/real"),
    ...     task="mdqa", target_scores="runs/demo/eval/mdqa/hh/own/head_scores.parquet",
    ...     source_scores="runs/demo/eval/mdqa/real/own/head_scores.parquet", kind="retrieval",
    ...     data_path="runs/demo/data/mdqa/real/eval.parquet", out_dir="runs/demo/patching/mdqa/hh",
    ...     patching=PatchingConfig(seeds=(0,)), evaluate=EvaluateConfig())
    >>> table.select(["set", "n_heads", "f1", "gain"]).to_pylist()

Output `patching.parquet`: set ("none" | "inter" | "compl" | "random"), n_heads, seed, f1,
em, gain (f1 - f1 of "none"), size_inter, size_compl; plus heads ("layer.head"), note, and
example_f1 (F1 per evaluation example, in the set's order, for paired comparisons).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from analyses import interop
from analyses.knockout import example_f1, head_label
from engine.config import EvaluateConfig, PatchingConfig
from engine.evaluate import EvalJob, ModelRef, read_examples, run_jobs
from engine.head_scores import Head
from engine.store import read_parquet, write_parquet

SETS = ("inter", "compl", "random")
PATCHING_SCHEMA = pa.schema(
    [
        ("set", pa.string()),
        ("n_heads", pa.int64()),
        ("seed", pa.int64()),
        ("f1", pa.float64()),
        ("em", pa.float64()),
        ("gain", pa.float64()),
        ("size_inter", pa.int64()),
        ("size_compl", pa.int64()),
        ("heads", pa.list_(pa.string())),
        ("note", pa.string()),
        ("example_f1", pa.list_(pa.float64())),  # F1 per evaluation example, in the set's order
    ]
)


class PatchingError(ValueError):
    """Head scores or models the patching analysis cannot use."""


@dataclass(frozen=True)
class HeadSets:
    """H_real, H_X and every head of the model."""

    real: frozenset[Head]
    target: frozenset[Head]
    all_heads: tuple[Head, ...]

    @property
    def inter(self) -> tuple[Head, ...]:
        return tuple(sorted(self.real & self.target))

    @property
    def compl(self) -> tuple[Head, ...]:
        return tuple(sorted(self.real - self.target))

    @property
    def n(self) -> int:
        return min(len(self.inter), len(self.compl))


@dataclass(frozen=True)
class PatchRun:
    """One row of the patching table; `job` is None when there is nothing to run (n = 0)."""

    set: str
    seed: int
    heads: tuple[Head, ...]
    job: EvalJob | None
    note: str = ""


def scored_heads(path: str, kind: str) -> tuple[frozenset[Head], tuple[Head, ...]]:
    """Heads with score > 0 of `kind` in a head_scores.parquet, and every head listed there."""
    try:
        scores = interop.read_head_scores(path, kind, columns=("kind",))
    except interop.InteropError as err:
        raise PatchingError(str(err)) from None
    return scores.head_set(), tuple(sorted(scores.scores))


def head_sets(source_scores: str, target_scores: str, kind: str, heads_from: str | None = None) -> HeadSets:
    """H_real (from `heads_from` when given, else the source's scores), H_X and every head."""
    real, every_real = scored_heads(source_scores, kind)
    target, every_target = scored_heads(target_scores, kind)
    if every_real != every_target:
        raise PatchingError(f"{source_scores} and {target_scores} list different heads; models do not match")
    if heads_from is not None:
        real = interop.read_head_scores(heads_from, kind=kind).head_set()
        outside = sorted(real - set(every_target))
        if outside:
            raise PatchingError(f"{heads_from}: head {outside[0][0]}-{outside[0][1]} is not a head of the model "
                                f"({len(every_target)} heads in {target_scores})")
    return HeadSets(real=real, target=target, all_heads=every_real)


def sample_heads(pool: Sequence[Head], n: int, seed: int, stream: int) -> tuple[Head, ...]:
    """n heads drawn without replacement from `pool`; `stream` separates the sets of one seed."""
    rng = np.random.default_rng([seed, stream])
    picked = rng.choice(len(pool), size=n, replace=False)
    return tuple(sorted(pool[i] for i in picked))


def patch_runs(
    sets: HeadSets,
    *,
    target: ModelRef,
    source: ModelRef,
    task: str,
    data_path: str,
    seeds: Sequence[int],
    out_dir: str,
    evaluate: EvaluateConfig = EvaluateConfig(),
    with_unpatched: bool = True,
) -> list[PatchRun]:
    """Rows of the patching table and their jobs; equal head sets share one job. Every job
    decodes with `evaluate`, without head scores (scoring never changes what is decoded, so
    an unpatched row may reuse the evaluation stage's scored predictions)."""

    def job(name: str, heads: tuple[Head, ...] | None) -> EvalJob:
        return EvalJob(
            name=f"patching/{out_dir}/{name}",
            model=target,
            task=task,
            data_path=data_path,
            out_dir=str(Path(out_dir) / "jobs" / name),
            evaluate=evaluate,
            scoring=None,
            patch_source=source if heads is not None else None,
            patch_heads=heads,
        )

    runs = [PatchRun("none", -1, (), job("none", None) if with_unpatched else None)]
    n = sets.n
    by_heads: dict[tuple[Head, ...], EvalJob] = {}
    for seed in seeds:
        for stream, name in enumerate(SETS):
            if n == 0:
                empty = "H_inter" if not sets.inter else "H_compl"
                note = f"n = 0 ({empty} is empty: |H_inter|={len(sets.inter)}, |H_compl|={len(sets.compl)}); not run"
                runs.append(PatchRun(name, int(seed), (), None, note))
                continue
            pool = {"inter": sets.inter, "compl": sets.compl, "random": sets.all_heads}[name]
            heads = sample_heads(pool, n, int(seed), stream)
            if heads not in by_heads:
                by_heads[heads] = job(f"{name}-s{seed}", heads)
            runs.append(PatchRun(name, int(seed), heads, by_heads[heads]))
    return runs


def unpatched_summary(predictions: str, data_path: str, limit: int | None) -> dict:
    """F1/EM of an existing unpatched evaluation of X, checked against the evaluation set."""
    table = read_parquet(predictions)
    want = [row["id"] for row in read_examples(data_path, limit)]
    if table["id"].to_pylist() != want:
        raise PatchingError(f"{predictions}: ids differ from the first {len(want)} examples of {data_path}")
    return {"f1": float(np.mean(table["f1"].to_numpy())), "em": float(np.mean(table["em"].to_numpy())),
            "n": table.num_rows}


def run_patching(
    *,
    target: ModelRef,
    source: ModelRef,
    task: str,
    target_scores: str,
    source_scores: str,
    kind: str,
    data_path: str,
    out_dir: str,
    patching: PatchingConfig,
    evaluate: EvaluateConfig,
    unpatched_predictions: str | None = None,
    show_progress: bool = True,
    scorer=None,
) -> pa.Table:
    """Patches H_inter, H_compl and random head sets from `source` into `target`; writes patching.parquet.

    Args:
        target: model X (synthetic data), evaluated.
        source: the real-data model, whose head outputs are patched in.
        task: task registry name.
        target_scores: X's head_scores.parquet on its own validation data (H_X).
        source_scores: the real-data model's head_scores.parquet on its own validation data (H_real).
        kind: "retrieval" or "insight".
        data_path: the real task's evaluation set.
        out_dir: gets patching.parquet and jobs/.
        patching: the patching section: `seeds` (one sample of each set per seed) and
            `heads_from` (a head-score file whose heads with score > 0 stand for H_real).
        evaluate: the evaluate section: how each job decodes and the actor pool.
        unpatched_predictions: X's predictions.parquet on the same set; reused for the "none"
            row instead of decoding again. None decodes it here.
        show_progress: rich progress bar.
        scorer: a task-like object instead of the task registry.
    """
    sets = head_sets(source_scores, target_scores, kind, patching.heads_from)
    runs = patch_runs(
        sets, target=target, source=source, task=task, data_path=data_path, seeds=patching.seeds, out_dir=out_dir,
        evaluate=evaluate, with_unpatched=unpatched_predictions is None,
    )
    jobs = list({r.job.name: r.job for r in runs if r.job is not None}.values())
    summaries = run_jobs(jobs, show_progress=show_progress, scorer=scorer) if jobs else {}
    none = summaries[runs[0].job.name] if runs[0].job is not None else unpatched_summary(
        unpatched_predictions, data_path, evaluate.limit
    )
    none_f1 = example_f1(runs[0].job) if runs[0].job is not None else \
        read_parquet(unpatched_predictions)["f1"].to_pylist()
    rows = []
    for r in runs:
        result = none if r.set == "none" else (summaries[r.job.name] if r.job is not None else None)
        per_example = none_f1 if r.set == "none" else (example_f1(r.job) if r.job is not None else None)
        rows.append(
            {
                "set": r.set,
                "n_heads": len(r.heads),
                "seed": r.seed,
                "f1": None if result is None else result["f1"],
                "em": None if result is None else result["em"],
                "gain": None if result is None else result["f1"] - none["f1"],
                "size_inter": len(sets.inter),
                "size_compl": len(sets.compl),
                "heads": [head_label(h) for h in r.heads],
                "note": r.note,
                "example_f1": per_example,
            }
        )
    table = pa.Table.from_pylist(rows, schema=PATCHING_SCHEMA)
    write_parquet(table, Path(out_dir) / "patching.parquet")
    return table
