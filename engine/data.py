"""The data stage: build a task variant's splits, write Parquet, and summarize datasets.

Writes `runs/<exp>/data/<task>/<variant>/{train,val,eval}.parquet` and `stats.json` (Zhao et
al. 2025: 90/10 train/validation from the training pool; the evaluation set from the real
task's evaluation split). Every file is written atomically.

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

import pyarrow.parquet as pq

from tasks import get_task
from tasks.build import DataError
from tasks.example import SCHEMA, from_table, to_table

SPLITS = ("train", "val", "eval")


def _atomic_parquet(examples, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(to_table(examples), tmp)
    os.replace(tmp, path)


def _atomic_json(obj, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


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
        out_dir: directory receiving the Parquet files and stats.json.
        synth: synthesizer for LLM-written text, or None for templates.
    """
    from engine.config import variant_kind

    module = get_task(task)
    kind = variant_kind(variant)
    if kind not in module.VARIANTS:
        raise DataError(f"{task}: unknown variant {variant!r}; valid: {', '.join(module.VARIANTS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    _atomic_parquet(examples[n_val:], out_dir / "train.parquet")
    _atomic_parquet(examples[:n_val], out_dir / "val.parquet")
    if eval_examples is not None:
        _atomic_parquet(eval_examples, out_dir / "eval.parquet")
    from engine.provenance import provenance

    meta = {"task": task, "variant": variant, "target_tokens": target_tokens, "seed": seed, "dropped": dropped,
            "n_requested": {"train_val": n_train, "eval": n_eval if variant == "real" else 0},
            "provenance": provenance(seeds={"data": seed})}
    _atomic_json(meta, out_dir / "build.json")
    stats = dataset_stats(out_dir)
    _atomic_json(stats, out_dir / "stats.json")
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
    """Counts, prompt lengths, needle depths and dropped counts of a dataset directory."""
    dir = Path(dir)
    if not dir.is_dir():
        raise FileNotFoundError(f"{dir}: no such dataset directory")
    build = json.loads((dir / "build.json").read_text()) if (dir / "build.json").exists() else {}
    splits = {}
    for split in SPLITS:
        path = dir / f"{split}.parquet"
        if not path.exists():
            continue
        table = pq.read_table(path, schema=SCHEMA)
        examples = from_table(table)
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
    return {"dir": str(dir), "task": build.get("task"), "variant": build.get("variant"),
            "target_tokens": build.get("target_tokens"), "splits": splits, "dropped": build.get("dropped", {}),
            "provenance": build.get("provenance")}


def render_stats(stats: dict):
    """A rich table of `dataset_stats` output."""
    from rich.table import Table

    title = f"{stats.get('task')} / {stats.get('variant')}  (target {stats.get('target_tokens')} tokens)"
    table = Table(title=title)
    for col in ("split", "count", "tokens min", "median", "max", "needles/ex", "needle depth deciles", "dropped"):
        table.add_column(col, justify="left" if col in ("split", "needle depth deciles", "dropped") else "right")
    for split, s in stats["splits"].items():
        n = s["n_tokens"] or {}
        dropped = stats["dropped"].get("train" if split in ("train", "val") else split, {})
        table.add_row(split, str(s["count"]), str(n.get("min", "-")), f"{n.get('median', 0):.0f}",
                      str(n.get("max", "-")), f"{(s['needles_per_example'] or {}).get('mean', 0):.1f}",
                      " ".join(map(str, s["needle_depth_deciles"])),
                      ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())) or "-")
    return table
