"""Sharded greedy evaluation on a Ray actor pool: F1/EM and per-head scores in one pass.

Every evaluation in the study (Zhao, Yin, Durrett, ICML 2025, Sec. 4) decodes greedily; the
same decode yields the answers for F1 and, through `engine.decode`, each head's retrieval
score (Eq. 1) and insight score (Eq. 2). Knockout and patching runs are evaluation jobs with
an intervention.

An evaluation set is cut into shards of `evaluate.shard_size` examples. Actors of the pool
(`engine.pool`) load a model pair once (the evaluated model and, for patching, the source
model) and keep it while they take more shards of the same pair. Each finished shard is
written atomically to `<out_dir>/shards/`; a re-run skips shards whose file exists, so a
crashed driver resumes where it stopped. When every shard of a job is in, they are merged
into `predictions.parquet`, `head_scores.parquet` (per-head means), `head_examples.parquet`
(per-example scores and per-step hit events, for intervals, stability and per-step head sets)
and `summary.json` (with the provenance of the result, `engine.provenance`), and that
directory replaces `out_dir` whole: a job's outputs appear together or not at all.

A job carries the experiment's sections whole: the `model` section (with `path` the local
base checkpoint) and the `evaluate` and `scoring` sections. Each actor places its models as
`engine.placement.resolve_placement` says for `evaluate.gpus_per_actor` (device, `model.dtype`,
`model.attn_implementation`), and every summary records where its result was computed.

Example:
    >>> ref = ModelRef(ModelConfig("mini", "runs/demo/base"), "runs/demo/models/mdqa/real")
    >>> job = EvalJob("mdqa/real/real", ref, "mdqa", "runs/demo/data/mdqa/real/eval.parquet",
    ...               "runs/demo/eval/mdqa/real/real", EvaluateConfig(cpus_per_actor=1))
    >>> run_jobs([job])["mdqa/real/real"]["f1"]
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import EVALUATE_RUNTIME, EvaluateConfig, ModelConfig, ScoringConfig
from engine.pool import PoolStats, WorkItem, run_pool
from engine.provenance import provenance
from engine.store import atomic_dir, read_json, write_json, write_parquet

__all__ = ["EvalError", "EvalJob", "EvalWorker", "LoadedModels", "ModelRef", "evaluate_shard", "load_models",
           "run_eval_pool", "run_jobs"]

PREDICTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prediction", pa.string()),
        ("f1", pa.float64()),
        ("em", pa.float64()),
        ("n_tokens", pa.int64()),  # generated tokens (EOS excluded)
    ]
)
# one shard: the predictions plus where each row sits in the data file and its head scores
SHARD_SCHEMA = pa.schema(
    [("index", pa.int64())]
    + list(PREDICTION_SCHEMA)
    + [
        ("n_layers", pa.int32()),
        ("n_heads", pa.int32()),
        ("retrieval", pa.list_(pa.float64())),  # [n_layers * n_heads], NaN = not counted; null = not scored
        ("insight", pa.list_(pa.float64())),
        ("n_steps", pa.int32()),  # scored decoding steps
        # flat indices into [n_steps, n_layers, n_heads] of the steps at which a head retrieved
        # (Eq. 1's event) or looked into a needle (Eq. 2's); null = not scored
        ("retrieval_hits", pa.list_(pa.int32())),
        ("insight_hits", pa.list_(pa.int32())),
        # where the shard was computed: the evaluated model's device, dtype and attention backend
        ("device", pa.string()),
        ("dtype", pa.string()),
        ("attn_implementation", pa.string()),
    ]
)
PLACEMENT_COLUMNS = ("device", "dtype", "attn_implementation")
# The evaluate settings that make the actor pool, one per pool; the others decide each job's decode.
POOL_SETTINGS = ("num_actors", "cpus_per_actor", "gpus_per_actor", "shard_size", "max_retries", "timeout_s",
                 "keep_shards")
EXAMPLE_COLUMNS = ("index", "id", "n_layers", "n_heads", "retrieval", "insight", "n_steps", "retrieval_hits",
                   "insight_hits")


class EvalError(ValueError):
    """An evaluation job that cannot run as given (bad data file, task, heads)."""


class TaskScorer(Protocol):
    """What evaluation needs from a task module (`tasks.get_task(name)`)."""

    MAX_NEW_TOKENS: int
    STOP_STRINGS: Sequence[str]

    def score(self, prediction: str, example) -> dict: ...


@dataclass(frozen=True)
class ModelRef:
    """The model section (`path`: the local base checkpoint) and, optionally, the LoRA adapter
    fine-tuned on it (merged on load)."""

    model: ModelConfig
    adapter_dir: str | None = None


@dataclass(frozen=True)
class EvalJob:
    """One model on one data file, with an optional knockout or patch.

    Attributes:
        name: unique label of the job (the key of `run_jobs`' result).
        model: the evaluated model (model B when patching); its `chat_template` decides how
            prompts are rendered (None: the tokenizer's template when it has one).
        task: task registry name; its `score`, `MAX_NEW_TOKENS`, `STOP_STRINGS` are used.
        data_path: Parquet file in `tasks.example.SCHEMA`.
        out_dir: where predictions, head scores, summary and shards go.
        evaluate: the evaluate section: `batch_size`, `max_new_tokens` (None: the task's),
            `limit`, `insight_strict`, and `gpus_per_actor`, which places the models.
        scoring: the scoring section (the readings of Eq. 1); None decodes without head scores.
        knockout: heads `(layer, head)` whose outputs are zeroed.
        patch_source: model A, whose head outputs are patched into `model` over the prompt.
        patch_heads: the heads patched from `patch_source`.
    """

    name: str
    model: ModelRef
    task: str
    data_path: str
    out_dir: str
    evaluate: EvaluateConfig = EvaluateConfig()
    scoring: ScoringConfig | None = ScoringConfig()
    knockout: tuple[tuple[int, int], ...] | None = None
    patch_source: ModelRef | None = None
    patch_heads: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        if self.knockout is not None and self.patch_source is not None:
            raise EvalError(f"job {self.name}: knockout and patching together are not supported")
        if (self.patch_source is None) != (self.patch_heads is None):
            raise EvalError(f"job {self.name}: patch_source and patch_heads go together")

    @property
    def models_key(self) -> tuple[ModelRef, ModelRef | None]:
        """What an actor must hold to run this job; shards with the same key share actors."""
        return (self.model, self.patch_source)


# --------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class LoadedModels:
    """The model pair an actor holds."""

    key: tuple[ModelRef, ModelRef | None]
    model: Any
    tokenizer: Any
    source: Any = None  # patch source (model A)


def load_models(job: EvalJob) -> LoadedModels:
    """Loads the job's model (adapter merged), tokenizer and patch source, each placed as
    `engine.placement.resolve_placement` says for its model section and the actor's GPUs."""
    from engine.models import load_tokenizer
    from engine.placement import load_configured, resolve_placement

    def load(ref: ModelRef):
        return load_configured(ref.model, resolve_placement(ref.model, job.evaluate.gpus_per_actor), ref.adapter_dir)

    source = load(job.patch_source) if job.patch_source is not None else None
    return LoadedModels(
        key=job.models_key,
        model=load(job.model),
        tokenizer=load_tokenizer(job.model.model.path, trust_remote_code=job.model.model.trust_remote_code),
        source=source,
    )


def task_scorer(name: str) -> TaskScorer:
    from tasks import get_task

    return get_task(name)


def evaluate_shard(
    loaded: LoadedModels, job: EvalJob, example_rows: Sequence[dict], start: int = 0,
    scorer: TaskScorer | None = None,
) -> pa.Table:
    """Decodes and scores one shard; returns its rows in `SHARD_SCHEMA`.

    Args:
        loaded: the models of `job.models_key`.
        job: what to run.
        example_rows: rows of the data file (`tasks.example.SCHEMA` dicts).
        start: index of the first row in the data file (keeps the merged order).
        scorer: the task module; None looks up `job.task` in the task registry.
    """
    from engine.chat import has_chat_template
    from engine.decode import ScoreSpans, greedy_decode
    from engine.heads import Knockout, Patch
    from engine.placement import held
    from tasks.example import Example

    if loaded.key != job.models_key:
        raise EvalError(f"job {job.name}: worker holds {loaded.key}, job needs {job.models_key}")
    scorer = scorer or task_scorer(job.task)
    examples = [Example.from_row(row) for row in example_rows]
    spans = None
    if job.scoring is not None:
        spans = [
            ScoreSpans(
                answer_spans=tuple((s.start, s.end) for s in e.answer_spans),
                needle_spans=tuple((s.start, s.end) for s in e.needle_spans),
            )
            for e in examples
        ]
    intervention = None
    if job.knockout:
        intervention = Knockout(heads=tuple(tuple(h) for h in job.knockout))
    elif job.patch_source is not None:
        intervention = Patch(source=loaded.source, heads=tuple(tuple(h) for h in job.patch_heads))
    scoring = job.scoring or ScoringConfig()  # its readings only matter when spans are given
    chat = job.model.model.chat_template
    decoded = greedy_decode(
        loaded.model,
        loaded.tokenizer,
        [e.prompt for e in examples],
        max_new_tokens=job.evaluate.max_new_tokens or scorer.MAX_NEW_TOKENS,
        stop_strings=tuple(scorer.STOP_STRINGS),
        batch_size=job.evaluate.batch_size,
        spans=spans,
        intervention=intervention,
        insight_strict=job.evaluate.insight_strict,
        argmax_over=scoring.argmax_over,
        count=scoring.count,
        chat_template=has_chat_template(loaded.tokenizer) if chat is None else chat,
    )
    placement = held(loaded.model)
    rows = []
    for offset, (example, out) in enumerate(zip(examples, decoded)):
        metrics = scorer.score(out.text, example)
        shape = next((s.shape for s in (out.retrieval, out.insight) if s is not None), (0, 0))
        rows.append(
            {
                "index": start + offset,
                "id": example.id,
                "prediction": out.text,
                "f1": float(metrics["f1"]),
                "em": float(metrics["em"]),
                "n_tokens": len(out.token_ids),
                "n_layers": shape[0],
                "n_heads": shape[1],
                "retrieval": None if out.retrieval is None else out.retrieval.ravel().tolist(),
                "insight": None if out.insight is None else out.insight.ravel().tolist(),
                "n_steps": 0 if out.retrieval_hits is None else len(out.retrieval_hits),
                "retrieval_hits": _flat_hits(out.retrieval_hits),
                "insight_hits": _flat_hits(out.insight_hits),
                "device": placement.device,
                "dtype": placement.dtype,
                "attn_implementation": placement.attn_implementation,
            }
        )
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


def _flat_hits(hits) -> list[int] | None:
    return None if hits is None else np.flatnonzero(hits).astype(np.int32).tolist()


class EvalWorker:
    """One pool actor: holds at most one model pair and evaluates shards with it.

    A plain class; `engine.pool` wraps it with `ray.remote`. `torch_threads` is one per CPU
    reserved for the actor, so actors on one machine do not oversubscribe its cores.
    """

    def __init__(self, torch_threads: int = 1, scorer: TaskScorer | None = None):
        import torch

        torch.set_num_threads(max(1, int(torch_threads)))
        self.scorer = scorer
        self.loaded: LoadedModels | None = None
        self.loads = 0  # how often a model pair was loaded (tests, logs)

    def ready(self) -> int:
        """Returns once the process is up with the decoding libraries imported."""
        import engine.decode  # noqa: F401  (torch, transformers: seconds, paid once per actor)

        return os.getpid()

    def run(self, job: EvalJob, start: int, rows: list[dict]) -> pa.Table:
        if self.loaded is None or self.loaded.key != job.models_key:
            self.loaded = None  # free the old pair before loading the next one
            gc.collect()
            self.loaded = load_models(job)
            self.loads += 1
        return evaluate_shard(self.loaded, job, rows, start=start, scorer=self.scorer)

    def held(self) -> dict | None:
        """The device, dtype and attention backend of the model this actor holds (None: none yet)."""
        from engine.placement import held

        return None if self.loaded is None else asdict(held(self.loaded.model))


# --------------------------------------------------------------------------- driver side


def _file_digest(path: Path) -> bytes:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def _model_fingerprint(ref: ModelRef | None, digest) -> None:
    """Adds what identifies a model's weights: adapter contents, base config and weight files.

    A retrained adapter at the same path must not reuse old shards; base weights (many GB)
    are identified by file names, sizes and modification times instead of contents.
    """
    if ref is None:
        return
    if ref.adapter_dir is not None:
        for path in sorted(Path(ref.adapter_dir).glob("*.safetensors")) + sorted(Path(ref.adapter_dir).glob("*.json")):
            digest.update(path.name.encode() + _file_digest(path))
    base = Path(ref.model.path)
    if base.is_dir():
        if (base / "config.json").exists():
            digest.update(_file_digest(base / "config.json"))
        for path in sorted(base.glob("*.safetensors")):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())


def job_hash(job: EvalJob) -> str:
    """Hash of everything that decides a job's shard results (not its name, out_dir, or how
    many actors, CPUs, retries and how long a timeout its pool has)."""
    fields = asdict(job)
    fields.pop("name"), fields.pop("out_dir")
    for key in EVALUATE_RUNTIME:
        fields["evaluate"].pop(key)
    data = Path(job.data_path)
    if not data.is_file():
        raise EvalError(f"job {job.name}: data file {data} does not exist")
    digest = hashlib.sha256()
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    digest.update(_file_digest(data))
    _model_fingerprint(job.model, digest)
    _model_fingerprint(job.patch_source, digest)
    return digest.hexdigest()[:16]


def check_heads(job: EvalJob) -> None:
    """Knockout and patch heads must exist in the model (checked from a local config.json)."""
    config_path = Path(job.model.model.path) / "config.json"
    heads = (job.knockout or ()) + (job.patch_heads or ())
    if not heads or not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    n_layers, n_heads = config.get("num_hidden_layers"), config.get("num_attention_heads")
    if n_layers is None or n_heads is None:
        return
    bad = [tuple(h) for h in heads if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise EvalError(f"job {job.name}: heads {bad} do not exist in {config_path} "
                        f"({n_layers} layers x {n_heads} heads)")


def read_examples(data_path: str, limit: int | None = None) -> list[dict]:
    """The first `limit` example rows of a data file, checked against the example schema.

    Errors name the file and the row.
    """
    from tasks.example import SCHEMA, Example

    path = Path(data_path)
    if not path.exists():
        raise EvalError(f"data file {path} does not exist")
    table = pq.read_table(path)
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise EvalError(f"{path}: missing column(s) {missing} of the example schema")
    rows = table.select(SCHEMA.names).to_pylist()
    if limit is not None:
        rows = rows[:limit]
    for i, row in enumerate(rows):
        try:
            Example.from_row(row)
        except (KeyError, TypeError, ValueError) as err:
            raise EvalError(f"{path}: row {i} (id {row.get('id')!r}) is not a valid example: {err}") from err
    if not rows:
        raise EvalError(f"{path}: no examples")
    return rows


@dataclass(frozen=True)
class _JobPlan:
    job: EvalJob
    digest: str
    n_examples: int
    shard_paths: tuple[Path, ...]
    torch_threads: int = 1  # each actor's torch threads (its CPUs)


def _shard_path(job: EvalJob, digest: str, start: int, end: int) -> Path:
    return Path(job.out_dir) / "shards" / f"{digest}-{start:06d}-{end:06d}.parquet"


def merge_shards(plan: _JobPlan, keep_shards: bool) -> dict:
    """Merges a job's shards into predictions / head scores / summary; returns the summary."""
    from engine.head_scores import score_table

    job, out = plan.job, Path(plan.job.out_dir)
    table = pa.concat_tables([pq.read_table(p, schema=SHARD_SCHEMA) for p in plan.shard_paths])
    table = table.sort_by("index")
    index = table.column("index").to_numpy()
    if not np.array_equal(index, np.arange(plan.n_examples)):
        raise EvalError(f"job {job.name}: shards hold rows {index.tolist()[:20]}..., expected 0..{plan.n_examples - 1}")
    summary = {
        "name": job.name,
        "hash": plan.digest,
        "f1": float(np.mean(table.column("f1").to_numpy())),
        "em": float(np.mean(table.column("em").to_numpy())),
        "n": table.num_rows,
        "out_dir": str(out),
        "scoring": {"argmax_over": job.scoring.argmax_over, "count": job.scoring.count,
                    "insight_strict": job.evaluate.insight_strict} if job.scoring is not None else None,
        # where each shard's model sat: one entry unless shards ran on different hardware
        "placement": [dict(zip(PLACEMENT_COLUMNS, p)) for p in
                      sorted(set(zip(*(table.column(c).to_pylist() for c in PLACEMENT_COLUMNS))))],
        "provenance": provenance(actor_torch_threads=plan.torch_threads),  # greedy decoding: no seed
    }
    # The shards stay in the old out_dir until the new one replaces it: a crash before the
    # swap leaves them for the next run to merge again.
    with atomic_dir(out) as tmp:
        write_parquet(table.select(PREDICTION_SCHEMA.names), tmp / "predictions.parquet")
        if job.scoring is not None:
            write_parquet(score_table(_stack(table, "retrieval"), _stack(table, "insight")),
                          tmp / "head_scores.parquet")
            write_parquet(table.select(EXAMPLE_COLUMNS), tmp / "head_examples.parquet")
        write_json(summary, tmp / "summary.json")
        if keep_shards:
            (tmp / "shards").mkdir()
            for path in plan.shard_paths:
                os.replace(path, tmp / "shards" / path.name)
    return summary


def _stack(table: pa.Table, kind: str) -> np.ndarray | None:
    """`[n_examples, n_layers, n_heads]` with NaN rows for unscored examples; None if none scored."""
    values = table.column(kind).to_pylist()
    scored = [i for i, v in enumerate(values) if v is not None]
    if not scored:
        return None
    n_layers, n_heads = table.column("n_layers")[scored[0]].as_py(), table.column("n_heads")[scored[0]].as_py()
    out = np.full((len(values), n_layers, n_heads), np.nan)
    for i in scored:
        out[i] = np.asarray(values[i], dtype=np.float64).reshape(n_layers, n_heads)
    return out


def _finished(job: EvalJob, digest: str) -> dict | None:
    out = Path(job.out_dir)
    path = out / "summary.json"
    if not path.exists() or not (out / "predictions.parquet").exists():
        return None
    summary = read_json(path)
    heads = ("head_scores.parquet", "head_examples.parquet") if job.scoring is not None else ()
    if summary.get("hash") != digest or not all((out / name).exists() for name in heads):
        return None
    return summary


def run_eval_pool(
    jobs: Sequence[EvalJob],
    show_progress: bool = True,
    scorer: TaskScorer | None = None,
) -> tuple[dict[str, dict], PoolStats]:
    """`run_jobs` that also returns the pool's statistics (actors, startup, wall time, retries)."""
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise EvalError(f"job names must be unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
    outs = [str(Path(job.out_dir).resolve()) for job in jobs]
    if len(set(outs)) != len(outs):
        raise EvalError("jobs must write to different out_dirs")
    if scorer is None:
        for task in sorted({job.task for job in jobs}):
            task_scorer(task)  # an unknown task fails here, not on every actor
    for job in jobs:
        check_heads(job)
    pools = {tuple(getattr(job.evaluate, key) for key in POOL_SETTINGS) for job in jobs}
    if len(pools) > 1:
        raise EvalError(f"jobs of one pool must agree on evaluate.{', '.join(POOL_SETTINGS)}; got {sorted(pools)}")
    if not jobs:
        return {}, PoolStats()
    pool = jobs[0].evaluate

    summaries: dict[str, dict] = {}
    plans: dict[str, _JobPlan] = {}
    missing: dict[str, set[Path]] = {}
    items: list[WorkItem] = []
    for job in jobs:
        digest = job_hash(job)
        done = _finished(job, digest)
        if done is not None:
            summaries[job.name] = done
            continue
        rows = read_examples(job.data_path, job.evaluate.limit)
        paths = []
        for start in range(0, len(rows), pool.shard_size):
            end = min(start + pool.shard_size, len(rows))
            path = _shard_path(job, digest, start, end)
            paths.append(path)
            if not path.exists():
                items.append(
                    WorkItem(key=str(path), affinity=job.models_key, payload=(job, start, rows[start:end]),
                             size=end - start)
                )
        plans[job.name] = _JobPlan(job, digest, len(rows), tuple(paths), max(1, int(pool.cpus_per_actor)))
        missing[job.name] = {p for p in paths if not p.exists()}
        if not missing[job.name]:
            summaries[job.name] = merge_shards(plans[job.name], pool.keep_shards)

    def on_result(item: WorkItem, table: pa.Table) -> None:
        job = item.payload[0]
        path = Path(item.key)
        write_parquet(table, path)
        missing[job.name].discard(path)
        if not missing[job.name]:  # merge as soon as a job is complete, not at the end of the stage
            summaries[job.name] = merge_shards(plans[job.name], pool.keep_shards)

    from engine.head_scores import HeadError
    from engine.models import ModelError

    stats = run_pool(
        EvalWorker,
        {"torch_threads": max(1, int(pool.cpus_per_actor)), "scorer": scorer},
        items,
        pool,
        on_result,
        fatal=(EvalError, ModelError, HeadError),
        description=f"evaluate {len(plans)} job(s)",
        show_progress=show_progress,
    )
    return {job.name: summaries[job.name] for job in jobs}, stats


def run_jobs(
    jobs: Sequence[EvalJob],
    show_progress: bool = True,
    scorer: TaskScorer | None = None,
) -> dict[str, dict]:
    """Evaluates every job on one actor pool; finished jobs and shards are skipped.

    The pool is the jobs' `evaluate` section: actors, CPUs and GPUs per actor, shard size,
    retries, timeout and whether shards are kept, on which all jobs must agree.

    Args:
        jobs: evaluation jobs with unique names and out_dirs.
        show_progress: rich progress bar with examples per second.
        scorer: a task-like object for every job instead of the task registry (it is
            pickled to the actors).

    Returns:
        job name -> summary `{"f1", "em", "n", "out_dir", ...}`.
    """
    summaries, _ = run_eval_pool(jobs, show_progress=show_progress, scorer=scorer)
    return summaries
