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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import tasks
from analyses.knockout import run_knockout
from analyses.patching import run_patching
from analyses.stability import run_stability
from analyses.steps import run_steps
from engine import config as cfg
from engine import layout
from engine.chat import has_chat_template
from engine.config import ConfigError, Experiment, Run
from engine.data import build_task_data
from engine.eval_jobs import EvalJob, ModelRef
from engine.evaluate import run_jobs
from engine.progress import heartbeat, plain_lines
from engine.provenance import provenance
from engine.store import RunStore, StoreError, clear_stale_temps, read_json, write_json
from engine.synth import make_synthesizer
from engine.train_spec import TrainSpec

console = Console(stderr=True)


# ----------------------------------------------------------------------------- recipe


def init_ray() -> None:
    """Joins the cluster of `ray job submit` (RAY_ADDRESS) or starts a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False,
                 include_dashboard=False if not os.environ.get("RAY_ADDRESS") else None)


def run_experiment(experiment: Experiment, stages: Sequence[str] = cfg.STAGES) -> Path:
    store = RunStore(experiment.resolved_run_dir())
    resolved = cfg.to_dict(experiment)
    store.check_config(resolved, experiment.name)  # before anything is written
    runs = cfg.expand(experiment)
    started = time.perf_counter()
    with heartbeat(console, "base_model"):  # pretraining the miniature can take minutes
        base_model = base_model_path(experiment)
    check_position_limit(experiment, base_model)
    store.save_config(resolved, experiment.name)
    clear_stale_temps(store.root)  # what killed runs left behind
    provenance = run_provenance(experiment)  # git and package queries: once per invocation
    write_json(provenance, store.path("provenance.json"))
    timer = StageTimer(store, provenance)
    timer.record("base_model", time.perf_counter() - started)
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


# ----------------------------------------------------------------------------- the stages' cells


@dataclasses.dataclass(frozen=True)
class Cell:
    """One output of a stage for one run: its manifest key, the hash of everything it depends
    on, and where it is written (engine/layout.py). `run` and `plan` both read cells from the
    functions below, so what is skipped and what `plan` calls done cannot disagree."""

    stage: str
    key: str
    digest: str
    out: Path


def data_cell(experiment: Experiment, store: RunStore, run: Run) -> Cell:
    return Cell("data", layout.data_key(run.task, run.variant), cfg.data_hash(experiment, run),
                layout.data(store.root, run.task, run.variant))


def train_cell(experiment: Experiment, store: RunStore, run: Run) -> Cell | None:
    if not run.fine_tuned:
        return None
    return Cell("train", layout.train_key(run.task, run.label), cfg.train_hash(experiment, run),
                layout.model(store.root, run.task, run.label))


def eval_cell(experiment: Experiment, store: RunStore, run: Run, split: str) -> Cell:
    return Cell(f"evaluate:{split}", layout.eval_key(run.task, run.label, split), cfg.eval_hash(experiment, run, split),
                layout.evaluation(store.root, run.task, run.label, split))


def knockout_cell(experiment: Experiment, store: RunStore, run: Run) -> Cell | None:
    k = experiment.knockout
    if not k.enabled or run.variant not in k.variants:
        return None
    return Cell("knockout", layout.knockout_key(run.task, run.label), knockout_hash(experiment, run),
                layout.knockout(store.root, run.task, run.label))


def patching_cell(experiment: Experiment, store: RunStore, runs: Sequence[Run], run: Run) -> Cell | None:
    source = patch_source(experiment, runs, run) if experiment.patching.enabled else None
    if source is None:
        return None
    return Cell("patching", layout.patching_key(run.task, run.label), patching_hash(experiment, run, source),
                layout.patching(store.root, run.task, run.label))


def model_dir(store: RunStore, run: Run) -> Path | None:
    return layout.model(store.root, run.task, run.label) if run.fine_tuned else None


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


def done(store: RunStore, cell: Cell) -> bool:
    """Whether the manifest records `cell` as finished from the same inputs."""
    return store.is_done(cell.key, cell.digest)


def require_done(store: RunStore, cell: Cell, stage: str) -> None:
    """Refuses to run `stage` on an input another configuration (or nothing) produced."""
    if not done(store, cell):
        upstream = cell.stage.split(":")[0]
        raise StoreError(f"{stage}: {store.root} has no {cell.key} for this configuration; "
                         f"run the {upstream} stage first (--stages {upstream},{stage})")


@functools.lru_cache(maxsize=8)
def _tokenizer_has_template(base_model: str, trust_remote_code: bool) -> bool:
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


def resolved_model(experiment: Experiment, base_model: str) -> cfg.ModelConfig:
    """The model section as every stage loads it: `path` the local base checkpoint (or hub id),
    `chat_template` decided for its tokenizer."""
    return dataclasses.replace(experiment.model, path=base_model, chat_template=chat_template(experiment, base_model))


def head_kind(experiment: Experiment, task: str) -> str:
    """The head score that defines H_X: the experiment's `head_kind`, else the task module's."""
    return experiment.task(task).head_kind or tasks.head_kind(task)


# ----------------------------------------------------------------------------- stages


def build_data(experiment: Experiment, store: RunStore, runs: Sequence[Run], base_model: str) -> None:
    from engine.models import load_tokenizer

    todo = {}
    for run in runs:
        variant = "real" if run.variant == "base" else run.variant
        todo[(run.task, variant)] = dataclasses.replace(run, variant=variant)
    for task in experiment.tasks:  # the real task's evaluation set is always needed
        todo.setdefault((task.name, "real"), Run(task.name, "real", experiment.seeds[0]))
    order = [run for _, run in sorted(todo.items(), key=lambda kv: (kv[0][0], kv[0][1] != "real", kv[0][1]))]
    order = [run for run in order if not done(store, data_cell(experiment, store, run))]
    if not order:
        return
    tokenizer = load_tokenizer(base_model, trust_remote_code=experiment.model.trust_remote_code)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    with progress, plain_lines(progress, "data"):
        bar = progress.add_task(f"data {len(order)} dataset(s)", total=len(order))
        for run in order:
            build_variant_data(experiment, store, run, tokenizer, base_model,
                               make_synth(experiment, store) if run.variant in cfg.SYNTHETIC_VARIANTS else None)
            progress.advance(bar)


def build_variant_data(experiment: Experiment, store: RunStore, run: Run, tokenizer, base_model: str, synth) -> None:
    """One task x variant dataset into the run directory, recorded in the manifest."""
    task = experiment.task(run.task)
    sources = task.sources or bundled_sources(experiment, base_model).get(run.task, {})
    console.print(f"[bold]data[/] {run.task}/{run.variant}: {task.n_train} train, target {task.target_tokens} tokens")
    cell = data_cell(experiment, store, run)
    out = cell.out
    build_task_data(
        run.task,
        run.variant,
        sources=sources,
        options=cfg.task_options(task, run.variant),
        tokenizer=tokenizer,
        target_tokens=task.target_tokens,
        n_train=task.n_train,
        n_eval=task.n_eval,
        seed=experiment.seeds[0],
        out_dir=out,
        synth=synth,
    )
    store.mark_done(cell.key, cell.digest, out)


def bundled_sources(experiment: Experiment, base_model: str) -> dict[str, dict[str, str]]:
    """The miniature's world rendered in the public task formats, for tasks that name no sources."""
    if experiment.model.path != "miniature":
        return {}
    from engine.miniature import sources_of

    return sources_of(Path(base_model))


def make_synth(experiment: Experiment, store: RunStore):
    return make_synthesizer(experiment.synth, store.path("synth_cache"))


def train_spec(experiment: Experiment, store: RunStore, run: Run, base_model: str, name: str | None = None,
               out_dir: Path | None = None, **changes) -> TrainSpec:
    """The fine-tune of `run`: the model and train sections whole (sweep values applied);
    `changes` override train settings (the probe's short tunes set max_steps), `name` and
    `out_dir` its place."""
    data = layout.data(store.root, run.task, run.variant)
    return TrainSpec(
        name=name or f"{run.task}/{run.label}",
        model=resolved_model(experiment, base_model),
        train=dataclasses.replace(cfg.train_config(experiment, run), **changes),
        train_path=str(data / "train.parquet"),
        val_path=str(data / "val.parquet"),
        out_dir=str(out_dir or model_dir(store, run)),
        seed=run.seed,
    )


def train_models(experiment: Experiment, store: RunStore, runs: Sequence[Run], base_model: str) -> None:
    from engine.train import train_all

    specs, cells = [], []
    for run in runs:
        cell = train_cell(experiment, store, run)
        if cell is None or done(store, cell):
            continue
        require_done(store, data_cell(experiment, store, run), "train")
        specs.append(train_spec(experiment, store, run, base_model))
        cells.append(cell)
    if not specs:
        return
    console.print(f"[bold]train[/] {len(specs)} variant(s): {', '.join(s.name for s in specs)}")
    train_all(specs, max_concurrent=experiment.train.max_concurrent)
    for cell in cells:
        store.mark_done(cell.key, cell.digest, cell.out)


def model_ref(experiment: Experiment, store: RunStore, run: Run, base_model: str) -> ModelRef:
    """The model `run` evaluates: the resolved model section and the run's adapter, if any."""
    adapter = model_dir(store, run)
    return ModelRef(resolved_model(experiment, base_model), str(adapter) if adapter else None)


def eval_job(experiment: Experiment, name: str, model: ModelRef, task: str, data: Path, out: Path) -> EvalJob:
    """A scored evaluation job with the experiment's evaluate and scoring sections."""
    return EvalJob(name=name, model=model, task=task, data_path=str(data), out_dir=str(out),
                   evaluate=experiment.evaluate, scoring=experiment.scoring)


def evaluate_models(experiment: Experiment, store: RunStore, runs: Sequence[Run], base_model: str) -> None:
    """Every model on the real task's evaluation set (F1) and on its own validation set (H_X)."""
    jobs, cells = [], []
    for run in runs:
        for split in layout.SPLITS:
            cell = eval_cell(experiment, store, run, split)
            if done(store, cell):
                continue
            trained = train_cell(experiment, store, run)
            if trained is not None:
                require_done(store, trained, "evaluate")
            data_run = Run(run.task, "real", 0) if split == "real" or not run.fine_tuned else run
            require_done(store, data_cell(experiment, store, data_run), "evaluate")
            data = (layout.real_eval(store.root, run.task) if split == "real"
                    else layout.data(store.root, run.task, run.variant) / "val.parquet")
            jobs.append(eval_job(experiment, f"{run.task}/{run.label}/{split}",
                                 model_ref(experiment, store, run, base_model), run.task, data, cell.out))
            cells.append(cell)
    if not jobs:
        return
    console.print(f"[bold]evaluate[/] {len(jobs)} job(s)")
    run_jobs(jobs)
    for cell in cells:
        store.mark_done(cell.key, cell.digest, cell.out)


def run_knockouts(experiment: Experiment, store: RunStore, runs: Sequence[Run], base_model: str) -> None:
    k = experiment.knockout
    for run in runs:
        cell = knockout_cell(experiment, store, run)
        if cell is None or done(store, cell):
            continue
        for split in layout.SPLITS:
            require_done(store, eval_cell(experiment, store, run, split), "knockout")
        console.print(f"[bold]knockout[/] {run.task}/{run.label}: k in {list(k.ks)}, {len(k.seeds)} random seeds")
        run_knockout(
            model=model_ref(experiment, store, run, base_model),
            task=run.task,
            head_scores=str(layout.head_scores(store.root, run.task, run.label)),
            kind=head_kind(experiment, run.task),
            data_path=str(layout.real_eval(store.root, run.task)),
            out_dir=str(cell.out),
            knockout=dataclasses.replace(k, heads_from=heads_file(k.heads_from, "knockout.heads_from")),
            evaluate=experiment.evaluate,
        )
        store.mark_done(cell.key, cell.digest, cell.out)


def run_patchings(experiment: Experiment, store: RunStore, runs: Sequence[Run], base_model: str) -> None:
    p = experiment.patching
    for run in runs:
        cell = patching_cell(experiment, store, runs, run)
        if cell is None or done(store, cell):
            continue
        source = patch_source(experiment, runs, run)
        for r in (run, source):
            for split in layout.SPLITS:
                require_done(store, eval_cell(experiment, store, r, split), "patching")
        console.print(f"[bold]patching[/] {run.task}: {source.label} -> {run.label}")
        run_patching(
            target=model_ref(experiment, store, run, base_model),
            source=model_ref(experiment, store, source, base_model),
            task=run.task,
            target_scores=str(layout.head_scores(store.root, run.task, run.label)),
            source_scores=str(layout.head_scores(store.root, source.task, source.label)),
            unpatched_predictions=str(layout.predictions(store.root, run.task, run.label)),
            kind=head_kind(experiment, run.task),
            data_path=str(layout.real_eval(store.root, run.task)),
            out_dir=str(cell.out),
            patching=dataclasses.replace(p, heads_from=heads_file(p.heads_from, "patching.heads_from")),
            evaluate=experiment.evaluate,
        )
        store.mark_done(cell.key, cell.digest, cell.out)


def heads_file(path: str | None, key: str) -> str | None:
    """An external head-score file named by the config, as an absolute path (actors and
    re-runs resolve it the same way); an error naming the key when it does not exist."""
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        from engine.store import StoreError

        raise StoreError(f"{key}: {path} does not exist")
    return str(resolved)


def heads_file_hash(path: str | None, key: str) -> str | None:
    """What a stage reading `path` depends on: the file's contents, not its name alone."""
    from analyses.interop import file_fingerprint

    resolved = heads_file(path, key)
    if resolved is None:
        return None
    return file_fingerprint(Path(resolved) / "head_scores.parquet" if Path(resolved).is_dir() else resolved)


def knockout_hash(experiment: Experiment, run: Run) -> str:
    return cfg.content_hash(cfg.eval_hash(experiment, run, "own"), cfg.eval_hash(experiment, run, "real"),
                            experiment.knockout, heads_file_hash(experiment.knockout.heads_from, "knockout.heads_from"))


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
                            experiment.patching, heads_file_hash(experiment.patching.heads_from, "patching.heads_from"))


def write_reports(experiment: Experiment, store: RunStore, runs: Sequence[Run]) -> Path:
    from analyses.intervals import run_intervals
    from analyses.overlap import run_overlap
    from engine.report import write_report

    tasks = [t.name for t in experiment.tasks]
    labels = {t.name: [r.label for r in runs if r.task == t.name] for t in experiment.tasks}
    kinds = {t.name: head_kind(experiment, t.name) for t in experiment.tasks}
    run_overlap(store.root, tasks=tasks, variants=labels, kind_by_task=kinds)
    run_intervals(store.root, tasks, labels, kinds)
    run_stability(store.root, tasks, labels, kinds)
    run_steps(store.root, tasks, labels, kinds)
    return write_report(store.root, config_summary=cfg.to_dict(experiment))


def check_position_limit(experiment: Experiment, base_model: str) -> None:
    """`model.max_context` must lie within what the model can position (see `models.position_limit`)."""
    from engine.models import position_limit

    limit, why = position_limit(base_model, experiment.model.rope_base, experiment.model.trust_remote_code)
    if limit is not None and experiment.model.max_context > limit:
        raise ConfigError(f"{experiment.source_file}: model.max_context ({experiment.model.max_context}) exceeds the "
                          f"{limit} positions the model can reach ({why}); valid: up to {limit}")



def run_provenance(experiment: Experiment) -> dict:
    """The provenance of a run (engine.provenance), with every seed its stages use."""
    return provenance(seeds={"experiment": list(experiment.seeds), "knockout": list(experiment.knockout.seeds),
                             "patching": list(experiment.patching.seeds)},
                      experiment={"name": experiment.name, "file": experiment.source_file,
                                  "model": experiment.model.name, "model_path": experiment.model.path})


class StageTimer:
    """Wall seconds of each stage of this invocation, in `timings.json` (skipped stages take ~0),
    with the provenance of the invocation."""

    def __init__(self, store: RunStore, provenance: dict | None = None):
        self.path = store.path("timings.json")
        self.seconds: dict[str, float] = {}
        self.provenance = provenance

    def record(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(seconds, 1)
        extra = {"provenance": self.provenance} if self.provenance else {}
        write_json({**self.seconds, "total": round(sum(self.seconds.values()), 1), **extra}, self.path)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.record(stage, time.perf_counter() - started)


def plan(experiment: Experiment) -> list[dict]:
    """What `run` would do: one row per grid cell and stage output, with whether it is already done.

    Raises:
        StoreError: the run directory belongs to another experiment (as `run` would refuse it).
    """
    store = RunStore(experiment.resolved_run_dir())
    store.check_config(cfg.to_dict(experiment), experiment.name)
    runs = cfg.expand(experiment)
    e = experiment.evaluate
    actor = f"actor({e.cpus_per_actor} CPU, {e.gpus_per_actor} GPU)"
    rows = []
    for run in runs:
        train = cfg.train_config(experiment, run)
        resources = {"data": "driver", "train": f"{train.num_workers}x({train.cpus_per_worker} CPU, "
                                                f"{train.gpus_per_worker} GPU)"}
        cells = [data_cell(experiment, store, run), train_cell(experiment, store, run),
                 *(eval_cell(experiment, store, run, split) for split in layout.SPLITS),
                 knockout_cell(experiment, store, run), patching_cell(experiment, store, runs, run)]
        for cell in filter(None, cells):
            rows.append({"task": run.task, "run": run.label, "variant": run.variant, "stage": cell.stage,
                         "key": cell.key, "hash": cell.digest, "done": done(store, cell),
                         "resources": resources.get(cell.stage, actor)})
    return rows


def status(run_dir: str | Path) -> dict:
    store = RunStore(run_dir)
    store.read_config()  # refuses a directory that is no run directory
    manifest = store.manifest()
    by_stage: dict[str, int] = {}
    for key in manifest:
        by_stage[key.split("/", 1)[0]] = by_stage.get(key.split("/", 1)[0], 0) + 1
    return {"run_dir": str(run_dir), "finished": by_stage, "entries": manifest}
