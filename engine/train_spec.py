"""The training contract: what one fine-tune is asked to do, and what a finished one leaves behind.

`engine.pipeline` builds one `TrainSpec` per variant from the experiment's `model` and `train`
sections, handed over whole; `engine.train` launches it on Ray Train; `engine.train_worker` runs
it. The three agree through this module alone, which imports neither torch nor Ray, so the
driver, a Ray Tune trial and the CLI read specs and `done.json` markers without loading either.

A finished variant's `out_dir` holds the adapter (safetensors), `needlework_model.json` (RoPE base
and window), `metrics.parquet` (loss, learning rate, tokens/s per step), `summary.json` and
`done.json`, published together in one rename. `done.json` records the spec's digest: a variant
is done only for the settings and data it was trained with.

Example:
    >>> spec = TrainSpec("mdqa/hh", ModelConfig("llama3", "/models/llama3", rope_base=6315088),
    ...                  TrainConfig(gpus_per_worker=1), "runs/x/data/mdqa/hh/train.parquet",
    ...                  "runs/x/data/mdqa/hh/val.parquet", "runs/x/models/mdqa/hh")
    >>> finished(spec)            # None until a run of exactly this spec is published
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.config import ModelConfig, TrainConfig
from engine.store import atomic_dir

DONE_FILE = "done.json"
FINAL_MARKER = "summary.json"  # present only in the final checkpoint of a run
METRICS_FILE = "metrics.parquet"
# Settings that say where a run writes and how it is launched; none changes what is trained.
NOT_TRAINED = ("storage_path", "ray_env", "max_concurrent")


class TrainError(RuntimeError):
    """Some variants failed to train (the others are still published)."""


@dataclass(frozen=True)
class TrainSpec:
    """One variant's fine-tune: the experiment's model and train sections, and its files.

    Attributes:
        name: "mdqa/hh" (task/variant[@sweep][-s<seed>]).
        model: the model section with `path` the local base checkpoint (or hub id) and
            `chat_template` decided (`engine.pipeline.resolved_model`).
        train: the train section, sweep values applied.
        train_path: Parquet in `tasks.example.SCHEMA` (prompt, target, ...).
        val_path: the validation split, or None.
        out_dir: where the finished adapter, metrics and done.json are published.
        seed: the training seed (LoRA initialisation, data order).
    """

    name: str
    model: ModelConfig
    train: TrainConfig
    train_path: str
    val_path: str | None
    out_dir: str
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    name: str
    out_dir: str
    steps: int
    final_loss: float
    seconds: float
    skipped: bool
    resumed_from_step: int = 0  # > 0 when this run continued an earlier, interrupted one


def _file_version(path: str | None) -> str | None:
    # Data files are replaced whole when rebuilt, so size and modification time tell one
    # build from another without reading gigabytes (None: not a local file).
    try:
        stat = os.stat(path) if path else None
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}" if stat else None


def spec_digest(spec: TrainSpec) -> str:
    """A digest of what decides what a run trains: its settings (not its name, where it writes
    or how it is launched) and the versions of its data files."""
    fields = asdict(spec)
    del fields["name"], fields["out_dir"], fields["model"]["name"]
    for key in NOT_TRAINED:
        del fields["train"][key]
    fields["data_versions"] = [_file_version(spec.train_path), _file_version(spec.val_path)]
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_name(spec: TrainSpec) -> str:
    """The Ray Train run name: the variant name and its settings' digest, safe as one directory name."""
    return re.sub(r"[^A-Za-z0-9_.@=-]", "_", spec.name.replace("/", "__")) + "-" + spec_digest(spec)


def storage_path(spec: TrainSpec) -> str:
    """Where Ray Train keeps the run's checkpoints: `train.storage_path`, else beside `out_dir`."""
    if spec.train.storage_path:
        return spec.train.storage_path
    # Beside out_dir, not in it: out_dir is replaced whole when the run is published.
    out = Path(spec.out_dir).resolve()
    return str(out.parent / f"{out.name}.checkpoints")


def read_done(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / DONE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: corrupt ({err}); delete it to retrain") from err


def finished(spec: TrainSpec) -> dict | None:
    """done.json of `spec.out_dir` if it records a run of these settings and data, else None.

    An adapter trained with other settings (another learning rate) or on other data (a
    rebuilt dataset at the same path) is not this run's result: it is retrained, and replaced
    when the new one is published.
    """
    done = read_done(spec.out_dir)
    if done is None or done.get("spec_digest") != spec_digest(spec):
        return None
    return done


def result_from_done(spec: TrainSpec, done: dict, skipped: bool) -> TrainResult:
    return TrainResult(
        name=spec.name,
        out_dir=spec.out_dir,
        steps=int(done["steps"]),
        final_loss=float(done["final_loss"]),
        seconds=float(done.get("seconds", math.nan)),
        skipped=skipped,
        resumed_from_step=int(done.get("resumed_from_step", 0)),
    )


def publish_variant(final_dir: str | Path, spec: TrainSpec, seconds: float | None = None) -> dict:
    """Publishes a run's final files and done.json as `spec.out_dir`, replacing it whole in one rename.

    Returns:
        The contents of done.json: the run's summary, the spec and its digest.
    """
    final = Path(final_dir)
    done = {**json.loads((final / FINAL_MARKER).read_text()), "spec": asdict(spec), "spec_digest": spec_digest(spec)}
    if seconds is not None:
        done["seconds"] = seconds
    with atomic_dir(spec.out_dir) as tmp:
        for source in sorted(p for p in final.iterdir() if p.is_file()):
            shutil.copyfile(source, tmp / source.name)
        (tmp / DONE_FILE).write_text(json.dumps(done, indent=2, default=str))
    return done
