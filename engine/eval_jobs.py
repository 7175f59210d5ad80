"""Evaluation jobs: what one evaluation, knockout or patching run is asked to compute.

A job names a model (the experiment's `model` section with `path` the local base checkpoint,
and an adapter), a task, a data file and an output directory, and carries the `evaluate` and
`scoring` sections whole, with an optional knockout or patch. `job_hash` is what decides its
shards' results, so a re-run reuses a shard only for the same model weights, data and settings.

Example:
    >>> ref = ModelRef(ModelConfig("mini", "runs/demo/base"), "runs/demo/models/mdqa/real")
    >>> job = EvalJob("mdqa/real/real", ref, "mdqa", "runs/demo/data/mdqa/real/eval.parquet",
    ...               "runs/demo/eval/mdqa/real/real", EvaluateConfig(cpus_per_actor=1))
    >>> job_hash(job)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import pyarrow.parquet as pq

from engine.config import EVALUATE_RUNTIME, EvaluateConfig, ModelConfig, ScoringConfig
from tasks.example import SCHEMA, Example

# The evaluate settings that make the actor pool, one per pool; the others decide each job's decode.
POOL_SETTINGS = ("num_actors", "cpus_per_actor", "gpus_per_actor", "shard_size", "max_retries", "timeout_s",
                 "keep_shards")


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
