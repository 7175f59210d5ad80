"""One shard of an evaluation job, on a pool actor: greedy decoding with inline head scores.

`EvalWorker` is a plain class (tests call it in-process); `engine.pool` wraps it with
`ray.remote`. It loads a job's model pair once (the evaluated model and, for patching, the
source model), placed as `engine.placement.resolve_placement` says for the model section and
`evaluate.gpus_per_actor`, and keeps it while it takes more shards of the same pair. Each shard
comes back as one table in `SHARD_SCHEMA`: predictions, F1/EM, per-head scores and per-step
hits, and where the model was held.

Example:
    >>> worker = EvalWorker(torch_threads=1)
    >>> table = worker.run(job, 0, rows[:4])      # rows of the job's data file
    >>> worker.held()                             # {"device": "cpu", "dtype": "float32", ...}
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from engine.chat import has_chat_template
from engine.config import ScoringConfig
from engine.eval_jobs import EvalError, EvalJob, ModelRef, TaskScorer
from tasks import get_task
from tasks.example import Example

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
EXAMPLE_COLUMNS = ("index", "id", "n_layers", "n_heads", "retrieval", "insight", "n_steps", "retrieval_hits",
                   "insight_hits")


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
    from engine.decode import ScoreSpans, greedy_decode
    from engine.heads import Knockout, Patch
    from engine.placement import held
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
