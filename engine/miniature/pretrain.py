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

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import format_table, retrieval_accuracy, summary
from .corpus import PretrainingMix, encode_qa, prompt_words, task_examples
from .sources import SourceSizes, render_sources, write_atomic
from .tokenizer import build_tokenizer, vocabulary
from .world import build_world

FORMAT_VERSION = 5  # bump when the corpus or the model recipe changes what a spec produces
META = "miniature.json"
SOURCES = "sources"


class MiniatureError(RuntimeError):
    """The pretrained miniature does not retrieve by content at its own length."""


@dataclass(frozen=True)
class MiniatureSpec:
    """Everything that determines the miniature base model (the cache key).

    Attributes:
        seed: world and training seed.
        n_layers / n_heads / n_kv_heads / hidden / intermediate: Llama dimensions (GQA).
        head_dim: per-head width (default hidden / n_heads). RoPE rotates head_dim / 2
            frequency pairs; with few pairs, raising the base moves even the fast ones a lot.
        context: pretraining length in tokens.
        rope_base: RoPE base during pretraining.
        steps / batch_size / lr / warmup_steps: optimization (`steps` counts both phases).
        phase1_steps: first steps on short copy probes alone, where the copy heads form.
        phase1_length: longest sequence in phase 1.
        ramp_steps: steps after phase 1 over which the longest length grows to `context` and
            the mix moves from copy alone to `mix`.
        mix: weights of (copy, lookup, drill, QA) sequences after phase 1, at lengths up to `context`.
        rope_jitter: after phase 1, every other step on average trains at a RoPE base drawn
            log-uniformly from [rope_base, rope_base * rope_jitter] (1: off); the rest, and the
            saved model, keep `rope_base`.
            A large model tolerates a raised base at its own length; a tiny one with few
            frequency pairs does not unless trained to (see `rope_jitter_callback`).
        max_span: longest copied span.
        qa_per_task: distinct short real-variant examples per task in the QA part of the
            corpus; the rendered sources grow to hold them (`source_sizes`).
        min_accuracy: copy accuracy required at `context` (random depths).
        check_probes: probes per length in the final check.
        threads: torch threads while pretraining.
    """

    seed: int = 0
    n_layers: int = 3
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    hidden: int = 128
    intermediate: int = 384
    context: int = 128
    rope_base: float = 10000.0
    steps: int = 2400
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    phase1_steps: int = 800
    phase1_length: int = 96
    ramp_steps: int = 800
    mix: tuple[float, float, float, float] = (0.3, 0.05, 0.0, 0.65)
    rope_jitter: float = 1.0
    max_span: int = 32
    qa_per_task: int = 1000
    min_accuracy: float = 0.9
    on_failed_check: str = "raise"  # or "warn": keep the model, flag it in miniature.json and the report
    check_probes: int = 64
    threads: int = 2

    def __post_init__(self):
        # YAML gives lists, and ints where floats are meant (`rope_jitter: 32`); the spec must
        # stay hashable and hash the same either way, or an equal spec pretrains again.
        object.__setattr__(self, "mix", tuple(float(w) for w in self.mix))
        for f in dataclasses.fields(self):
            if f.type == "float":  # annotations are strings here (from __future__ import annotations)
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
        if self.on_failed_check not in ("raise", "warn"):
            raise ValueError(f"miniature.on_failed_check: {self.on_failed_check!r}; choose 'raise' or 'warn'")
        if self.n_heads % self.n_kv_heads or self.hidden % self.n_heads:
            raise ValueError(f"miniature: hidden {self.hidden}, heads {self.n_heads}, kv heads "
                             f"{self.n_kv_heads} do not divide evenly")


def default_cache_dir() -> Path:
    root = os.environ.get("NEEDLEWORK_CACHE")
    return Path(root) / "miniature" if root else Path.home() / ".cache" / "needlework" / "miniature"


def spec_hash(spec: MiniatureSpec) -> str:
    """Hash of the spec, the recipe version, the world's vocabulary and the tasks' code.

    The tasks' code shapes the QA part of the corpus and the prompt words of the tokenizer.
    """
    import tasks

    vocab = vocabulary(build_world(spec.seed))
    task_code = hashlib.sha256()
    for path in sorted(Path(tasks.__file__).parent.glob("*.py")):
        task_code.update(path.read_bytes())
    payload = json.dumps({"spec": dataclasses.asdict(spec), "version": FORMAT_VERSION, "vocab": vocab,
                          "tasks": task_code.hexdigest()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure_base_model(spec: MiniatureSpec | None = None, cache_dir: Path | None = None,
                      progress: bool = True) -> Path:
    """The cached base model of `spec`, pretrained first if missing.

    Args:
        spec: the miniature's settings (defaults: the demo's).
        cache_dir: cache root; default $NEEDLEWORK_CACHE/miniature or ~/.cache/needlework/miniature.
        progress: show a rich progress bar while pretraining.

    Returns:
        Directory with model.safetensors, config, tokenizer, `miniature.json` (spec, timings,
        retrieval table) and `sources/` (the world rendered in the public task formats).
    """
    spec = spec or MiniatureSpec()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / spec_hash(spec)
    if (final / META).exists():
        return final
    with open(cache_dir / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the entry
        clear_stale_builds(cache_dir)
        if (final / META).exists():
            return final
        tmp = cache_dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            pretrain(spec, tmp, progress=progress)
            if final.exists():  # an incomplete leftover without META
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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


def sources_of(model_dir: Path) -> dict[str, dict[str, str]]:
    """The rendered task sources stored with a miniature base model, as absolute paths."""
    meta = json.loads((Path(model_dir) / META).read_text())
    return {task: {k: str(Path(model_dir) / SOURCES / p) for k, p in paths.items()}
            for task, paths in meta["sources"].items()}


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

    `callbacks` are extra `TrainerCallback`s (the benchmark checks retrieval while training).
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
        save_strategy="no",
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
    trainer.train()
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
    """After phase 1, trains half the steps (drawn by a generator seeded by step) at a RoPE
    base drawn log-uniformly from [rope_base, rope_base * rope_jitter], the rest at `rope_base`.

    Positions never exceed the context, so the model still fails beyond it; what it learns is
    to keep attending by content when the angles of its positions shrink, as a raised base
    makes them shrink. Measured without it: raising the base 10,000 -> 80,000 drops copy
    accuracy at 64 tokens from 0.97 to 0.13 before any fine-tuning.
    """
    import copy
    import math
    import random

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
            if state.global_step >= spec.phase1_steps and rng.random() < 0.5:
                set_base(model, spec.rope_base * math.exp(rng.random() * math.log(spec.rope_jitter)))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            restore(model)  # checks and saves between steps see the real base

        def on_train_end(self, args, state, control, model=None, **kwargs):
            restore(model)

    return RopeJitter()


def rich_progress(total: int):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = Progress(TextColumn("pretraining miniature"), BarColumn(), TextColumn("{task.fields[loss]}"),
                                TimeElapsedColumn(), TimeRemainingColumn())
            self.task = self.bar.add_task("pretrain", total=total, loss="")
            self.bar.start()

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.update(self.task, loss=f"loss {logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.stop()

    return RichProgress()


def pretrain(spec: MiniatureSpec, out_dir: Path, progress: bool = True, callbacks: tuple = ()) -> dict:
    """Renders the world, builds the tokenizer, pretrains and checks; writes all to `out_dir`.

    Raises:
        MiniatureError: copy accuracy at `spec.context` (random depths) is below
            `spec.min_accuracy`; head analyses on such a model would mean nothing.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
                             ramp=spec.ramp_steps, world=world)
        prepared, cpu_prepared = time.perf_counter(), time.process_time()
        model = train_model(spec, tokenizer, mix, out_dir, progress, callbacks)
        trained, cpu_trained = time.perf_counter(), time.process_time()
        rows = retrieval_accuracy(model, tokenizer, [spec.context, 4 * spec.context], n=spec.check_probes,
                                  seed=spec.seed + 1)
        checked = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    accuracy = summary(rows)
    passed = accuracy[spec.context] >= spec.min_accuracy
    if not passed:
        message = (f"miniature pretraining ({spec.steps} steps) copies at random depths with accuracy "
                   f"{accuracy[spec.context]:.2f} < {spec.min_accuracy} at its own length {spec.context}; "
                   f"raise `phase1_steps` (copy heads not formed) or `steps`.\n{format_table(rows)}")
        if spec.on_failed_check == "raise":
            raise MiniatureError(message)
        warnings.warn(message + "\nKept (on_failed_check: warn); head analyses of this model are flagged.")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(str(out_dir))
    meta = {
        "spec": dataclasses.asdict(spec),
        "version": FORMAT_VERSION,
        "qa_examples": len(qa),
        "seconds": {"prepare": prepared - start, "train": trained - prepared, "check": checked - trained},
        # CPU seconds of this process: wall time on a shared machine says little about an idle one.
        "cpu_seconds": {"prepare": cpu_prepared - cpu_start, "train": cpu_trained - cpu_prepared},
        "load_average": os.getloadavg(),
        "retrieval": rows,
        "check": {"length": spec.context, "accuracy": accuracy[spec.context], "min_accuracy": spec.min_accuracy,
                  "passed": passed},
        "sources": {task: {k: str(Path(p).relative_to(out_dir / SOURCES)) for k, p in paths.items()}
                    for task, paths in sources.items()},
    }
    write_atomic(out_dir / META, json.dumps(meta, indent=2))
    return meta
