"""The run directory's layout: every path a stage writes or the report reads, and the keys
under which the manifest records finished work. Stages talk only through these files.

    runs/<name>/
      config.yaml  manifest.json  provenance.json  timings.json  base_model.json
      data/<task>/<variant>/            train.parquet val.parquet eval.parquet stats.json
                                        (`base` reads data/<task>/real)
      models/<task>/<label>/            the LoRA adapter of a fine-tuned run
      eval/<task>/<label>/<split>/      predictions.parquet head_scores.parquet head_examples.parquet
                                        summary.json; split `real`: the real task's eval set (F1),
                                        `own`: the run's own validation set (H_X)
      knockout/<task>/<label>/          knockout.parquet
      patching/<task>/<label>/          patching.parquet
      overlap/<task>/                   counts recall spearman intervals head_intervals stability
                                        steps (.parquet); overlap/cross_task_cosine.parquet
      probe/                            probe.parquet correlation.parquet probe.json
                                        models/<task>/<label>/steps<n>/ eval/<task>/<label>/steps<n>/
      report/                           report.md findings.json figures

Manifest keys name the same cells: `data/<task>/<variant>`, `train/<task>/<label>`,
`evaluate/<task>/<label>/<split>`, `knockout/<task>/<label>`, `patching/<task>/<label>`.

Example:
    >>> head_scores(Path("runs/demo"), "mdqa", "real")
    PosixPath('runs/demo/eval/mdqa/real/own/head_scores.parquet')
"""

from __future__ import annotations

from pathlib import Path

SPLITS = ("real", "own")  # what each model is evaluated on: the real eval set, its own validation set


def data_variant(variant: str) -> str:
    """The dataset a variant reads: the non-fine-tuned `base` is evaluated on the real data."""
    return "real" if variant == "base" else variant


# ----------------------------------------------------------------------------- paths


def data(root: Path, task: str, variant: str) -> Path:
    return Path(root) / "data" / task / data_variant(variant)


def real_eval(root: Path, task: str) -> Path:
    """The real task's evaluation set, shared by every variant of the task and by `base`."""
    return data(root, task, "real") / "eval.parquet"


def model(root: Path, task: str, label: str) -> Path:
    return Path(root) / "models" / task / label


def evaluation(root: Path, task: str, label: str, split: str) -> Path:
    return Path(root) / "eval" / task / label / split


def evaluated_labels(root: Path, task: str) -> Path:
    """The directory whose subdirectories are the evaluated run labels of `task`."""
    return Path(root) / "eval" / task


def predictions(root: Path, task: str, label: str) -> Path:
    """Per-example answers and F1 on the real task's evaluation set."""
    return evaluation(root, task, label, "real") / "predictions.parquet"


def head_scores(root: Path, task: str, label: str) -> Path:
    """Per-head mean scores on the run's own validation set (H_X)."""
    return evaluation(root, task, label, "own") / "head_scores.parquet"


def head_examples(root: Path, task: str, label: str) -> Path:
    return evaluation(root, task, label, "own") / "head_examples.parquet"


def knockout(root: Path, task: str, label: str | None = None) -> Path:
    """A run's knockout directory, or with no label the directory of the task's knockouts."""
    return Path(root) / "knockout" / task / label if label else Path(root) / "knockout" / task


def patching(root: Path, task: str, label: str | None = None) -> Path:
    return Path(root) / "patching" / task / label if label else Path(root) / "patching" / task


def overlap(root: Path, task: str | None = None) -> Path:
    """The overlap stage's tables of `task`, or with no task its cross-task directory."""
    return Path(root) / "overlap" / task if task else Path(root) / "overlap"


def probe(root: Path) -> Path:
    return Path(root) / "probe"


def probe_model(root: Path, task: str, label: str, steps: int) -> Path:
    """The adapter of a probe's short tune of `steps` steps."""
    return probe(root) / "models" / task / label / f"steps{steps}"


def probe_evaluation(root: Path, task: str, label: str, steps: int) -> Path:
    return probe(root) / "eval" / task / label / f"steps{steps}"


def report(root: Path) -> Path:
    return Path(root) / "report"


# ----------------------------------------------------------------------------- manifest keys


def data_key(task: str, variant: str) -> str:
    return f"data/{task}/{data_variant(variant)}"


def train_key(task: str, label: str) -> str:
    return f"train/{task}/{label}"


def eval_key(task: str, label: str, split: str) -> str:
    return f"evaluate/{task}/{label}/{split}"


def knockout_key(task: str, label: str) -> str:
    return f"knockout/{task}/{label}"


def patching_key(task: str, label: str) -> str:
    return f"patching/{task}/{label}"
