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
import os
import shutil
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
        try:
            values[key] = json.loads(value)  # numbers, lists, null
        except json.JSONDecodeError:
            values[key] = value  # plain strings, e.g. on_failed_check=warn
    return MiniatureSpec(**values)


def checking_callback(spec: MiniatureSpec, every: int, log: list, work_dir: Path):
    from transformers import TrainerCallback

    started = time.perf_counter()

    class Check(TrainerCallback):
        spent = {"wall": 0.0, "cpu": 0.0}  # checking time, taken out of the training time

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every and state.global_step != spec.steps:
                return
            paused, cpu = time.perf_counter(), time.process_time()
            tokenizer = load_tokenizer(str(work_dir))  # saved by pretrain before training starts
            sources = {t: {k: str(work_dir / "sources" / t / p) for k, p in v.items()} for t, v in SOURCES.items()}
            rows = retrieval_accuracy(model, tokenizer, [spec.context // 4, spec.context, 4 * spec.context], n=32, seed=7)
            by_task = task_examples(tokenizer, sources, spec.context, n=30, seed=7, split="eval")
            entry = {"step": state.global_step, "seconds": paused - started - self.spent["wall"],
                     "copy": summary(rows), "qa": {t: answer_accuracy(model, tokenizer, p) for t, p in by_task.items()},
                     "load_average": os.getloadavg()[0]}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            model.train()
            self.spent["wall"] += time.perf_counter() - paused
            self.spent["cpu"] += time.process_time() - cpu

    return Check()


SOURCES = {"mdqa": {"train": "train.jsonl", "eval": "eval.jsonl", "pool": "pool.jsonl"},
           "musique": {"train": "train.jsonl", "eval": "eval.jsonl"},
           "summhay": {"train": "train.json", "eval": "eval.json"}}


def final_answers(spec: MiniatureSpec, model_dir: Path, n: int) -> dict:
    """Exact-answer accuracy per task on held-out prompts at the pretraining length and at 4x."""
    from engine.models import load_model

    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    tokenizer.padding_side = "right"
    sources = {t: {k: str(model_dir / "sources" / t / p) for k, p in v.items()} for t, v in SOURCES.items()}
    out = {}
    for length in (spec.context, 4 * spec.context):
        by_task = task_examples(tokenizer, sources, length, n=n, seed=11, split="eval")
        out[length] = {t: answer_accuracy(model, tokenizer, p) for t, p in by_task.items()}
    return out


def raised_base_copy(spec: MiniatureSpec, model_dir: Path, rope_bases: list[float]) -> dict:
    """Copy accuracy at random depths after raising the RoPE base, before any fine-tuning.

    Context extension starts from here: a base that loses copying even at its own length
    when the base is raised leaves the fine-tunes everything to repair.
    """
    from engine.models import load_model

    tokenizer = load_tokenizer(str(model_dir))
    lengths = [spec.context // 2, spec.context, 2 * spec.context, 4 * spec.context]
    return {base: summary(retrieval_accuracy(load_model(str(model_dir), rope_base=base), tokenizer, lengths,
                                             n=32, seed=3)) for base in rope_bases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="spec fields as key=value")
    parser.add_argument("--check-every", type=int, default=250)
    parser.add_argument("--answers", type=int, default=60, help="held-out prompts per task in the final check")
    parser.add_argument("--out", default="bench_miniature.json")
    parser.add_argument("--keep", help="copy the pretrained model directory here")
    parser.add_argument("--rope-bases", default="20000,80000",
                        help="raised RoPE bases at which to re-check copying after pretraining")
    args = parser.parse_args()
    spec = parse_spec(args.overrides)
    log: list = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        check = checking_callback(spec, args.check_every, log, Path(tmp))
        # The threshold is reported against, not enforced: a benchmark of a weak spec still prints.
        meta = pretrain(dataclasses.replace(spec, min_accuracy=0.0), Path(tmp), progress=False, callbacks=(check,))
        total = time.perf_counter() - start
        answers = final_answers(spec, Path(tmp), args.answers)
        raised = raised_base_copy(spec, Path(tmp), [float(b) for b in args.rope_bases.split(",") if b])
        if args.keep:
            shutil.copytree(tmp, args.keep, dirs_exist_ok=True)
    train = {"wall": meta["seconds"]["train"] - check.spent["wall"],
             "cpu": meta["cpu_seconds"]["train"] - check.spent["cpu"]}
    print(format_table(meta["retrieval"]))
    passed = summary(meta["retrieval"])[spec.context] >= spec.min_accuracy
    print(f"content-based retrieval at {spec.context}: {'PASS' if passed else 'FAIL'} (>= {spec.min_accuracy})")
    print("| length | " + " | ".join(answers[spec.context]) + " |")
    print("|---" * (len(answers[spec.context]) + 1) + "|")
    for length, by_task in answers.items():
        print(f"| {length} | " + " | ".join(f"{a:.2f}" for a in by_task.values()) + " |")
    for base, by_length in raised.items():
        print(f"copy accuracy with RoPE base {base:g}: " + ", ".join(f"{n}: {a:.2f}" for n, a in by_length.items()))
    print(f"pretraining (checks excluded): {train['wall']:.0f} s wall, {train['cpu']:.0f} s CPU, "
          f"{spec.threads} threads, load average {os.getloadavg()[0]:.1f}")
    result = {"spec": dataclasses.asdict(spec), "seconds": meta["seconds"], "cpu_seconds": meta["cpu_seconds"],
              "train_without_checks": train, "total_seconds": total, "load_average": os.getloadavg(),
              "retrieval": meta["retrieval"], "answers": answers, "raised_rope_base_copy": raised,
              "during_training": log}
    tmp_out = Path(f"{args.out}.tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
