"""The data stage: build a task variant's splits, write Parquet, and summarize datasets.

Writes `runs/<exp>/data/<task>/<variant>/{train,val,eval}.parquet` and `stats.json` (Zhao et
al. 2025: 90/10 train/validation from the training pool; the evaluation set from the real
task's evaluation split). A dataset directory is built beside its final path and renamed into
place whole, so it holds one complete build or does not exist.

Example:
    >>> stats = build_task_data("mdqa", "hl", sources={}, options={}, tokenizer="path/to/model",
    ...                         target_tokens=1024, n_train=20, n_eval=0, seed=0, out_dir=Path("d"))
    >>> dataset_stats(Path("d"))["splits"]["train"]["count"]
    18
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Group
from rich.table import Table

from engine.config import variant_kind
from engine.provenance import provenance
from engine.store import atomic_dir, write_json, write_parquet
from tasks import get_task
from tasks.build import DataError
from tasks.example import SCHEMA, from_table, to_table

SPLITS = ("train", "val", "eval")


def _tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        from engine.models import load_tokenizer

        return load_tokenizer(str(tokenizer))
    return tokenizer


def build_task_data(task: str, variant: str, *, sources: dict, options: dict, tokenizer, target_tokens: int,
                    n_train: int, n_eval: int, seed: int, out_dir: Path, synth=None,
                    val_fraction: float = 0.1) -> dict:
    """Builds and writes one task x variant dataset; returns its stats.

    Args:
        task, variant: registry names (`tasks.TASKS`, the task's VARIANTS), or a named limited
            variant `real_limited_<name>`: built as `real_limited` and labelled with its name.
        sources: local source paths by key (the task's SOURCES).
        options: task options from the experiment YAML.
        tokenizer: a tokenizer or the path of the model whose tokenizer to use.
        target_tokens: prompt length budget (each prompt at most this, within 2%).
        n_train: examples for train + validation together (split by `val_fraction`, seeded).
        n_eval: evaluation examples, built for the real variant from its `eval` source.
        seed: seeds every random choice.
        out_dir: the dataset directory (Parquet files, build.json, stats.json); replaced
            whole when the build succeeds, untouched when it fails.
        synth: synthesizer for LLM-written text, or None for templates; a fresh one per
            dataset, since its report (recorded in build.json and stats.json as `synthesis`:
            requests, valid first try, recovered by a retry, fallback to templates, and why)
            counts everything it generated.
    """
    module = get_task(task)
    kind = variant_kind(variant)
    if kind not in module.VARIANTS:
        raise DataError(f"{task}: unknown variant {variant!r}; valid: {', '.join(module.VARIANTS)}")
    out_dir = Path(out_dir)
    tok = _tokenizer(tokenizer)
    common = dict(sources=sources, options=options, tokenizer=tok, target_tokens=target_tokens, seed=seed,
                  synth=synth)
    dropped = {}
    result = module.build(kind, n=n_train, split="train", **common)
    dropped["train"] = result.dropped
    examples = [_labelled(e, task, kind, variant) for e in result.examples]
    _check_not_empty(examples, task, variant, "train", sources, result.dropped)
    eval_examples = None
    if variant == "real" and n_eval > 0:
        result = module.build(variant, n=n_eval, split="eval", **common)
        dropped["eval"] = result.dropped
        eval_examples = list(result.examples)
        _check_not_empty(eval_examples, task, variant, "eval", sources, result.dropped)
    random.Random(seed).shuffle(examples)
    n_val = int(round(len(examples) * val_fraction))
    meta = {"task": task, "variant": variant, "target_tokens": target_tokens, "seed": seed, "dropped": dropped,
            "n_requested": {"train_val": n_train, "eval": n_eval if variant == "real" else 0},
            "provenance": provenance(seeds={"data": seed})}
    if synth is not None and synth.report["requests"]:
        meta["synthesis"] = synth.report  # how much of the text the LLM wrote, and why the rest is templates
    with atomic_dir(out_dir) as tmp:
        write_parquet(to_table(examples[n_val:]), tmp / "train.parquet")
        write_parquet(to_table(examples[:n_val]), tmp / "val.parquet")
        if eval_examples is not None:
            write_parquet(to_table(eval_examples), tmp / "eval.parquet")
        write_json(meta, tmp / "build.json")
        stats = {**dataset_stats(tmp), "dir": str(out_dir)}
        write_json(stats, tmp / "stats.json")
    return stats


def _labelled(example, task: str, kind: str, name: str):
    """The example under its variant's name (a named limited variant is built as `kind`)."""
    if name == kind:
        return example
    prefix = f"{task}-{kind}-"
    new_id = f"{task}-{name}-{example.id[len(prefix):]}" if example.id.startswith(prefix) else example.id
    return dataclasses.replace(example, variant=name, id=new_id)


def _check_not_empty(examples, task, variant, split, sources, dropped) -> None:
    # Raised before anything is written, so an empty dataset never reaches the run directory.
    if not examples:
        raise DataError(
            f"{task}/{variant}: the {split} split is empty (sources {dict(sources)}); "
            f"dropped: {dict(dropped) or 'none'}"
        )


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    qs = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
    return {"min": min(values), "p10": qs[0], "median": statistics.median(values), "p90": qs[-1],
            "max": max(values), "mean": statistics.fmean(values)}


def dataset_stats(dir) -> dict:
    """Counts, prompt lengths, needle depths and dropped counts of a dataset directory.

    Raises:
        DataError: no such directory, or a file in it that is not what a build writes.
    """
    dir = Path(dir)
    if not dir.is_dir():
        raise DataError(f"{dir}: no such dataset directory")
    build = {}
    if (dir / "build.json").exists():
        try:
            build = json.loads((dir / "build.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{dir / 'build.json'}: not a build record ({err})") from None
        if not isinstance(build, dict):
            raise DataError(f"{dir / 'build.json'}: not a build record (expected a JSON object)")
    splits = {}
    for split in SPLITS:
        path = dir / f"{split}.parquet"
        if not path.exists():
            continue
        try:
            table = pq.read_table(path, schema=SCHEMA)
            examples = from_table(table)
        except (OSError, pa.ArrowException, KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}: not a dataset split ({str(err).splitlines()[0]})") from None
        depths = [d for e in examples for d in e.meta.get("needle_depths", [])]
        hist = [0] * 10
        for d in depths:
            hist[min(9, max(0, int(d * 10)))] += 1
        splits[split] = {
            "count": len(examples),
            "n_tokens": _summary([e.n_tokens for e in examples]),
            "needles_per_example": _summary([len(e.needle_spans) for e in examples]),
            "needle_depth_deciles": hist,
            "filler_words": _summary([e.meta.get("n_filler_words", 0) for e in examples]),
        }
    if not splits:
        raise DataError(f"{dir}: not a dataset directory (no {', '.join(f'{s}.parquet' for s in SPLITS)})")
    return {"dir": str(dir), "task": build.get("task"), "variant": build.get("variant"),
            "target_tokens": build.get("target_tokens"), "splits": splits, "dropped": build.get("dropped", {}),
            "synthesis": build.get("synthesis"), "provenance": build.get("provenance")}


# Examples are dropped while a build draws them, before the train / val split is made: the
# train and val splits share one build ("train"), the eval split has its own.
_BUILDS = {"train": "train + val", "eval": "eval"}


def render_stats(stats: dict):
    """Rich tables of `dataset_stats` output: the splits, then why examples were dropped.

    The drop reasons get a table of their own, one row per build and reason, so that no reason
    is cut to fit a narrow terminal and no split shows another's counts.
    """
    title = f"{stats.get('task')} / {stats.get('variant')}  (target {stats.get('target_tokens')} tokens)"
    table = Table(title=title)
    for col in ("split", "count", "tokens min", "median", "max", "needles/ex", "needle depth deciles"):
        table.add_column(col, justify="left" if col in ("split", "needle depth deciles") else "right")
    for split, s in stats["splits"].items():
        n = s["n_tokens"] or {}
        table.add_row(split, str(s["count"]), str(n.get("min", "-")), f"{n.get('median', 0):.0f}",
                      str(n.get("max", "-")), f"{(s['needles_per_example'] or {}).get('mean', 0):.1f}",
                      " ".join(map(str, s["needle_depth_deciles"])))
    dropped = Table(title="dropped while building")
    dropped.add_column("build", no_wrap=True)
    dropped.add_column("reason", overflow="fold")
    dropped.add_column("examples", justify="right", no_wrap=True)
    for build, label in _BUILDS.items():
        reasons = stats.get("dropped", {}).get(build)
        if reasons is None:
            continue
        for reason, count in sorted(reasons.items()) or [("none", 0)]:
            dropped.add_row(label, reason, str(count))
    parts = [table] + ([dropped] if dropped.row_count else [])
    synthesis = stats.get("synthesis")
    if synthesis and synthesis["backend"] == "template":
        parts.append(f"synthesis: {synthesis['requests']} texts from their templates (synth.backend: template)")
    elif synthesis:
        written = synthesis["valid_first_try"] + synthesis["recovered"]
        parts.append(f"synthesis ({synthesis['backend']}, {synthesis['model']}): {written} of "
                     f"{synthesis['requests']} texts written by the model ({synthesis['valid_first_try']} valid on "
                     f"the first try, {synthesis['recovered']} on a retry), {synthesis['fallback']} templates, "
                     f"{synthesis['cache_hits']} from the cache")
    return Group(*parts) if len(parts) > 1 else table
