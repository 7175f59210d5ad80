"""What an experiment will cost before it runs: jobs, GPU-hours, wall time and price per stage.

Counts the work `engine.pipeline.plan` still has to do, in tokens, and prices it with the
inputs of `engine.cost_inputs` (the largest cluster cluster.yaml allows, a dated price table,
measured or stated seconds per token). Stages run one after another; within a stage:

- data: datasets are built one after another by the driver: prompt fitting on the CPU
  (`fit_s_per_token` x prompt tokens), and for synthetic variants the LLM requests (needle
  sentences or paragraphs per example, and a haystack pool per build) on a synthesis engine.
- train: one job per fine-tune, (train examples x epochs, or max_steps x batch x accumulation x
  workers) x target_tokens tokens, plus a start-up; jobs are packed onto the GPU slots
  longest first (LPT), at most `train.max_concurrent` at a time.
- evaluate, knockout, patching: shards of `evaluate.shard_size` examples (prefill of
  target_tokens, decode of max_new_tokens; patching prefills twice, source and target) on a
  pool of A actors, each loading at least one model and every model loaded at least once:
  wall = max((work + loads x load_s) / A, longest shard + load_s), loads = max(models, A).

GPU-hours count only the time jobs hold GPUs (idle nodes before the autoscaler removes them are
not counted); the head node is billed for the whole wall time. Knockout counts one run per k for
the top heads and one per k > 0 and seed for random ones; patching 3 sets x seeds per model, an
upper bound (an empty set is skipped and equal sets share a run).

Example:
    >>> table = estimate(exp, plan(exp), cluster, rates, synth_rates, fit_s_per_token=2.5e-6)
    >>> [(s.stage, round(s.gpu_hours)) for s in table.stages]
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from engine import config as cfg
from engine.config import Experiment, Run
from engine.cost_inputs import (
    ROOT,
    Cluster,
    CostError,
    Rates,
    SynthRates,
    _number,
    load_cluster,
    load_prices,
    load_throughput,
    read_calibration,
    stated_rates,
    stated_synth_rates,
)
from tasks import get_task

STAGES = ("data", "train", "evaluate", "knockout", "patching")
VAL_FRACTION = 0.1  # engine.data: the validation share of n_train
# LLM requests per example and variant (tasks/*.py `build_synthetic`): one needle paragraph
# (MDQA), three hop sentences (MuSiQue) or two rephrased insights (SummHay) for realistic
# needles, plus one pool of `pool_size` paragraphs per build for diverse haystacks.
NEEDLE_REQUESTS = {"mdqa": 1, "musique": 3, "summhay": 2}
HIGH_NEEDLE, DIVERSE_HAYSTACK = ("hh", "hl"), ("hh", "lh")


@dataclass(frozen=True)
class StageCost:
    stage: str
    jobs: int
    gpu_hours: float
    wall_hours: float
    usd: float
    note: str = ""


@dataclass(frozen=True)
class CostTable:
    stages: tuple[StageCost, ...]
    head_usd: float  # the head node over the whole wall time
    inputs: tuple[str, ...]  # where each figure came from, for the reader

    @property
    def total(self) -> StageCost:
        return StageCost("total", sum(s.jobs for s in self.stages), sum(s.gpu_hours for s in self.stages),
                         sum(s.wall_hours for s in self.stages), sum(s.usd for s in self.stages) + self.head_usd)


# ----------------------------------------------------------------------------- scheduling


def lpt_makespan(durations: Sequence[float], slots: int) -> float:
    """Wall time of independent jobs on `slots` identical slots, longest first to the freest slot."""
    if not durations:
        return 0.0
    if slots < 1:
        raise CostError("no slot fits a job")
    free = [0.0] * min(slots, len(durations))
    for d in sorted(durations, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def pool_time(shards: Sequence[float], models: int, actors: int, load_s: float) -> tuple[float, float]:
    """(actor-seconds, wall seconds) of shards on a pool of `actors` actors (the module docstring)."""
    if not shards:
        return 0.0, 0.0
    actors = max(1, min(actors, len(shards)))
    busy = sum(shards) + max(models, actors) * load_s
    return busy, max(busy / actors, max(shards) + load_s)


# ----------------------------------------------------------------------------- work


def examples(experiment: Experiment, task: str, split: str) -> int:
    """Examples one evaluation reads: the real evaluation set, or the model's own validation split."""
    t = experiment.task(task)
    n = t.n_eval if split == "real" else int(round(t.n_train * VAL_FRACTION))
    return min(n, experiment.evaluate.limit) if experiment.evaluate.limit is not None else n


def new_tokens(experiment: Experiment, task: str) -> int:
    return experiment.evaluate.max_new_tokens or get_task(task).MAX_NEW_TOKENS


def train_tokens(experiment: Experiment, run: Run) -> float:
    train, task = cfg.train_config(experiment, run), experiment.task(run.task)
    if train.max_steps > 0:
        n = train.max_steps * train.batch_size * train.grad_accum * train.num_workers
    else:
        n = train.epochs * (task.n_train - int(round(task.n_train * VAL_FRACTION)))
    return n * task.target_tokens


def synth_requests(task: str, variant: str, n: int, options: dict) -> tuple[int, int]:
    """(LLM requests, synthesis calls) of one synthetic dataset of `n` examples."""
    pool = int({**get_task(task).OPTIONS, **options}.get("pool_size", 0))
    needles = NEEDLE_REQUESTS[task] * n if variant in HIGH_NEEDLE else 0
    pooled = pool if variant in DIVERSE_HAYSTACK else 0
    return needles + pooled, int(needles > 0) + int(pooled > 0)


def synth_gpus(experiment: Experiment) -> int:
    s = experiment.synth
    if s.backend == "vllm":
        return s.tensor_parallel_size * s.concurrency
    return int(math.ceil(s.num_gpus * s.concurrency)) if s.backend == "hf" else 0


# ----------------------------------------------------------------------------- estimate


def estimate(experiment: Experiment, rows: Sequence[dict], cluster: Cluster, rates: Rates,
             synth: SynthRates | None, fit_s_per_token: float, fit_source: str = "") -> CostTable:
    """Jobs, GPU-hours, wall time and price of the plan rows not yet done.

    Args:
        experiment: the experiment.
        rows: `engine.pipeline.plan(experiment)`.
        cluster: the largest cluster (`engine.cost_inputs.load_cluster`).
        rates: seconds per token of the experiment's model on one of the cluster's GPUs.
        synth: the synthesis engine's rates; None when synthesis uses no cluster GPU.
        fit_s_per_token: driver CPU seconds per prompt token built.
        fit_source: where `fit_s_per_token` comes from.
    """
    runs = {(r.task, r.label): r for r in cfg.expand(experiment)}
    todo: dict[str, list[tuple[Run, dict]]] = {s: [] for s in STAGES}
    seen_data = set()
    for row in rows:
        if row["done"]:
            continue
        stage = row["stage"].split(":")[0]
        run = runs[(row["task"], row["run"])]
        if stage == "data":
            key = (run.task, "real" if run.variant == "base" else run.variant)
            if key in seen_data:  # seeds and `base` share their variant's dataset
                continue
            seen_data.add(key)
        todo[stage].append((run, row))
    stages = [
        _data(experiment, [r for r, _ in todo["data"]], cluster, synth, fit_s_per_token),
        _train(experiment, [r for r, _ in todo["train"]], cluster, rates),
        *(_pool(experiment, stage, todo[stage], cluster, rates) for stage in ("evaluate", "knockout", "patching")),
    ]
    wall = sum(s.wall_hours for s in stages)
    inputs = (
        f"cluster: {cluster.gpus} x {cluster.gpu} at most ("
        + ", ".join(f"{n} x {t.name}" for t, n in cluster.workers) + f"), head {cluster.head.name}",
        f"prices: {cluster.prices.source}, dated {cluster.prices.date}, {cluster.prices.region}",
        f"per-token costs: {rates.source}",
        f"synthesis: {synth.source}" if synth else "synthesis: no cluster GPU",
        f"prompt fitting: {fit_s_per_token:.3g} s per token ({fit_source or 'stated'})",
    )
    return CostTable(tuple(stages), wall * cluster.head.usd_per_hour, inputs)


def _gpu_stage(stage: str, jobs: int, gpus: float, busy_s: float, wall_s: float, cluster: Cluster,
               note: str = "") -> StageCost:
    gpu_hours = busy_s * gpus / 3600
    usd = gpu_hours * cluster.usd_per_gpu_hour(gpus) if gpus else 0.0
    return StageCost(stage, jobs, gpu_hours, wall_s / 3600, usd, note)


def _slots(cluster: Cluster, gpus: float, cpus: float) -> int:
    # A job that asks no GPU runs on CPUs; the estimate places those on the head node.
    return cluster.slots(gpus) if gpus else max(1, int(cluster.head.vcpus // max(cpus, 1)))


def _data(experiment: Experiment, runs: Sequence[Run], cluster: Cluster, synth: SynthRates | None,
          fit_s_per_token: float) -> StageCost:
    engines = max(1, experiment.synth.concurrency)
    cpu_s = busy_s = synth_wall_s = 0.0
    for run in runs:
        task = experiment.task(run.task)
        n = task.n_train + (task.n_eval if run.variant in ("real", "base") else 0)
        cpu_s += n * task.target_tokens * fit_s_per_token
        if run.variant in cfg.SYNTHETIC_VARIANTS and synth is not None:
            requests, calls = synth_requests(run.task, run.variant, task.n_train, cfg.task_options(task, run.variant))
            work = requests * (synth.prompt_tokens * synth.prefill_s_per_token
                               + experiment.synth.max_tokens * synth.decode_s_per_token)
            # requests spread over the engines; every engine starts once per synthesis call
            busy_s += work + calls * synth.startup_s * engines
            synth_wall_s += work / engines + calls * synth.startup_s
    gpus = synth.gpus if synth is not None else 0
    if gpus and cluster.slots(gpus) < engines:
        raise CostError(f"synthesis needs {engines} engine(s) of {gpus} GPUs, each on one node; the cluster fits "
                        f"{cluster.slots(gpus)}")
    notes = [] if synth is not None or experiment.synth.backend == "template" else \
        [f"synthesis on the {experiment.synth.backend} backend is not costed"]
    if any(cfg.task_options(experiment.task(r.task), r.variant).get("retriever") == "dense" for r in runs):
        notes.append("dense ranking of the distractor pool is not costed")
    note = "; ".join(notes)
    return _gpu_stage("data", len(runs), gpus, busy_s, cpu_s + synth_wall_s, cluster, note)


def _train(experiment: Experiment, runs: Sequence[Run], cluster: Cluster, rates: Rates) -> StageCost:
    if not runs:
        return StageCost("train", 0, 0.0, 0.0, 0.0)
    train = experiment.train
    gpus = train.num_workers * train.gpus_per_worker
    durations = [train_tokens(experiment, r) * rates.train_s_per_token / max(gpus, 1) + rates.train_startup_s
                 for r in runs]
    slots = _slots(cluster, gpus, train.num_workers * train.cpus_per_worker)
    if train.max_concurrent:
        slots = min(slots, train.max_concurrent)
    return _gpu_stage("train", len(runs), gpus, sum(durations), lpt_makespan(durations, slots), cluster)


def _pool(experiment: Experiment, stage: str, todo: Sequence[tuple[Run, dict]], cluster: Cluster,
          rates: Rates) -> StageCost:
    e, k = experiment.evaluate, experiment.knockout
    shards, models, jobs = [], set(), 0
    for run, row in todo:
        split = row["stage"].split(":")[1] if stage == "evaluate" else "real"
        runs_per_model = {"evaluate": 1, "knockout": len(k.ks) + sum(x > 0 for x in k.ks) * len(k.seeds),
                          "patching": 3 * len(experiment.patching.seeds)}[stage]
        prefills = 2 if stage == "patching" else 1
        task = experiment.task(run.task)
        per_example = (prefills * task.target_tokens * rates.prefill_s_per_token
                       + new_tokens(experiment, run.task) * rates.decode_s_per_token)
        n = examples(experiment, run.task, split)
        sizes = [min(e.shard_size, n - i) for i in range(0, n, e.shard_size)]
        shards += [size * per_example for size in sizes] * runs_per_model
        models.add((run.task, run.label))  # an actor keeps its model across a run's jobs and splits
        jobs += runs_per_model
    actors = _slots(cluster, e.gpus_per_actor, e.cpus_per_actor)
    if e.num_actors:
        actors = min(actors, e.num_actors)
    busy, wall = pool_time(shards, len(models), actors, rates.load_s)
    note = "upper bound: empty head sets are skipped" if stage == "patching" and jobs else ""
    return _gpu_stage(stage, jobs, e.gpus_per_actor, busy, wall, cluster, note)


def estimate_experiment(experiment: Experiment, rows: Sequence[dict], cluster_path=None, prices_path=None,
                        throughput_path=None) -> CostTable:
    """`estimate` with its inputs read from files: cluster.yaml, prices.yaml, throughput.yaml at
    the repository root unless given, and the run directory's calibration.json when present."""
    throughput_path = throughput_path or ROOT / "data/costs/throughput.yaml"
    cluster = load_cluster(cluster_path or ROOT / "cluster.yaml", load_prices(prices_path or ROOT / "data/costs/prices.yaml"))
    table = load_throughput(throughput_path)
    m, e, t, s = experiment.model, experiment.evaluate, experiment.train, experiment.synth
    rates = read_calibration(experiment.resolved_run_dir(), m.path)
    if rates is None:
        if not (t.gpus_per_worker or e.gpus_per_actor):
            raise CostError(f"{experiment.source_file}: this experiment runs on CPUs and {throughput_path} states "
                            "GPU costs only; measure its costs with scripts/bench_cost.py first")
        context = max(task.target_tokens for task in experiment.tasks)
        rates = stated_rates(table, m.path, cluster.gpu, context, m.sliding_window, e.batch_size,
                             t.gradient_checkpointing, where=str(throughput_path))
    synth = None
    if s.backend in ("vllm", "hf") and synth_gpus(experiment):
        tp = s.tensor_parallel_size if s.backend == "vllm" else synth_gpus(experiment)
        synth = stated_synth_rates(table, s.model, cluster.gpu, tp, s.batch_size, s.max_tokens,
                                   where=str(throughput_path))
    measured = table.get("measured") or {}
    fit = _number(measured.get("fit_s_per_token", 0.0), f"{throughput_path}: measured.fit_s_per_token")
    return estimate(experiment, rows, cluster, rates, synth, fit, str(measured.get("fit_source", "")))
