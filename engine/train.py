"""LoRA context-extension fine-tunes on Ray Train: one TorchTrainer run per variant, all
variants of an experiment launched together through Ray Tune.

The study (Zhao, Yin, Durrett, ICML 2025) fine-tunes one model per task variant
(real, synthetic hh/hl/lh/ll/symbolic, ...) with LoRA rank 8 on attention after raising the
RoPE base. Each variant here is a Ray Train run (`train_variant`) of an
`engine.train_spec.TrainSpec`; `train_all` starts one Tune trial per variant whose function
builds and fits that variant's TorchTrainer (Ray's pattern for running several trainers at
once), as many at a time as the cluster fits. What each worker runs is `engine.train_worker`.

A run checkpoints the adapter (safetensors) with the optimizer, scheduler and RNG state to
`train.storage_path` (default `<out_dir>.checkpoints`, beside the output); a worker that dies
restarts from the latest checkpoint, and so does a re-run of a run that was interrupted. The
Ray Train run is named by the variant and a digest of its settings, so a changed spec never
resumes another spec's checkpoints. A finished variant's `out_dir` is published whole, in one
rename, and is skipped while its `done.json` records the same settings; it holds the adapter,
`needlework_model.json` (RoPE base and window), `metrics.parquet` (loss, learning rate,
tokens/s per step), `summary.json` and `done.json`.

Example:
    >>> model = ModelConfig("llama3", "meta-llama/Meta-Llama-3-8B-Instruct", rope_base=6315088)
    >>> specs = [TrainSpec(f"mdqa/{v}", model, TrainConfig(gpus_per_worker=1),
    ...                    f"runs/x/data/mdqa/{v}/train.parquet", None, f"runs/x/models/mdqa/{v}")
    ...          for v in ("real", "hh", "symbolic")]
    >>> results = train_all(specs)          # three TorchTrainer runs side by side
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

from ray.tune import Callback
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.progress import plain_lines
from engine.train_spec import (
    TrainError,
    TrainResult,
    TrainSpec,
    finished,
    publish_variant,
    result_from_done,
    run_name,
    storage_path,
)

# A Tune trial here only waits on its TorchTrainer; reserving a CPU for it would starve the
# training workers (on 2 cores, tasks wait silently for CPUs that idle drivers hold), and
# Ray rejects an all-zero request, so it holds a sliver of memory instead.
TRIAL_RESOURCES = {"memory": 1024 * 1024}

__all__ = ["TrainError", "TrainSpec", "TrainResult", "train_variant", "train_all", "concurrent_slots", "finished"]


def _torch_trainer(spec: TrainSpec, callbacks: Sequence, run_callbacks: Sequence, board=None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from engine.train_worker import train_loop_per_worker

    train = spec.train
    resources = {"CPU": train.cpus_per_worker}
    if train.gpus_per_worker:
        resources["GPU"] = train.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "callbacks": list(callbacks), "progress_board": board},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name(spec),
            storage_path=storage_path(spec),
            failure_config=FailureConfig(max_failures=train.max_failures),
            # The last periodic checkpoint (to resume) and the final one (to publish).
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(run_callbacks),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(train.cpus_per_worker))),
                                             "TOKENIZERS_PARALLELISM": "false",
                                             **{k: str(v) for k, v in (train.ray_env or {}).items()}}},
        ),
    )


@contextlib.contextmanager
def ray_environment(env: dict | None):
    """`env` in this process while a TorchTrainer starts: Ray Train hands its own variables
    (RAY_TRAIN_*) from the process calling `fit()` to the run's controller and workers."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _checkpoint_at(spec: TrainSpec, path: str):
    """The Ray checkpoint at `path` inside the spec's storage (local or cloud)."""
    import pyarrow.fs
    from ray.train import Checkpoint

    storage = storage_path(spec)
    filesystem = pyarrow.fs.FileSystem.from_uri(storage)[0] if "://" in storage else None
    return Checkpoint(path, filesystem=filesystem)


def _collect(spec: TrainSpec, checkpoint, seconds: float) -> TrainResult:
    with checkpoint.as_directory() as final_dir:
        done = publish_variant(final_dir, spec, seconds)
    return result_from_done(spec, done, skipped=False)


def train_variant(spec: TrainSpec, *, callbacks: Sequence = ()) -> TrainResult:
    """Fine-tunes one variant as one Ray Train TorchTrainer run (skipped if already done).

    Args:
        spec: the variant.
        callbacks: extra `transformers.TrainerCallback`s run inside every worker.

    Raises:
        ray.train.TrainingFailedError: the run failed more than `train.max_failures` times.
    """
    done = finished(spec)
    if done is not None:
        return result_from_done(spec, done, skipped=True)
    import ray

    if not ray.is_initialized():
        ray.init()
    started = time.perf_counter()
    with ray_environment(spec.train.ray_env):
        result = _torch_trainer(spec, callbacks, ()).fit()
    return _collect(spec, result.checkpoint, time.perf_counter() - started)


def concurrent_slots(specs: Sequence[TrainSpec], resources: dict) -> int:
    """How many of these runs fit side by side in `resources` (`ray.available_resources()`).

    Sized for the largest run, so any mix of the variants fits.
    """
    need: dict[str, float] = {}
    for spec in specs:
        train = spec.train
        per_run = {"CPU": train.num_workers * train.cpus_per_worker,
                   "GPU": train.num_workers * train.gpus_per_worker}
        for key, value in per_run.items():
            need[key] = max(need.get(key, 0.0), value)
    fits = [math.floor(resources.get(key, 0.0) / value + 1e-9) for key, value in need.items() if value > 0]
    slots = min(fits) if fits else len(specs)
    if slots < 1:
        raise RuntimeError(f"one run needs {need} but the cluster has only {resources}")
    return min(slots, max(1, len(specs)))


def estimated_work(spec: TrainSpec) -> float:
    """Relative cost of a run: bytes of training text it will read (epochs or max_steps).

    Only an ordering key: the longest runs start first, so the last wave is not one long
    run on an otherwise idle cluster. Unknown sizes (remote files) count as 0.
    """
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(spec.train_path).metadata
    except (OSError, ValueError):
        return 0.0
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    train = spec.train
    if train.max_steps > 0 and meta.num_rows:
        per_step = train.batch_size * train.grad_accum * train.num_workers
        return size * train.max_steps * per_step / meta.num_rows
    return size * train.epochs


def _variant_trial(config: dict, specs: list[TrainSpec], callbacks: Sequence, board) -> None:
    """A Tune trial: build and fit one variant's TorchTrainer, report its final checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = specs[config["index"]]
    started = time.perf_counter()
    with ray_environment(spec.train.ray_env):
        result = _torch_trainer(spec, callbacks, [TuneReportCallback()], board).fit()
    tune.report({"final_checkpoint": result.checkpoint.path, "seconds": time.perf_counter() - started})


def check_train_data(specs: Sequence[TrainSpec]) -> None:
    """Tokenizes every spec's splits here, as its workers will, so that data they cannot train
    on (an example longer than `train.max_length`, a missing column) fails in seconds, naming
    the file and row, before any run starts.

    Raises:
        TrainDataError: the first unusable split, with the setting to change.
    """
    from engine.models import load_tokenizer
    from engine.train_worker import TrainDataError, training_sets

    tokenizers: dict[tuple[str, bool], object] = {}
    for spec in specs:
        key = (spec.model.path, spec.model.trust_remote_code)
        if key not in tokenizers:
            tokenizers[key] = load_tokenizer(spec.model.path, trust_remote_code=spec.model.trust_remote_code)
        try:
            training_sets(spec, tokenizers[key])
        except TrainDataError as err:
            hint = " (raise train.max_length, or lower the task's target_tokens)" if "max_length" in str(err) else ""
            raise TrainDataError(f"{spec.name}: {err}{hint}") from err


def train_all(
    specs: Sequence[TrainSpec],
    *,
    max_concurrent: int | None = None,
    show_progress: bool = True,
    callbacks: Sequence = (),
) -> list[TrainResult]:
    """Fine-tunes all variants, as many at once as the cluster fits; finished ones are skipped.

    Args:
        specs: the variants; names and out_dirs must be unique.
        max_concurrent: runs at a time; default from `ray.available_resources()` and the
            per-run workers, CPUs and GPUs.
        show_progress: a rich live view of every running variant's step and loss.
        callbacks: extra `transformers.TrainerCallback`s run inside every worker.

    Returns:
        One result per spec, in the order given.

    Raises:
        TrainError: some variants failed (the others are still published).
    """
    for key in ("name", "out_dir"):
        values = [getattr(s, key) for s in specs]
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ValueError(f"train specs share {key}: {', '.join(map(str, duplicates))}")
    results: dict[int, TrainResult] = {}
    todo: list[int] = []
    for i, spec in enumerate(specs):
        done = finished(spec)
        if done is None:
            todo.append(i)
        else:
            results[i] = result_from_done(spec, done, skipped=True)
    check_train_data([specs[i] for i in todo])
    # Longest first: a long run started last would finish alone while the others idle.
    todo.sort(key=lambda i: -estimated_work(specs[i]))
    if todo:
        results.update(_run_trials([specs[i] for i in todo], todo, max_concurrent, show_progress, callbacks))
    return [results[i] for i in range(len(specs))]


def _run_trials(todo, indices, max_concurrent, show_progress, callbacks) -> dict[int, TrainResult]:
    import ray
    from ray import tune

    if not ray.is_initialized():
        ray.init()
    slots = max_concurrent or concurrent_slots(todo, ray.available_resources())
    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    trainable = tune.with_resources(
        tune.with_parameters(_variant_trial, specs=list(todo), callbacks=list(callbacks),
                             board=board),
        TRIAL_RESOURCES,
    )
    progress = TrainProgress([s.name for s in todo], board, enabled=show_progress)
    tune_dir = tempfile.mkdtemp(prefix="needlework-tune-")  # trial bookkeeping only
    tuner = tune.Tuner(
        trainable,
        param_space={"index": tune.grid_search(list(range(len(todo))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=slots, num_samples=1),
        run_config=tune.RunConfig(name="train", storage_path=tune_dir, verbose=0, callbacks=[progress],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    try:
        with progress:
            grid = tuner.fit()
    finally:
        shutil.rmtree(tune_dir, ignore_errors=True)
        ray.kill(board)
    results, failures = {}, []
    for trial in grid:
        k = trial.config["index"]
        spec = todo[k]
        if trial.error is not None or "final_checkpoint" not in (trial.metrics or {}):
            failures.append(f"{spec.name}: {trial.error}")
            continue
        checkpoint = _checkpoint_at(spec, trial.metrics["final_checkpoint"])
        results[indices[k]] = _collect(spec, checkpoint, trial.metrics["seconds"])
    if failures:
        raise TrainError("training failed for " + "; ".join(failures))
    return results



class ProgressBoard:
    """The latest step, loss and tokens/s of each running variant (a zero-CPU Ray actor)."""

    def __init__(self):
        self.latest: dict[str, dict] = {}

    def post(self, name: str, progress: dict) -> None:
        self.latest[name] = progress

    def read(self) -> dict[str, dict]:
        return self.latest


class TrainProgress(Callback):
    """A rich live view of all variants, refreshed from the progress board.

    Tune calls `on_step_end` in the driver on every turn of its event loop.
    """

    def __init__(self, names: Sequence[str], board, enabled: bool = True):
        self.names, self.board, self.enabled = list(names), board, enabled
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), disable=not enabled,
        )
        self.tasks = {n: self.progress.add_task(n, total=None, loss="-", speed="-", status="waiting")
                      for n in self.names}
        self._pending = None  # an outstanding board.read() call

    def __getstate__(self):
        # Tune pickles its run config for restoring; a live display cannot travel.
        return {"names": self.names}

    def __setstate__(self, state):
        self.__init__(state["names"], None, enabled=False)

    def __enter__(self):
        self.progress.start()
        self._plain = plain_lines(self.progress, "train", fields=("loss",))  # where nobody sees the bars
        self._plain.__enter__()
        return self

    def __exit__(self, *exc):
        self.refresh(force=True)
        self._plain.__exit__(*exc)
        self.progress.stop()

    def refresh(self, force: bool = False) -> None:
        """Shows the board's last answer and asks again; never blocks Tune's event loop."""
        import ray

        if not self.enabled or self.board is None:
            return
        if self._pending is None:
            self._pending = self.board.read.remote()
        ready, _ = ray.wait([self._pending], timeout=2.0 if force else 0)
        if not ready:
            return  # a busy cluster delays the view, never the training
        try:
            latest = ray.get(self._pending)
        except ray.exceptions.RayActorError:
            latest = {}
        self._pending = None
        for name, p in latest.items():
            self.progress.update(self.tasks[name], completed=p["step"], total=p["max_steps"] or None,
                                 loss=f"{p['loss']:.4f}", speed=f"{p['tokens_per_second']:.0f}")

    def _task(self, trial):
        return self.tasks[self.names[trial.config["index"]]]

    def on_step_end(self, iteration, trials, **info):
        self.refresh()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.progress.update(self._task(trial), status="running")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.progress.update(self._task(trial), status="[green]done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.progress.update(self._task(trial), status="[red]failed")
