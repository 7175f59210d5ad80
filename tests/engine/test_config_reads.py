"""No dead keys: every field of every config dataclass is read by the code of some stage.

The experiment's sections are frozen dataclasses handed whole to the stages, so a field can
travel everywhere and be used nowhere: accepted in the YAML, written into the run directory,
hashed, and read by nothing (as `model.dtype` once was). This test runs the stages on a tiny
miniature experiment with the attribute reads of every config class traced, and fails for any
field no stage read.

A read counts when code in engine/, tasks/ or analyses/ takes the field's attribute. Reads by
the config modules themselves (loading, validation, hashing; only engine/config.py's grid
functions do a stage's work), by `dataclasses` (asdict, replace, eq, repr) and by this test do
not: a field that is only hashed is dead.

Ray runs stage code in other processes, where reads cannot be traced, so the stages run as
`needlework run` runs them with two changes: Ray Tune's trials run here (each builds its
variant's TorchTrainer; the worker loop runs in this process), and after each real actor pool
the first shard of every job runs again here, on the pool's own worker class. Synthesis runs in
scenarios of its own: hf on Ray Data, http against a loopback server, vllm's processor config
(which needs no vLLM).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
from pathlib import Path

import pytest

import engine.evaluate
import engine.train
from engine.config import (EvaluateConfig, Experiment, KnockoutConfig, ModelConfig, PatchingConfig, ScoringConfig,
                           TaskConfig, TrainConfig, content_hash, load_experiment)
from engine.miniature.spec import MiniatureSpec, Stage
from engine.pipeline import run_experiment
from engine.pool import pool_size
from engine.synth.config import SynthConfig
from engine.train_spec import finished, result_from_done
from engine.train_worker import train_loop_per_worker

sys.path.insert(0, str(Path(__file__).parent / "synth"))
from synth_openai_server import ChatServer  # noqa: E402
from tiny import TINY_MINIATURE  # noqa: E402

ROOT = Path(__file__).parents[2]
CLASSES = (Experiment, ModelConfig, TaskConfig, TrainConfig, EvaluateConfig, ScoringConfig, KnockoutConfig,
           PatchingConfig, SynthConfig, MiniatureSpec, Stage)
STAGE_CODE = tuple(str(ROOT / d) + os.sep for d in ("engine", "tasks", "analyses"))
CONFIG_MODULES = {str(ROOT / "engine" / p) for p in ("config.py", "synth/config.py", "miniature/spec.py")}
# engine/config.py functions that do a stage's work (the grid, a variant's options), not load or hash
GRID_FUNCTIONS = {"expand", "task_options", "train_config", "variant_kind", "resolved_run_dir", "task"}

# The tiny miniature with a one-stage curriculum after a one-step phase 1, so that the
# curriculum's settings are read too (its gate, bar 0, is checked and passes after step 2).
READS_MINIATURE = TINY_MINIATURE.replace("on_failed_check: warn}}", (
    "on_failed_check: warn,\n            phase1_steps: 1, gate_every: 1, gate_probes: 2, stages: [{{name: copy, "
    "mix: [1, 0, 0, 0, 0, 0], longest: 48, gate: copy, bar: 0.0, max_steps: 2}}]}}"))
assert READS_MINIATURE != TINY_MINIATURE

EXPERIMENT = """
name: reads
run_dir: {run_dir}
model: {{name: mini, path: miniature, rope_base: 40000, max_context: 512, dtype: float32}}
""" + READS_MINIATURE + """
tasks:
  mdqa:
    variants: [real, real_limited, hl, base]
    limited_options: {{question_types: [who]}}
    n_train: 10
    n_eval: 6
    target_tokens: 160
train: {{batch_size: 1, grad_accum: 1, lr: 1.0e-3, max_steps: 2, max_length: 200, save_steps: 1}}
evaluate: {{batch_size: 4, shard_size: 4, max_new_tokens: 4, timeout_s: 600}}
knockout: {{ks: [0, 1], seeds: [0]}}
patching: {{seeds: [0]}}
"""


class ReadTracer:
    """Records (class name, field) for each field read by stage code while active."""

    def __init__(self, classes=CLASSES):
        self.classes, self.reads = classes, set()

    def _note(self, cls, name: str, frame) -> None:
        path, function = frame.f_code.co_filename, frame.f_code.co_name
        if not path.startswith(STAGE_CODE):
            return
        if path in CONFIG_MODULES and not (path.endswith("engine/config.py") and function in GRID_FUNCTIONS):
            return
        self.reads.add((cls.__name__, name))

    def __enter__(self):
        for cls in self.classes:
            fields = frozenset(f.name for f in dataclasses.fields(cls))

            def getattribute(obj, name, cls=cls, fields=fields):
                if name in fields:
                    self._note(cls, name, sys._getframe(1))
                return object.__getattribute__(obj, name)

            cls.__getattribute__ = getattribute
        return self

    def __exit__(self, *exc):
        for cls in self.classes:
            del cls.__getattribute__


def unread(reads: set) -> list[str]:
    return [f"{cls.__name__}.{f.name}" for cls in CLASSES for f in dataclasses.fields(cls)
            if (cls.__name__, f.name) not in reads]


def trials_here(todo, indices, max_concurrent, show_progress, callbacks):
    """What `engine.train._run_trials` starts as Ray Tune trials, run in this process: each trial
    builds its variant's TorchTrainer, whose workers run `train_loop_per_worker`."""
    import ray

    max_concurrent or engine.train.concurrent_slots(todo, ray.available_resources())
    results = {}
    for index, spec in zip(indices, todo):
        engine.train._torch_trainer(spec, callbacks, ())
        train_loop_per_worker({"spec": spec, "callbacks": list(callbacks)})
        results[index] = result_from_done(spec, finished(spec), skipped=False)
    return results


@pytest.fixture(scope="module")
def reads(tmp_path_factory, ray_cluster):
    tmp = tmp_path_factory.mktemp("reads")
    path = tmp / "reads.yaml"
    path.write_text(textwrap.dedent(EXPERIMENT.format(run_dir=tmp / "run")))
    experiment = load_experiment(path)
    real_pool = engine.evaluate.run_pool

    def pool_then_here(worker_cls, worker_kwargs, items, config, on_result, **kw):
        stats = real_pool(worker_cls, worker_kwargs, items, config, on_result, **kw)
        replayed = set()
        for item in items:  # what each actor ran, once per job, in this process
            if item.payload[0].name not in replayed:
                replayed.add(item.payload[0].name)
                worker_cls(**worker_kwargs).run(*item.payload)
        return stats

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEEDLEWORK_CACHE", str(tmp / "cache"))  # the miniature pretrains here, traced
        patch.setattr(engine.train, "_run_trials", trials_here)
        patch.setattr(engine.evaluate, "run_pool", pool_then_here)
        with ReadTracer() as tracer:
            run_experiment(experiment)
            synthesize(experiment, tmp)
    return tracer.reads


def synthesize(experiment, tmp: Path) -> None:
    """The synthesis backends the data stage can use, each on the tiny base model."""
    from engine.pipeline import base_model_path
    from engine.synth import Synthesizer, make_request
    from engine.synth.vllm_batch import preprocess_row, processor_config

    base = base_model_path(experiment, show_progress=False)
    requests = [make_request("simplify_insight", template="Weekly meetings help.",
                             insight="Teams that meet weekly miss fewer deadlines.", seed=1)]
    hf = SynthConfig(backend="hf", model=base, temperature=0, max_tokens=4, batch_size=1, concurrency=1)
    Synthesizer(hf, tmp / "hf_cache", show_progress=False).generate(requests)
    os.environ["NEEDLEWORK_READS_KEY"] = "not a secret"
    try:
        with ChatServer(base) as server:
            http = SynthConfig(backend="http", model="mini", base_url=server.base_url, api_key_env="NEEDLEWORK_READS_KEY",
                               temperature=0, max_tokens=4, timeout_s=60, on_invalid="fallback")
            Synthesizer(http, tmp / "http_cache", show_progress=False).generate(requests)
    finally:
        del os.environ["NEEDLEWORK_READS_KEY"]
    vllm = SynthConfig(backend="vllm", model="org/model", tensor_parallel_size=2, runtime_env={"pip": ["vllm"]},
                       engine_kwargs={"max_model_len": 4096})
    processor_config(vllm)  # what VLLMBackend hands ray.data.llm
    preprocess_row({"index": 0, "chat": "[]", "seed": 3}, vllm)


def test_every_config_field_is_read_by_a_stage(reads):
    missing = unread(reads)
    assert missing == [], f"no stage reads: {', '.join(missing)}"


def test_a_field_only_hashed_or_validated_is_not_a_read():
    """The tracer itself: hashing and building a section read nothing; the pool's sizing reads
    exactly the three fields it uses."""
    with ReadTracer() as tracer:
        settings = EvaluateConfig(num_actors=None, cpus_per_actor=1)
        content_hash(settings, dataclasses.asdict(settings), dataclasses.replace(settings, batch_size=2))
        assert tracer.reads == set()
        pool_size(settings, 3, {"CPU": 2.0})
    assert tracer.reads == {("EvaluateConfig", "num_actors"), ("EvaluateConfig", "cpus_per_actor"),
                            ("EvaluateConfig", "gpus_per_actor")}
    assert "__getattribute__" not in vars(EvaluateConfig)  # the classes are themselves again


def test_a_field_that_no_stage_reads_fails_the_check(reads, monkeypatch):
    """A key added to a section and read by nothing is what the check exists to catch: the
    same traced run, against the evaluate section with one more field, names that field alone."""

    @dataclasses.dataclass(frozen=True)
    class EvaluateConfig(engine.config.EvaluateConfig):  # the traced reads are keyed by class name
        unused_knob: int = 0

    monkeypatch.setattr(sys.modules[__name__], "CLASSES", (EvaluateConfig,))
    assert unread(reads) == ["EvaluateConfig.unused_knob"]
