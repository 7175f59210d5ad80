"""Pretrains the miniature base model once per spec and caches it.

A tiny Llama (GQA, RoPE) trained with the HF Trainer at a short context on the mix of
`corpus.py`, until it copies and answers by content there; it then fails at several times
that length, as an 8K instruct model fails at 32K. Two phases: short copy probes alone until
the content-based copy heads form (~800 steps at batch 32; DESIGN.md, "Embedded default"),
then a ramp over which the longest sequence grows to the context while lookup and task QA
join the copy probes, then the full mix. The defaults pass the check at 128 tokens in ~250 s
on 2 idle cores (`scripts/bench_miniature.py`).

The cache entry is keyed by a hash of the spec and the tokenizer's vocabulary, built in a
temporary directory and moved into place with one `os.replace`, under a file lock, so
concurrent demos pretrain once and a crash never leaves a half-written model.

Example:
    >>> path = ensure_base_model(MiniatureSpec())   # ~/.cache/needlework/miniature/<hash>
    >>> model = engine.models.load_model(str(path)); tokenizer = engine.models.load_tokenizer(str(path))
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .checks import retrieval_accuracy, summary
from .corpus import PretrainingMix, encode_qa, prompt_words, task_examples
from .sources import SourceSizes, render_sources, write_atomic
from .spec import MiniatureError, MiniatureSpec
from .tokenizer import build_tokenizer, vocabulary
from .world import build_world

FORMAT_VERSION = 6  # bump when the world, corpus or tokenizer code changes what a spec produces
META = "miniature.json"
SOURCES = "sources"
# The base model shipped with the repository (pretrained by `needlework miniature pretrain --ship`).
SHIPPED = Path(__file__).resolve().parents[2] / "data" / "miniature"
CHECKPOINT_STEPS = 500  # a killed pretraining resumes from here (not part of the recipe)
CURRICULUM = "curriculum.json"  # in the work directory: stage starts and gate checks so far


def default_cache_dir() -> Path:
    root = os.environ.get("NEEDLEWORK_CACHE")
    return Path(root) / "miniature" if root else Path.home() / ".cache" / "needlework" / "miniature"


# Spec fields that change what happens around the model, not the model itself.
NOT_IDENTITY = ("on_failed_check",)
CURRICULUM_FIELDS = ("stages", "gate_every", "gate_probes")


def spec_hash(spec: MiniatureSpec) -> str:
    """The identity of a base model: its recipe, the world's vocabulary and the recipe version.

    Not the tasks' code: editing how a task scores must not force a new pretraining. Code
    that changes what a recipe produces (the world, the corpus, the tokenizer) bumps
    `FORMAT_VERSION` instead.
    """
    recipe = {k: v for k, v in dataclasses.asdict(spec).items() if k not in NOT_IDENTITY}
    if not spec.stages:  # a recipe without a curriculum keeps the identity it had before there was one
        for key in CURRICULUM_FIELDS:
            recipe.pop(key)
    vocab = vocabulary(build_world(spec.seed))
    payload = json.dumps({"spec": recipe, "version": FORMAT_VERSION, "vocab": vocab}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def shipped_base(spec: MiniatureSpec, root: Path | None = None) -> Path | None:
    """The base model shipped with the repository (or at `root`), if it was pretrained from `spec`."""
    root = Path(root) if root is not None else SHIPPED
    meta = root / META
    if not meta.is_file():
        return None
    return root if json.loads(meta.read_text()).get("spec_hash") == spec_hash(spec) else None


def ensure_base_model(spec: MiniatureSpec | None = None, cache_dir: Path | None = None,
                      progress: bool = True) -> Path:
    """The base model of `spec`: the shipped one when its recipe is `spec`, else the cached
    one, pretrained first if missing.

    Args:
        spec: the miniature's settings (defaults: the shipped recipe).
        cache_dir: cache root; default $NEEDLEWORK_CACHE/miniature or ~/.cache/needlework/miniature.
        progress: show a progress bar (plain lines when not on a terminal) while pretraining.

    Returns:
        Directory with model.safetensors, config, tokenizer, `miniature.json` (spec, timings,
        gates, retrieval table) and `sources/` (the world rendered in the public task formats).
    """
    spec = spec or MiniatureSpec()
    shipped = shipped_base(spec)
    if shipped is not None:
        return shipped
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / spec_hash(spec)
    if (final / META).exists():
        return final
    with open(cache_dir / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the entry
        if (final / META).exists():
            return final
        publish_pretrained(spec, final, progress=progress)
    return final


def clear_stale_builds(cache_dir: Path) -> None:
    """Removes the `.tmp-<hash>-<pid>` build directories of pretrainings whose process is gone.

    A killed pretraining never reaches its own cleanup, and a later run only clears its own
    pid's directory, so without this each kill would leave a partial model behind for good.
    A directory whose process still runs (a concurrent pretraining of another spec) is kept.
    """
    for entry in cache_dir.glob(".tmp-*-*"):
        pid = entry.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:  # alive, owned by another user
            pass


def publish_pretrained(spec: MiniatureSpec, final: Path, progress: bool = True) -> dict:
    """Pretrains `spec` and moves the result to `final` in one rename.

    Training checkpoints go to `final`'s sibling `.work-<name>`, which survives a crash or a
    kill: the next call resumes from its last checkpoint and removes it once the model is in
    place (or once the model missed a gate, which a rerun would repeat). The caller holds the
    lock of `final`.
    """
    work = final.parent / f".work-{final.name}"
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    clear_stale_builds(final.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta = pretrain(spec, tmp, progress=progress, work_dir=work)
        if final.exists():  # an incomplete leftover without META, or the entry being replaced
            shutil.rmtree(final)
        os.replace(tmp, final)
    except MiniatureError:
        shutil.rmtree(work, ignore_errors=True)  # a missed gate is this recipe's result: nothing to resume
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return meta


def sources_of(model_dir: Path, cache_dir: Path | None = None) -> dict[str, dict[str, str]]:
    """The world of a miniature base model rendered in the public task formats, as absolute paths.

    A cached base keeps them beside its weights; the shipped base does not (they are ~10 MB
    of text that its recipe renders the same every time), so they are rendered once into
    the cache, `<cache>/sources-<spec hash>`, in one rename.
    """
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META).read_text())
    root = model_dir / SOURCES
    if not root.is_dir():
        spec = MiniatureSpec(**meta["spec"])
        cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        root = cache_dir / f"sources-{meta['spec_hash']}"
        if not root.is_dir():
            cache_dir.mkdir(parents=True, exist_ok=True)
            with open(cache_dir / f".{root.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not root.is_dir():
                    tmp = cache_dir / f".tmp-{root.name}-{os.getpid()}"
                    shutil.rmtree(tmp, ignore_errors=True)
                    try:
                        render_sources(build_world(spec.seed), tmp, source_sizes(spec))
                        os.replace(tmp, root)
                    finally:
                        shutil.rmtree(tmp, ignore_errors=True)
    return {task: {k: str(root / p) for k, p in paths.items()} for task, paths in meta["sources"].items()}


def llama_config(spec: MiniatureSpec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads,
        head_dim=spec.head_dim or spec.hidden // spec.n_heads,
        max_position_embeddings=spec.context * 32,
        rope_parameters={"rope_type": "default", "rope_theta": float(spec.rope_base)},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def train_model(spec: MiniatureSpec, tokenizer, mix, work_dir: Path, progress: bool = True,
                callbacks: tuple = ()):
    """Trains a fresh Llama on `mix` with the HF Trainer; returns the model.

    Checkpoints every `CHECKPOINT_STEPS` into `work_dir/trainer` and resumes from the last one
    found there (the mix, the RoPE jitter and the Trainer's RNG state are all seeded by step,
    so a resumed run continues the same trajectory). `callbacks` are extra
    `TrainerCallback`s (the benchmark checks retrieval while training).
    """
    from transformers import DataCollatorForSeq2Seq, LlamaForCausalLM, PrinterCallback, Trainer, TrainingArguments

    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(llama_config(spec, tokenizer))
    tokenizer.padding_side = "right"  # causal training: pads after the labels, never attended
    args = TrainingArguments(
        output_dir=str(work_dir / "trainer"),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.lr,
        warmup_steps=spec.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        logging_steps=max(1, spec.steps // 20),
        save_strategy="steps",
        save_steps=CHECKPOINT_STEPS,
        save_total_limit=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=spec.seed,
        dataloader_num_workers=0,
        log_level="warning",
        # The mix draws whole batches (one kind, one length) in two phases: read in order.
        train_sampling_strategy="sequential",
    )
    callbacks = ([rich_progress(spec.steps)] if progress else []) + list(callbacks)
    if spec.rope_jitter > 1:  # first, so that other callbacks' checks see the real base
        callbacks.insert(0, rope_jitter_callback(spec))
    trainer = Trainer(model=model, args=args, train_dataset=mix, callbacks=callbacks,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    # Only the rich bar reports progress: the default printer would dump every log dict.
    trainer.remove_callback(PrinterCallback)
    resume = any((work_dir / "trainer").glob("checkpoint-*"))
    # The checkpoints are this pretraining's own files (the optimizer and RNG state are torch
    # pickles, which the Trainer loads itself); nothing from elsewhere is read.
    trainer.train(resume_from_checkpoint=True if resume else None)
    shutil.rmtree(work_dir / "trainer", ignore_errors=True)
    return model.eval()


def source_sizes(spec: MiniatureSpec) -> SourceSizes:
    """Source record counts: enough train records that the QA part of the corpus holds
    `qa_per_task` distinct examples per task. With fewer, each example recurs dozens of
    times and the model memorizes the training prompts instead of learning to retrieve
    (measured: exact MDQA answers 0.23 on training prompts, 0.02 on held-out ones)."""
    base = SourceSizes()
    per_topic = base.summhay_insights
    return dataclasses.replace(base, mdqa_train=max(base.mdqa_train, spec.qa_per_task),
                               musique_train=max(base.musique_train, spec.qa_per_task),
                               summhay_train=max(base.summhay_train, -(-spec.qa_per_task // per_topic)))


def rope_jitter_callback(spec: MiniatureSpec):
    """From `rope_jitter_from` (default: after phase 1), trains half the steps (drawn by a
    generator seeded by step) at a RoPE base drawn log-uniformly from [rope_base,
    rope_base * rope_jitter], the rest at `rope_base`.

    Positions never exceed the context, so the model still fails beyond it; what it learns is
    to keep attending by content when the angles of its positions shrink, as a raised base
    makes them shrink. Measured without it: raising the base 10,000 -> 80,000 drops copy
    accuracy at 64 tokens from 0.97 to 0.13 before any fine-tuning.
    """
    from transformers import TrainerCallback

    from engine.models import with_rope_base

    def set_base(model, base: float) -> None:
        rotary = model.model.rotary_emb
        config = with_rope_base(copy.deepcopy(model.config), base)
        rotary.inv_freq.copy_(rotary.compute_default_rope_parameters(config)[0])

    def restore(model) -> None:
        rotary = model.model.rotary_emb
        rotary.inv_freq.copy_(rotary.original_inv_freq)

    class RopeJitter(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            rng = random.Random(f"{spec.seed}/rope/{state.global_step}")
            first = spec.phase1_steps if spec.rope_jitter_from is None else spec.rope_jitter_from
            if state.global_step >= first and rng.random() < 0.5:
                set_base(model, spec.rope_base * math.exp(rng.random() * math.log(spec.rope_jitter)))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            restore(model)  # checks and saves between steps see the real base

        def on_train_end(self, args, state, control, model=None, **kwargs):
            restore(model)

    return RopeJitter()


def curriculum_callback(spec: MiniatureSpec, tokenizer, sources: dict, mix, work_dir: Path, log: list):
    """Ends each curriculum stage when its gate passes (`spec.Stage`), every `gate_every` steps.

    The gate of the stage the last step trained in is measured on the model as it is: copy
    accuracy at random depths at the stage's longest length (`gate_probes` probes), or
    teacher-forced exact answers on `gate_probes` held-out prompts of its task at that length
    (evaluation-split subjects, seed + 2: other prompts than the final gates' seed + 1). The
    stage starts and checks are kept in `work_dir/curriculum.json`, so a resumed run switches
    where the first one did; `log` receives every check.
    """
    from transformers import TrainerCallback

    from .checks import answer_accuracy

    state_file = work_dir / CURRICULUM
    examples: dict[int, dict] = {}

    def measure(model, stage) -> float:
        longest = stage.longest or spec.context
        if stage.gate == "copy":
            value = summary(retrieval_accuracy(model, tokenizer, [longest], n=spec.gate_probes,
                                               seed=spec.seed + 2))[longest]
        else:
            if longest not in examples:
                examples[longest] = task_examples(tokenizer, sources, longest, spec.gate_probes, spec.seed + 2,
                                                  split="eval")
            value = answer_accuracy(model, tokenizer, examples[longest][stage.gate])
        model.train()
        return value

    class Curriculum(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state_file.is_file():
                saved = json.loads(state_file.read_text())
                mix.starts[:] = saved["starts"]
                log[:] = [c for c in saved["checks"] if c["step"] <= state.global_step]

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            stage = mix.stage_of(step - 1)  # the stage of the batch just trained
            if step % spec.gate_every or stage is None or stage == len(spec.stages):
                return
            current = spec.stages[stage]
            if current.gate is None or len(mix.starts) > stage + 1:  # no gate, or already ended
                return
            value = measure(model, current)
            log.append({"step": step, "stage": current.name, "gate": current.gate, "value": value})
            if value >= current.bar:
                start = mix.end_stage(stage)
                if start is not None:
                    print(f"pretraining miniature: stage {current.name!r} passed its gate ({current.gate} "
                          f"{value:.2f} >= {current.bar:g}) at step {step}; the next starts at step {start}",
                          file=sys.stderr, flush=True)
            write_atomic(state_file, json.dumps({"starts": mix.starts, "checks": log}))

    return Curriculum()


def curriculum_record(spec: MiniatureSpec, mix, log: list) -> dict:
    """Each stage's steps and whether its gate passed, with every check, for `miniature.json`."""
    stages = []
    for k, stage in enumerate(spec.stages):
        start = mix.starts[k] if k < len(mix.starts) else None
        end = mix.starts[k + 1] if k + 1 < len(mix.starts) else None
        checks = [c for c in log if c["stage"] == stage.name]
        stages.append({"name": stage.name, "gate": stage.gate, "bar": stage.bar, "start": start, "end": end,
                       "passed": any(c["value"] >= stage.bar for c in checks),
                       "last": checks[-1]["value"] if checks else None})
    final = mix.starts[len(spec.stages)] if len(mix.starts) > len(spec.stages) else None
    return {"stages": stages, "final_mix_start": final, "checks": log}


def format_curriculum(record: dict) -> str:
    """A markdown table of the curriculum: each stage's steps, gate and last check."""
    lines = ["| stage | steps | gate | last check | passed |", "|---|---|---|---|---|"]
    for s in record["stages"]:
        steps = "not reached" if s["start"] is None else f"{s['start']}-{'' if s['end'] is None else s['end']}"
        gate = "none" if s["gate"] is None else f"{s['gate']} >= {s['bar']:g}"
        last = "-" if s["last"] is None else f"{s['last']:.2f}"
        lines.append(f"| {s['name']} | {steps} | {gate} | {last} | {s['passed']} |")
    return "\n".join(lines)


def rich_progress(total: int, every_s: float = 30.0):
    """Pretraining progress: a rich bar with a time estimate on a terminal, else (a log, `ray
    job logs`) a plain line every `every_s` seconds: step, elapsed, estimate left, loss."""
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.tty, self.loss = sys.stderr.isatty(), ""
            self.started = self.printed = time.perf_counter()
            self.first = state.global_step  # a resumed run estimates from its own pace
            if self.tty:
                self.bar = Progress(TextColumn("pretraining miniature"), BarColumn(), TextColumn("{task.fields[loss]}"),
                                    TimeElapsedColumn(), TimeRemainingColumn())
                self.task = self.bar.add_task("pretrain", total=total, loss="", completed=state.global_step)
                self.bar.start()

        def on_step_end(self, args, state, control, **kwargs):
            if self.tty:
                self.bar.update(self.task, completed=state.global_step)
                return
            now = time.perf_counter()
            if now - self.printed >= every_s or state.global_step == total:
                self.printed = now
                done = max(1, state.global_step - self.first)
                left = (now - self.started) / done * (total - state.global_step)
                print(f"pretraining miniature: step {state.global_step}/{total}, {now - self.started:.0f} s elapsed, "
                      f"~{left:.0f} s left{', ' + self.loss if self.loss else ''}", file=sys.stderr, flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = f"loss {logs['loss']:.3f}"
                if self.tty:
                    self.bar.update(self.task, loss=self.loss)

        def on_train_end(self, args, state, control, **kwargs):
            if self.tty:
                self.bar.stop()

    return RichProgress()


def pretrain(spec: MiniatureSpec, out_dir: Path, progress: bool = True, callbacks: tuple = (),
             work_dir: Path | None = None) -> dict:
    """Renders the world, builds the tokenizer, pretrains and measures the gates; writes all to `out_dir`.

    Args:
        spec: the recipe.
        out_dir: where the model, tokenizer, sources and `miniature.json` go.
        progress: show progress while training.
        callbacks: extra `TrainerCallback`s.
        work_dir: where training checkpoints go (and are resumed from); default `out_dir`.

    Raises:
        MiniatureError: the base misses a competence gate (`gates.py`) and `spec.on_failed_check`
            is "raise"; head analyses on such a model would mean nothing.
    """
    from .gates import format_gates, measure_gates

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work_dir) if work_dir is not None else out_dir
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        world = build_world(spec.seed)
        sources = render_sources(world, out_dir / SOURCES, source_sizes(spec))
        # Two passes: the tasks' prompt words join the vocabulary, then the QA is built with it.
        words = prompt_words(build_tokenizer(world), sources, spec.seed)
        tokenizer = build_tokenizer(world, out_dir, extra_texts=(" ".join(words),))
        pairs = task_examples(tokenizer, sources, spec.context, spec.qa_per_task, spec.seed)
        qa = encode_qa(tokenizer, [p for task in pairs.values() for p in task])
        mix = PretrainingMix(tokenizer, qa, spec.context, spec.steps * spec.batch_size, spec.seed,
                             weights=spec.mix, max_span=spec.max_span, batch_size=spec.batch_size,
                             phase1=spec.phase1_steps, phase1_length=spec.phase1_length,
                             ramp=spec.ramp_steps, world=world, lm_share=spec.lm_share, stages=spec.stages)
        prepared, cpu_prepared = time.perf_counter(), time.process_time()
        checks: list = []
        if spec.stages:
            work_dir.mkdir(parents=True, exist_ok=True)
            callbacks = (curriculum_callback(spec, tokenizer, sources, mix, work_dir, checks), *callbacks)
        model = train_model(spec, tokenizer, mix, work_dir, progress, callbacks)
        trained, cpu_trained = time.perf_counter(), time.process_time()
        rows = retrieval_accuracy(model, tokenizer, [spec.context, 4 * spec.context], n=spec.check_probes,
                                  seed=spec.seed + 1)
        gates = measure_gates(model, tokenizer, sources, spec.context, n=spec.check_probes, seed=spec.seed + 1,
                              copy_min=spec.min_accuracy)
        checked = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    if not gates["passed"]:
        message = (f"the miniature pretrained from this recipe ({spec.steps} steps) misses its competence "
                   f"gates at its own length {spec.context}:\n{format_gates(gates)}")
        if spec.stages:
            message += "\n" + format_curriculum(curriculum_record(spec, mix, checks))
        if spec.on_failed_check == "raise":
            raise MiniatureError(message)
        warnings.warn(message + "\nKept (on_failed_check: warn); head analyses of this model are flagged.")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(str(out_dir))
    accuracy = summary(rows)
    meta = {
        "spec": dataclasses.asdict(spec),
        "spec_hash": spec_hash(spec),
        "version": FORMAT_VERSION,
        "qa_examples": len(qa),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": {"prepare": prepared - start, "train": trained - prepared, "check": checked - trained},
        # CPU seconds of this process: wall time on a shared machine says little about an idle one.
        "cpu_seconds": {"prepare": cpu_prepared - cpu_start, "train": cpu_trained - cpu_prepared},
        "load_average": os.getloadavg(),
        "retrieval": rows,
        "check": {"length": spec.context, "accuracy": accuracy[spec.context], "min_accuracy": spec.min_accuracy,
                  "passed": gates["passed"]},
        "gates": gates,
        **({"curriculum": curriculum_record(spec, mix, checks)} if spec.stages else {}),
        "sources": {task: {k: str(Path(p).relative_to(out_dir / SOURCES)) for k, p in paths.items()}
                    for task, paths in sources.items()},
    }
    write_atomic(out_dir / META, json.dumps(meta, indent=2))
    (work_dir / CURRICULUM).unlink(missing_ok=True)
    return meta
