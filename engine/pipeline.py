"""`needlework run EXP.yaml`: data -> train -> evaluate -> knockout -> patching -> report.

Reads top to bottom like a recipe: load the config, run each stage, write the report. Each
stage reads the run directory, skips every output whose input hash is already recorded in
the manifest, runs the rest and records them. Re-running a finished experiment runs nothing;
changing one variant's setting re-runs only what depends on it.

Example:
    >>> run_experiment(load_experiment("experiments/demo.yaml"))
    PosixPath('runs/demo/report/report.md')
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console

from engine import config as cfg
from engine.config import Experiment, Run
from engine.store import RunStore, read_json, write_json

console = Console(stderr=True)


# ----------------------------------------------------------------------------- paths


def data_dir(store: RunStore, run: Run) -> Path:
    return store.path("data", run.task, "real" if run.variant == "base" else run.variant)


def model_dir(store: RunStore, run: Run) -> Path | None:
    return store.path("models", run.task, run.label) if run.fine_tuned else None


def real_eval_path(store: RunStore, task: str) -> Path:
    """The real task's evaluation set, shared by every variant of the task and by `base`."""
    return store.path("data", task, "real", "eval.parquet")


def eval_dir(store: RunStore, run: Run, split: str) -> Path:
    return store.path("eval", run.task, run.label, split)


def base_model_path(experiment: Experiment, show_progress: bool = True) -> str:
    """The base model: a local path or hub id, a fetchable model (fetched once, cached), or the
    bundled miniature (pretrained once, cached)."""
    if experiment.model.path != "miniature":
        from engine.model_sources import resolve_model

        local = Path(resolve_model(experiment.model.path))
        # A local checkpoint by absolute path (workers run elsewhere); anything else is a hub id.
        return str(local.resolve()) if local.exists() else experiment.model.path
    from engine.miniature import ensure_base_model

    return str(ensure_base_model(experiment.miniature, progress=show_progress))


@functools.lru_cache(maxsize=8)
def _tokenizer_has_template(base_model: str, trust_remote_code: bool) -> bool:
    from engine.chat import has_chat_template
    from engine.models import load_tokenizer

    return has_chat_template(load_tokenizer(base_model, trust_remote_code=trust_remote_code))


def chat_template(experiment: Experiment, base_model: str) -> bool:
    """Whether prompts go through the tokenizer's chat template: `model.chat_template`, or by
    default whether the tokenizer has one."""
    has = _tokenizer_has_template(base_model, experiment.model.trust_remote_code)
    wanted = experiment.model.chat_template
    if wanted and not has:
        from engine.models import ModelError

        raise ModelError(f"{experiment.source_file}: model.chat_template is true, but the tokenizer of "
                         f"{base_model} has no chat template")
    return has if wanted is None else wanted


def head_kind(experiment: Experiment, task: str) -> str:
    from tasks import get_task

    return experiment.task(task).head_kind or getattr(get_task(task), "HEAD_KIND", "retrieval")


# ----------------------------------------------------------------------------- stages


def build_data(experiment: Experiment, store: RunStore, runs: Sequence[Run], base_model: str) -> None:
    from engine.data import build_task_data
    from engine.models import load_tokenizer

    tokenizer = load_tokenizer(base_model, trust_remote_code=experiment.model.trust_remote_code)
    synth = None
    todo = {}
    for run in runs:
        variant = "real" if run.variant == "base" else run.variant
        todo[(run.task, variant)] = dataclasses.replace(run, variant=variant)
    for task in experiment.tasks:  # the real task's evaluation set is always needed
        todo.setdefault((task.name, "real"), Run(task.name, "real", experiment.seeds[0]))
    for (task_name, variant), run in sorted(todo.items(), key=lambda kv: (kv[0][0], kv[0][1] != "real", kv[0][1])):
        key, digest = f"data/{task_name}/{variant}", cfg.data_hash(experiment, run)
        if store.is_done(key, digest):
            continue
        task = experiment.task(task_name)
        if variant in cfg.SYNTHETIC_VARIANTS and synth is None:
            synth = make_synth(experiment, store)
        options = cfg.task_options(task, variant)
        sources = task.sources or bundled_sources(experiment, base_model).get(task_name, {})
        console.print(f"[bold]data[/] {task_name}/{variant}: {task.n_train} train, target {task.target_tokens} tokens")
        out = data_dir(store, run)
        build_task_data(
            task_name,
            variant,
            sources=sources,
            options=options,
            tokenizer=tokenizer,
            target_tokens=task.target_tokens,
            n_train=task.n_train,
            n_eval=task.n_eval,
            seed=experiment.seeds[0],
            out_dir=out,
            synth=synth if variant in cfg.SYNTHETIC_VARIANTS else None,
        )
        store.mark_done(key, digest, out)


def bundled_sources(experiment: Experiment, base_model: str) -> dict[str, dict[str, str]]:
    """The miniature's world rendered in the public task formats, for tasks that name no sources."""
    if experiment.model.path != "miniature":
        return {}
    from engine.miniature import sources_of

    return sources_of(Path(base_model))


def make_synth(experiment: Experiment, store: RunStore):
    from engine.synth import make_synthesizer

    return make_synthesizer(experiment.synth, store.path("synth_cache"))


def train_models(experiment: Experiment, store: RunStore, runs: Sequence[Run], base_model: str) -> None:
    from engine.train import TrainSpec, train_all

    specs, keys = [], []
    for run in runs:
        if not run.fine_tuned:
            continue
        key, digest = f"train/{run.task}/{run.label}", cfg.train_hash(experiment, run)
        if store.is_done(key, digest):
            continue
        train = cfg.train_config(experiment, run)
        data = data_dir(store, run)
        fields = {f.name for f in dataclasses.fields(TrainSpec)}
        settings = {k: v for k, v in dataclasses.asdict(train).items() if k in fields}
        specs.append(
            TrainSpec(
                name=f"{run.task}/{run.label}",
                base_model=base_model,
                train_path=str(data / "train.parquet"),
                val_path=str(data / "val.parquet"),
                out_dir=str(model_dir(store, run)),
                rope_base=experiment.model.rope_base,
                sliding_window=experiment.model.sliding_window,
                seed=run.seed,
                trust_remote_code=experiment.model.trust_remote_code,
                chat_template=chat_template(experiment, base_model),
                **settings,
            )
        )
        keys.append((key, digest, model_dir(store, run)))
    if not specs:
        return
    console.print(f"[bold]train[/] {len(specs)} variant(s): {', '.join(s.name for s in specs)}")
    train_all(specs, max_concurrent=experiment.train.max_concurrent)
    for key, digest, out in keys:
        store.mark_done(key, digest, out)


def model_ref(experiment: Experiment, store: RunStore, run: Run, base_model: str):
    from engine.evaluate import ModelRef

    adapter = model_dir(store, run)
    return ModelRef(
        base_model=base_model,
        adapter_dir=str(adapter) if adapter else None,
        rope_base=experiment.model.rope_base,
        sliding_window=experiment.model.sliding_window,
        trust_remote_code=experiment.model.trust_remote_code,
    )


def decode_settings(experiment: Experiment, base_model: str) -> dict:
    """The decoding settings knockout and patching share with the evaluation stage."""
    e = experiment.evaluate
    return dict(pool=pool_config(experiment), batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                limit=e.limit, chat_template=chat_template(experiment, base_model))


def pool_config(experiment: Experiment):
    from engine.evaluate import PoolConfig

    e = experiment.evaluate
    return PoolConfig(
        num_actors=e.num_actors,
        cpus_per_actor=e.cpus_per_actor,
        gpus_per_actor=e.gpus_per_actor,
        shard_size=e.shard_size,
        max_retries=e.max_retries,
    )


def evaluate_models(experiment: Experiment, store: RunStore, runs: Sequence[Run], base_model: str) -> None:
    """Every model on the real task's evaluation set (F1) and on its own validation set (H_X)."""
    from engine.evaluate import EvalJob, run_jobs

    jobs, keys = [], []
    e = experiment.evaluate
    for run in runs:
        for split in ("real", "own"):
            key, digest = f"evaluate/{run.task}/{run.label}/{split}", cfg.eval_hash(experiment, run, split)
            if store.is_done(key, digest):
                continue
            data = real_eval_path(store, run.task) if split == "real" else data_dir(store, run) / "val.parquet"
            out = eval_dir(store, run, split)
            jobs.append(
                EvalJob(
                    name=f"{run.task}/{run.label}/{split}",
                    model=model_ref(experiment, store, run, base_model),
                    task=run.task,
                    data_path=str(data),
                    out_dir=str(out),
                    score_heads=True,
                    max_new_tokens=e.max_new_tokens,
                    batch_size=e.batch_size,
                    insight_strict=e.insight_strict,
                    limit=e.limit,
                    chat_template=chat_template(experiment, base_model),
                )
            )
            keys.append((key, digest, out))
    if not jobs:
        return
    console.print(f"[bold]evaluate[/] {len(jobs)} job(s)")
    run_jobs(jobs, pool_config(experiment))
    for key, digest, out in keys:
        store.mark_done(key, digest, out)


def run_knockouts(experiment: Experiment, store: RunStore, runs: Sequence[Run], base_model: str) -> None:
    from analyses.knockout import run_knockout

    k = experiment.knockout
    if not k.enabled:
        return
    for run in runs:
        if run.variant not in k.variants:
            continue
        key, digest = f"knockout/{run.task}/{run.label}", knockout_hash(experiment, run)
        if store.is_done(key, digest):
            continue
        out = store.path("knockout", run.task, run.label)
        console.print(f"[bold]knockout[/] {run.task}/{run.label}: k in {list(k.ks)}, {len(k.seeds)} random seeds")
        run_knockout(
            model=model_ref(experiment, store, run, base_model),
            task=run.task,
            head_scores=str(eval_dir(store, run, "own") / "head_scores.parquet"),
            kind=head_kind(experiment, run.task),
            data_path=str(real_eval_path(store, run.task)),
            ks=k.ks,
            seeds=k.seeds,
            out_dir=str(out),
            **decode_settings(experiment, base_model),
        )
        store.mark_done(key, digest, out)


def run_patchings(experiment: Experiment, store: RunStore, runs: Sequence[Run], base_model: str) -> None:
    from analyses.patching import run_patching

    p = experiment.patching
    if not p.enabled:
        return
    for run in runs:
        source = patch_source(experiment, runs, run)
        if source is None:
            continue
        key, digest = f"patching/{run.task}/{run.label}", patching_hash(experiment, run, source)
        if store.is_done(key, digest):
            continue
        out = store.path("patching", run.task, run.label)
        console.print(f"[bold]patching[/] {run.task}: {source.label} -> {run.label}")
        run_patching(
            target=model_ref(experiment, store, run, base_model),
            source=model_ref(experiment, store, source, base_model),
            task=run.task,
            target_scores=str(eval_dir(store, run, "own") / "head_scores.parquet"),
            source_scores=str(eval_dir(store, source, "own") / "head_scores.parquet"),
            unpatched_predictions=str(eval_dir(store, run, "real") / "predictions.parquet"),
            kind=head_kind(experiment, run.task),
            data_path=str(real_eval_path(store, run.task)),
            seeds=p.seeds,
            out_dir=str(out),
            **decode_settings(experiment, base_model),
        )
        store.mark_done(key, digest, out)


def knockout_hash(experiment: Experiment, run: Run) -> str:
    return cfg.content_hash(cfg.eval_hash(experiment, run, "own"), cfg.eval_hash(experiment, run, "real"),
                            experiment.knockout)


def patched(p: cfg.PatchingConfig, variant: str) -> bool:
    """Whether patching targets `variant`: the listed ones, by default every synthetic and every
    limited variant (named limited subsets included)."""
    if p.variants is not None:
        return variant in p.variants
    return cfg.variant_kind(variant) in (*cfg.SYNTHETIC_VARIANTS, cfg.LIMITED)


def patch_source(experiment: Experiment, runs: Sequence[Run], run: Run) -> Run | None:
    """The run whose heads are patched into `run` (same task, seed and sweep), or None when
    `run` is not patched."""
    if not run.fine_tuned or not patched(experiment.patching, run.variant):
        return None
    return next((r for r in runs if r.task == run.task and r.variant == experiment.patching.source
                 and r.seed == run.seed and r.overrides == run.overrides), None)


def patching_hash(experiment: Experiment, run: Run, source: Run) -> str:
    return cfg.content_hash(*(cfg.eval_hash(experiment, r, s) for r in (run, source) for s in ("own", "real")),
                            experiment.patching)


def write_reports(experiment: Experiment, store: RunStore, runs: Sequence[Run]) -> Path:
    from analyses.overlap import run_overlap
    from engine.report import write_report

    labels = {t.name: [r.label for r in runs if r.task == t.name] for t in experiment.tasks}
    run_overlap(
        store.root,
        tasks=[t.name for t in experiment.tasks],
        variants=labels,
        kind_by_task={t.name: head_kind(experiment, t.name) for t in experiment.tasks},
    )
    return write_report(store.root, config_summary=cfg.to_dict(experiment))


# ----------------------------------------------------------------------------- recipe


def init_ray() -> None:
    """Joins the cluster of `ray job submit` (RAY_ADDRESS) or starts a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False,
                 include_dashboard=False if not os.environ.get("RAY_ADDRESS") else None)


def run_experiment(experiment: Experiment, stages: Sequence[str] = cfg.STAGES) -> Path:
    store = RunStore(experiment.resolved_run_dir())
    store.save_config(cfg.to_dict(experiment), experiment.name)
    runs = cfg.expand(experiment)
    timer = StageTimer(store)
    with timer("base_model"):
        base_model = base_model_path(experiment)
    if experiment.model.path == "miniature":
        meta = Path(base_model) / "miniature.json"
        write_json(read_json(meta), store.path("base_model.json"))
    init_ray()
    steps = {"data": build_data, "train": train_models, "evaluate": evaluate_models,
             "knockout": run_knockouts, "patching": run_patchings}
    for stage, step in steps.items():
        if stage in stages:
            with timer(stage):
                step(experiment, store, runs, base_model)
    if "report" in stages:
        with timer("report"):
            report = write_reports(experiment, store, runs)
        write_json({"report": str(report)}, store.path("report", "latest.json"))
        return report
    return store.root


class StageTimer:
    """Wall seconds of each stage of this invocation, in `timings.json` (skipped stages take ~0)."""

    def __init__(self, store: RunStore):
        self.path = store.path("timings.json")
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(time.perf_counter() - started, 1)
            write_json({**self.seconds, "total": round(sum(self.seconds.values()), 1)}, self.path)


def plan(experiment: Experiment) -> list[dict]:
    """What `run` would do: one row per grid cell and stage output, with whether it is already done."""
    store = RunStore(experiment.resolved_run_dir())
    runs = cfg.expand(experiment)
    e, k = experiment.evaluate, experiment.knockout
    actor = f"actor({e.cpus_per_actor} CPU, {e.gpus_per_actor} GPU)"
    rows = []
    for run in runs:
        train = cfg.train_config(experiment, run)
        checks = [("data", f"data/{run.task}/{'real' if run.variant == 'base' else run.variant}",
                   cfg.data_hash(experiment, run), "driver")]
        if run.fine_tuned:
            checks.append(("train", f"train/{run.task}/{run.label}", cfg.train_hash(experiment, run),
                           f"{train.num_workers}x({train.cpus_per_worker} CPU, {train.gpus_per_worker} GPU)"))
        for split in ("real", "own"):
            checks.append((f"evaluate:{split}", f"evaluate/{run.task}/{run.label}/{split}",
                           cfg.eval_hash(experiment, run, split), actor))
        if k.enabled and run.variant in k.variants:
            checks.append(("knockout", f"knockout/{run.task}/{run.label}", knockout_hash(experiment, run), actor))
        source = patch_source(experiment, runs, run) if experiment.patching.enabled else None
        if source is not None:
            checks.append(("patching", f"patching/{run.task}/{run.label}", patching_hash(experiment, run, source),
                           actor))
        for stage, key, digest, resources in checks:
            rows.append({"task": run.task, "run": run.label, "variant": run.variant, "stage": stage,
                         "hash": digest, "done": store.is_done(key, digest), "resources": resources})
    return rows


def status(run_dir: str | Path) -> dict:
    store = RunStore(run_dir)
    if not store.path("config.yaml").exists():
        from engine.store import StoreError

        raise StoreError(f"{run_dir}: not a run directory (no config.yaml)")
    manifest = store.manifest()
    by_stage: dict[str, int] = {}
    for key in manifest:
        by_stage[key.split("/", 1)[0]] = by_stage.get(key.split("/", 1)[0], 0) + 1
    return {"run_dir": str(run_dir), "finished": by_stage, "entries": manifest}
