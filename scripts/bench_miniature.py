"""Benchmark of the miniature's pretraining: wall time, and retrieval / QA accuracy as it trains.

Pretrains a spec (the demo's by default) into a scratch directory, not the cache, checking
every `--check-every` steps: copy accuracy at random depths at the pretraining length and
4x it, and teacher-forced exact answers on short eval prompts of each task shape.
Prints a table and writes JSON.

Example:
    .venv/bin/python scripts/bench_miniature.py --check-every 250 --out bench_miniature.json steps=1500
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.miniature import MiniatureSpec, format_table, retrieval_accuracy, summary
from engine.miniature.checks import answer_accuracy
from engine.miniature.corpus import task_examples
from engine.miniature.pretrain import pretrain
from engine.models import load_tokenizer


def parse_spec(overrides: list[str]) -> MiniatureSpec:
    fields = {f.name: f for f in dataclasses.fields(MiniatureSpec)}
    values = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown spec field {key!r}; fields: {sorted(fields)}")
        values[key] = json.loads(value) if key == "mix" else type(getattr(MiniatureSpec(), key))(value)
    return MiniatureSpec(**values)


def checking_callback(spec: MiniatureSpec, every: int, log: list, work_dir: Path):
    from transformers import TrainerCallback

    started = time.perf_counter()

    class Check(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every and state.global_step != spec.steps:
                return
            paused = time.perf_counter()
            tokenizer = load_tokenizer(str(work_dir))  # saved by pretrain before training starts
            sources = {t: {k: str(work_dir / "sources" / t / p) for k, p in v.items()} for t, v in SOURCES.items()}
            rows = retrieval_accuracy(model, tokenizer, [spec.context, 4 * spec.context], n=32, seed=7)
            by_task = task_examples(tokenizer, sources, spec.context, n=30, seed=7, split="eval")
            entry = {"step": state.global_step, "seconds": paused - started, "copy": summary(rows),
                     "qa": {t: answer_accuracy(model, tokenizer, p) for t, p in by_task.items()}}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            model.train()

    return Check()


SOURCES = {"mdqa": {"train": "train.jsonl", "eval": "eval.jsonl", "pool": "pool.jsonl"},
           "musique": {"train": "train.jsonl", "eval": "eval.jsonl"},
           "summhay": {"train": "train.json", "eval": "eval.json"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="spec fields as key=value")
    parser.add_argument("--check-every", type=int, default=250)
    parser.add_argument("--out", default="bench_miniature.json")
    args = parser.parse_args()
    spec = parse_spec(args.overrides)
    log: list = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        # The threshold is reported against, not enforced: a benchmark of a weak spec still prints.
        meta = pretrain(dataclasses.replace(spec, min_accuracy=0.0), Path(tmp), progress=False,
                        callbacks=(checking_callback(spec, args.check_every, log, Path(tmp)),))
        total = time.perf_counter() - start
    print(format_table(meta["retrieval"]))
    passed = summary(meta["retrieval"])[spec.context] >= spec.min_accuracy
    print(f"content-based retrieval at {spec.context}: {'PASS' if passed else 'FAIL'} (>= {spec.min_accuracy})")
    result = {"spec": dataclasses.asdict(spec), "seconds": meta["seconds"], "total_seconds": total,
              "retrieval": meta["retrieval"], "during_training": log}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(meta["seconds"]))


if __name__ == "__main__":
    main()
