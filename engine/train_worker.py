"""What one Ray Train worker runs: a LoRA fine-tune with the HF Trainer, loss on the answer.

The study (Zhao, Yin, Durrett, ICML 2025) extends context by raising the RoPE base
(and scaling Mistral's sliding window) and training LoRA rank 8 on attention with batch 1
and gradient accumulation 4, next-token loss on the answer only. This module does exactly
that for one variant; `engine/train.py` launches it on Ray Train.

`train_loop_per_worker` is a plain function: inside a Ray Train worker it resumes from
`ray.train.get_checkpoint()` and reports checkpoints (adapter + optimizer, scheduler and RNG
state, the HF Trainer checkpoint of a PEFT model); called directly it trains in-process and
writes the variant's `out_dir` itself.

Resuming reads the checkpoint's optimizer, scheduler and RNG state, which are pickles: the HF
Trainer loads them with `torch.load(weights_only=True)`, so a tampered file fails instead of
running code (tested). Under DeepSpeed, DeepSpeed's own loader reads its ZeRO state with
`weights_only=False`; those files are this run's own, written by it into its `storage_path`.

The model is loaded from the spec's `ModelConfig` as `engine.placement.resolve_placement`
places it for the worker's GPUs (`train.gpus_per_worker`): its dtype and attention backend;
the Trainer moves it to the worker's device (under DeepSpeed, shard by shard).

Example (no Ray, a saved tiny model and a Parquet file of prompt/target rows):
    >>> spec = TrainSpec("toy/hh", ModelConfig("tiny", "tiny/llama"), TrainConfig(max_length=128),
    ...                  "train.parquet", None, "out/toy/hh")
    >>> train_loop_per_worker({"spec": spec})
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from engine.chat import ChatTemplateError, has_chat_template, render_completion, render_prompt
from engine.models import add_lora, load_tokenizer, write_adapter_meta
from engine.placement import Placement, load_configured, resolve_placement
from engine.store import write_parquet
from engine.train_spec import FINAL_MARKER, METRICS_FILE, TrainSpec, publish_variant

IGNORE_INDEX = -100  # labels the loss skips: every prompt token and all padding
HF_CHECKPOINT = "checkpoint"  # RayTrainReportCallback.CHECKPOINT_NAME
METRIC_COLUMNS = {
    "step": pa.int64(),
    "epoch": pa.float64(),
    "loss": pa.float64(),
    "learning_rate": pa.float64(),
    "grad_norm": pa.float64(),
    "tokens_per_second": pa.float64(),
    "num_input_tokens_seen": pa.int64(),
    "time": pa.float64(),
}


class TrainDataError(ValueError):
    """Training data that cannot be used as given (names the file and row)."""


def tokenize_example(tokenizer, prompt: str, target: str, max_length: int, where: str = "example",
                     chat_template: bool = False) -> dict:
    """Token ids of prompt + target + eos, with labels only on target and eos.

    Prompt and target are tokenized separately, as at evaluation time the model sees the
    tokenized prompt alone and continues it; joint tokenization could merge tokens across
    the boundary and train on a split the model never meets. With `chat_template`, the prompt
    is the user turn rendered as evaluation renders it (`engine.chat.render_prompt`) and the
    target is the assistant's reply up to the template's end of turn, which replaces the eos.

    Raises:
        TrainDataError: the example is longer than `max_length` (truncating a long-context
            example would silently change what the variant teaches).
    """
    if not target.strip():
        raise TrainDataError(f"{where}: empty target")
    if chat_template:
        try:
            prompt_text, completion = render_prompt(tokenizer, prompt).text, render_completion(tokenizer, prompt, target)
        except ChatTemplateError as err:
            raise TrainDataError(f"{where}: {err}") from err
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(prompt_ids) + len(target_ids)
    if n > max_length:
        raise TrainDataError(f"{where}: {n} tokens exceed max_length={max_length}")
    return {
        "input_ids": prompt_ids + target_ids,
        "attention_mask": [1] * n,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def load_examples(path: str, tokenizer, max_length: int, chat_template: bool = False) -> list[dict]:
    """Reads a Parquet split (tasks.example SCHEMA; only `prompt` and `target` are used)."""
    try:
        table = pq.read_table(path, columns=None)
    except (OSError, pa.ArrowInvalid) as err:
        raise TrainDataError(f"{path}: cannot read Parquet: {err}") from err
    missing = [c for c in ("prompt", "target") if c not in table.column_names]
    if missing:
        raise TrainDataError(f"{path}: missing column(s) {', '.join(missing)}")
    if table.num_rows == 0:
        raise TrainDataError(f"{path}: no rows")
    rows = table.select(["prompt", "target"]).to_pylist()
    for i, row in enumerate(rows):
        if not isinstance(row["prompt"], str) or not isinstance(row["target"], str):
            raise TrainDataError(f"{path}: row {i}: prompt and target must be strings")
    return [tokenize_example(tokenizer, r["prompt"], r["target"], max_length, f"{path}: row {i}", chat_template)
            for i, r in enumerate(rows)]


def training_sets(spec: TrainSpec, tokenizer=None) -> tuple[object, list[dict], list[dict] | None]:
    """The tokenizer (padding on the right, so positions start at 0 in every training sequence)
    and the tokenized train and validation splits of `spec`, as the worker trains on them.

    Raises:
        TrainDataError: a split cannot be used (names the file and row).
    """
    if tokenizer is None:
        tokenizer = load_tokenizer(spec.model.path, trust_remote_code=spec.model.trust_remote_code)
    tokenizer.padding_side = "right"
    chat = has_chat_template(tokenizer) if spec.model.chat_template is None else spec.model.chat_template
    train_set = load_examples(spec.train_path, tokenizer, spec.train.max_length, chat)
    val_set = load_examples(spec.val_path, tokenizer, spec.train.max_length, chat) if spec.val_path else None
    return tokenizer, train_set, val_set


def training_arguments(spec: TrainSpec, output_dir: str, placement: Placement) -> TrainingArguments:
    """HF TrainingArguments for `spec`: the train section, mixed precision in the placement's
    16-bit dtype on a GPU, DeepSpeed when asked."""
    train = spec.train
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=train.weight_decay,
        lr_scheduler_type="linear",
        seed=spec.seed,
        data_seed=spec.seed,
        # the Trainer's autocast needs a GPU; on the CPU the weights' own dtype is the precision
        bf16=placement.on_gpu and placement.dtype == "bfloat16",
        fp16=placement.on_gpu and placement.dtype == "float16",
        use_cpu=not placement.on_gpu,
        deepspeed=dict(train.deepspeed) if train.deepspeed else None,
        activation_checkpointing=train.gradient_checkpointing,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=1,  # local scratch only; Ray keeps the checkpoints in storage
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",
    )


class StepMetrics(TrainerCallback):
    """Adds tokens/s to each logged step; rank 0 posts progress to the driver's board.

    tokens/s goes into `state.log_history`, which the Trainer checkpoints, so a resumed run's
    metrics still cover every step. Progress does not go through `ray.train.report`: that
    is a barrier across workers which, measured on Ray 2.60, cost ~1.9 s per call (it waits
    for the controller's poll), against ~12 ms for a tiny model's step; a fire-and-forget
    actor call costs nothing to the step.
    """

    def __init__(self, name: str, board=None):
        self.name, self.board = name, board
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.log_history:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        last_time, last_tokens = self._last or (now, tokens)
        self._last = (now, tokens)
        entry = state.log_history[-1]
        entry["tokens_per_second"] = (tokens - last_tokens) / max(now - last_time, 1e-9)
        entry["time"] = time.time()
        if self.board is not None and state.is_world_process_zero:
            self.board.post.remote(self.name, {
                "step": state.global_step,
                "max_steps": state.max_steps,
                "loss": float(logs["loss"]),
                "tokens_per_second": entry["tokens_per_second"],
            })


def write_metrics(log_history: list[dict], path: str | Path) -> None:
    """Per-step training metrics to Parquet, atomically (tmp file, then rename)."""
    rows = [e for e in log_history if "loss" in e and "step" in e]
    columns = {name: [r.get(name) for r in rows] for name in METRIC_COLUMNS}
    table = pa.table({name: pa.array(columns[name], type=kind) for name, kind in METRIC_COLUMNS.items()})
    write_parquet(table, path)


def _in_ray_train() -> bool:
    import ray.train

    try:
        ray.train.get_context()
    except (RuntimeError, DeprecationWarning):
        return False
    return True


def _world_rank(in_ray: bool) -> int:
    if in_ray:
        import ray.train

        return ray.train.get_context().get_world_rank()
    return 0


def train_loop_per_worker(config: dict) -> None:
    """Fine-tunes one variant on this worker (all workers run it; DDP or DeepSpeed joins them).

    Args:
        config: {"spec": the `TrainSpec`, "callbacks": optional extra
            `transformers.TrainerCallback`s, "progress_board": optional actor handle whose
            `post(name, progress)` receives rank 0's step, loss and tokens/s}.
    """
    spec: TrainSpec = config["spec"]
    train = spec.train
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    in_ray = _in_ray_train()
    rank = _world_rank(in_ray)
    placement = resolve_placement(spec.model, gpus=train.gpus_per_worker)

    tokenizer, train_set, val_set = training_sets(spec)

    set_seed(spec.seed)  # same LoRA initialisation on every rank
    # On the CPU here: the Trainer moves it to the worker's device (DeepSpeed, shard by shard).
    model = load_configured(spec.model, dataclasses.replace(placement, device="cpu"))
    if train.gradient_checkpointing:
        model.enable_input_require_grads()  # LoRA leaves the embeddings frozen
    model = add_lora(model, rank=train.lora_rank, alpha=train.lora_alpha, dropout=train.lora_dropout,
                     target=train.lora_target)

    callbacks = [StepMetrics(spec.name, config.get("progress_board")), *config.get("callbacks", ())]
    if in_ray:
        from ray.train.huggingface.transformers import RayTrainReportCallback

        callbacks.append(RayTrainReportCallback())

    # Each worker keeps its own scratch dir: rank 0 writes weights and optimizer state, every
    # rank its RNG state, and Ray merges the ranks' files into one checkpoint in storage.
    # The name is fixed per variant and rank so that a restart clears what a killed
    # attempt left behind.
    key = hashlib.sha1(str(Path(spec.out_dir).resolve()).encode()).hexdigest()[:10]
    scratch = str(Path(tempfile.gettempdir()) / "needlework-train" / f"{key}-rank{rank}")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    try:
        trainer = Trainer(
            model=model,
            args=training_arguments(spec, scratch, placement),
            train_dataset=train_set,
            eval_dataset=val_set,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)  # per-step prints; metrics go to Parquet instead
        if in_ray:
            from ray.train.huggingface.transformers import prepare_trainer

            trainer = prepare_trainer(trainer)
        started, started_at = time.perf_counter(), time.time()
        resumed_from = _fit(trainer, in_ray)
        if resumed_from is None:  # the latest checkpoint is already this run's final one
            return
        seconds = time.perf_counter() - started
        eval_loss = trainer.evaluate()["eval_loss"] if val_set else None

        final = Path(scratch) / "final"
        trainer.save_model(str(final))  # collective: gathers ZeRO-3 shards, rank 0 writes
        if rank == 0:
            for scratch_file in ("training_args.bin", "README.md"):  # a pickle and a model card
                (final / scratch_file).unlink(missing_ok=True)
            write_adapter_meta(trainer.model.config, final, spec.model.path)
            write_metrics(trainer.state.log_history, final / METRICS_FILE)
            losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
            summary = {
                "name": spec.name,
                "steps": trainer.state.global_step,
                "final_loss": losses[-1] if losses else math.nan,
                "eval_loss": eval_loss,
                "resumed_from_step": resumed_from,
                "train_seconds": seconds,
                "started_at": started_at,  # wall clock, to see which runs overlapped
                "finished_at": time.time(),
            }
            (final / FINAL_MARKER).write_text(json.dumps(summary, indent=2))
        _publish_final(final, rank, in_ray, spec)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _fit(trainer, in_ray: bool) -> int | None:
    """Trains, resuming from Ray's latest checkpoint; returns the step it resumed from.

    Returns None when the latest checkpoint is the final one (the run finished but its
    driver died before collecting it): the final checkpoint is re-reported unchanged.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint() if in_ray else None
    if checkpoint is None:
        trainer.train()
        return 0
    with checkpoint.as_directory() as ckpt_dir:
        if (Path(ckpt_dir) / FINAL_MARKER).exists():
            ray.train.report({"final": 1}, checkpoint=checkpoint if _world_rank(True) == 0 else None,
                             checkpoint_dir_name="final_again")
            return None
        hf_dir = Path(ckpt_dir) / HF_CHECKPOINT
        state = json.loads((hf_dir / "trainer_state.json").read_text())
        trainer.train(resume_from_checkpoint=str(hf_dir))
        return int(state["global_step"])


def _publish_final(final: Path, rank: int, in_ray: bool, spec: TrainSpec) -> None:
    if in_ray:
        import ray.train

        # Every rank must report; only rank 0 holds the files.
        checkpoint = ray.train.Checkpoint.from_directory(str(final)) if rank == 0 else None
        ray.train.report({"final": 1}, checkpoint=checkpoint, checkpoint_dir_name="final")
        return
    publish_variant(final, spec)
