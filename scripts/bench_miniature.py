"""Benchmark of the miniature's pretraining: wall time, and retrieval / QA accuracy as it trains.

Pretrains a spec (the demo's by default) into a scratch directory, not the cache, checking
every `--check-every` steps: copy accuracy at random depths at the pretraining length and
4x it, and teacher-forced exact answers on short eval prompts of each task shape.
Prints a table and writes JSON.

With `--copy-lora-steps N`, also extends the model at each `--rope-bases` base with N LoRA
steps on dense copy probes up to 4x the length (does the base extend at all?); with `--model
DIR`, measures a kept model instead of pretraining one.

Example:
    .venv/bin/python scripts/bench_miniature.py --check-every 250 --out bench_miniature.json steps=1500
    .venv/bin/python scripts/bench_miniature.py --model /tmp/kept --rope-bases 320000 --copy-lora-steps 150
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
from engine.store import write_json


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
            if (not every or state.global_step % every) and state.global_step != spec.steps:
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


def copy_lora_extension(spec: MiniatureSpec, model_dir: Path, rope_bases: list[float], steps: int,
                        seed: int = 0) -> dict:
    """Copy accuracy at 1x / 2x / 4x the pretraining length after extending the base with a
    raised RoPE base and `steps` LoRA steps (attention, r8, batch 4, lr 1e-3) on dense copy
    probes of 1.25x-4x the length.

    The densest retrieval signal there is: if this does not extend a base, no task data will.
    """
    import random

    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from engine.miniature.corpus import copy_sequence, token_ids
    from engine.models import add_lora, load_model

    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.padding_side = "right"
    tokens = token_ids(tokenizer)
    short, long = spec.context * 5 // 4, 4 * spec.context

    class Probes(torch.utils.data.Dataset):
        def __len__(self):
            return steps * 4

        def __getitem__(self, i):
            rng = random.Random(f"{seed}/copy-lora/{i}")
            ids, start = copy_sequence(rng, tokens, rng.randint(short, long), rng.randint(4, spec.max_span))
            return {"input_ids": ids, "labels": [-100] * start + ids[start:]}

    out = {}
    for base in rope_bases:
        set_seed(seed)  # the LoRA initialisation too, not only the Trainer's steps
        model = add_lora(load_model(str(model_dir), rope_base=base), rank=8, alpha=8, target="attention")
        with tempfile.TemporaryDirectory() as scratch:
            args = TrainingArguments(output_dir=scratch, max_steps=steps, per_device_train_batch_size=4,
                                     learning_rate=1e-3, warmup_steps=max(1, steps // 20), lr_scheduler_type="cosine",
                                     save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                                     logging_steps=max(1, steps), seed=seed)
            Trainer(model=model, args=args, train_dataset=Probes(),
                    data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)).train()
        merged = model.merge_and_unload().eval()
        out[base] = summary(retrieval_accuracy(merged, tokenizer, [spec.context, 2 * spec.context, long],
                                               n=32, seed=3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="spec fields as key=value")
    parser.add_argument("--check-every", type=int, default=250,
                        help="steps between checks during training (0: only the final one)")
    parser.add_argument("--answers", type=int, default=60, help="held-out prompts per task in the final check")
    parser.add_argument("--out", default="bench_miniature.json")
    parser.add_argument("--keep", help="copy the pretrained model directory here")
    parser.add_argument("--rope-bases", default="20000,80000",
                        help="raised RoPE bases at which to re-check copying after pretraining")
    parser.add_argument("--copy-lora-steps", type=int, default=0,
                        help="also extend at each raised base with this many LoRA steps on dense copy probes")
    parser.add_argument("--model", help="measure this pretrained miniature directory instead of pretraining")
    args = parser.parse_args()
    bases = [float(b) for b in args.rope_bases.split(",") if b]
    if args.model:
        measure_only(Path(args.model), bases, args)
        return
    spec = parse_spec(args.overrides)
    log: list = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        check = checking_callback(spec, args.check_every, log, Path(tmp))
        # The threshold is reported against, not enforced: a benchmark of a weak spec still prints,
        # and a kept model records the real threshold.
        meta = pretrain(dataclasses.replace(spec, on_failed_check="warn"), Path(tmp), progress=False,
                        callbacks=(check,))
        total = time.perf_counter() - start
        measured = measure(spec, Path(tmp), bases, args)
        if args.keep:
            shutil.copytree(tmp, args.keep, dirs_exist_ok=True)
    train = {"wall": meta["seconds"]["train"] - check.spent["wall"],
             "cpu": meta["cpu_seconds"]["train"] - check.spent["cpu"]}
    print_measurements(spec, meta["retrieval"], measured)
    print(f"pretraining (checks excluded): {train['wall']:.0f} s wall, {train['cpu']:.0f} s CPU, "
          f"{spec.threads} threads, load average {os.getloadavg()[0]:.1f}")
    result = {"spec": dataclasses.asdict(spec), "seconds": meta["seconds"], "cpu_seconds": meta["cpu_seconds"],
              "train_without_checks": train, "total_seconds": total, "load_average": os.getloadavg(),
              "retrieval": meta["retrieval"], **measured, "during_training": log}
    write_json(result, args.out)


def measure(spec: MiniatureSpec, model_dir: Path, bases: list[float], args) -> dict:
    """Everything measured on a pretrained model: answers, raised-base copying, copy-LoRA extension."""
    steps = args.copy_lora_steps
    return {"answers": final_answers(spec, model_dir, args.answers),
            "raised_rope_base_copy": raised_base_copy(spec, model_dir, bases),
            "copy_lora_steps": steps,
            "copy_lora_extension": copy_lora_extension(spec, model_dir, bases, steps) if steps else {}}


def print_measurements(spec: MiniatureSpec, retrieval: list[dict], measured: dict) -> None:
    print(format_table(retrieval))
    passed = summary(retrieval)[spec.context] >= spec.min_accuracy
    print(f"content-based retrieval at {spec.context}: {'PASS' if passed else 'FAIL'} (>= {spec.min_accuracy})")
    answers = measured["answers"]
    print("| length | " + " | ".join(answers[spec.context]) + " |")
    print("|---" * (len(answers[spec.context]) + 1) + "|")
    for length, by_task in answers.items():
        print(f"| {length} | " + " | ".join(f"{a:.2f}" for a in by_task.values()) + " |")
    for base, by_length in measured["raised_rope_base_copy"].items():
        print(f"copy accuracy with RoPE base {base:g}: " + ", ".join(f"{n}: {a:.2f}" for n, a in by_length.items()))
    for base, by_length in measured["copy_lora_extension"].items():
        print(f"copy accuracy after {measured['copy_lora_steps']} copy-LoRA steps at RoPE base {base:g}: "
              + ", ".join(f"{n}: {a:.2f}" for n, a in by_length.items()))


def measure_only(model_dir: Path, bases: list[float], args) -> None:
    """The after-pretraining measurements of a kept model (`--keep`, or a cache entry)."""
    meta_path = model_dir / "miniature.json"
    if not meta_path.exists():
        raise SystemExit(f"--model {model_dir}: no miniature.json (not a pretrained miniature directory)")
    meta = json.loads(meta_path.read_text())
    spec = MiniatureSpec(**{k: v for k, v in meta["spec"].items()
                            if k in {f.name for f in dataclasses.fields(MiniatureSpec)}})
    start = time.perf_counter()
    measured = measure(spec, model_dir, bases, args)
    print_measurements(spec, meta["retrieval"], measured)
    write_json({"model": str(model_dir), "spec": meta["spec"], "retrieval": meta["retrieval"], **measured,
                "seconds": time.perf_counter() - start}, args.out)

if __name__ == "__main__":
    main()
