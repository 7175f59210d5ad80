"""engine/train.py and engine/train_worker.py on a real local Ray cluster (2 CPUs), tiny models."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ray import cloudpickle
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from engine.config import ModelConfig, TrainConfig
from engine.models import load_model, load_trained, load_tokenizer, rope_base_of
from engine.placement import Placement
from engine.train import concurrent_slots, estimated_work, ray_environment, train_all, train_variant
from engine.train_spec import TrainSpec, run_name, storage_path
from engine.train_worker import IGNORE_INDEX, TrainDataError, load_examples, tokenize_example, train_loop_per_worker
from tasks.example import Example, Span, to_table
from tiny import char_tokenizer

# Callbacks below travel to Ray workers, which cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

RAY_TIMEOUT = 900  # a hang guard for one Ray Train run on 2 busy shared cores, not a timing target
PROBE_IDS = char_tokenizer()("key abcd value dcba. key abcd? ")["input_ids"]  # workers lack tests/tiny.py


def within(seconds: float, fn, *args, **kwargs):
    """Runs a blocking Ray call, failing the test if it does not return in time."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result(timeout=seconds)


def make_examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        key = "".join(rng.choice("abcdefgh") for _ in range(4))
        prompt = f"key {key} value {key[::-1]}. key {key}? "
        examples.append(Example(str(i), "toy", "hh", prompt, key[::-1], (key[::-1],),
                                Span(0, len(prompt)), (), (), ()))
    return examples


@pytest.fixture(scope="module")
def train_parquet(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("train_data") / "train.parquet"
    pq.write_table(to_table(make_examples(16)), path)
    return str(path)


MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
CPU = Placement("cpu", "float32", "sdpa")


def spec_for(base: str, data: str, out: Path, name: str = "toy/hh", **changes) -> TrainSpec:
    """A spec of the tiny model at `base`; `changes` set model-section or train-section keys."""
    model = ModelConfig("tiny", base, **{k: v for k, v in changes.items() if k in MODEL_FIELDS})
    train = dict(max_length=128, grad_accum=1, lr=2e-2, epochs=1, save_steps=100)
    train.update({k: v for k, v in changes.items() if k not in MODEL_FIELDS})
    return TrainSpec(name, model, TrainConfig(**train), data, None, str(out), seed=0)


def with_train(spec: TrainSpec, **changes) -> TrainSpec:
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, **changes))


def probe_logits(model) -> torch.Tensor:
    ids = torch.tensor([PROBE_IDS])
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


class Snapshot(TrainerCallback):
    """Rank 0 saves the model's parameters before and after training and the probe's logits."""

    def __init__(self, path: str):
        self.path = path
        self.before, self.optimizer = None, None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.before = {k: v.detach().clone() for k, v in model.named_parameters()}
        self.optimizer = type(getattr(optimizer, "optimizer", optimizer)).__name__

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.process_index == 0:
            after = {k: v.detach().clone() for k, v in model.named_parameters()}
            torch.save({"before": self.before, "after": after, "logits": probe_logits(model),
                        "optimizer": self.optimizer}, self.path)


class KillOnce(TrainerCallback):
    """Kills its own worker at `step` on the first attempt only (the marker file remembers).

    It first waits until Ray's controller has committed a checkpoint (the run's
    checkpoint_manager_snapshot.json exists): the controller collects reports on its
    ~2 s poll, and a report still queued in a dying worker is lost, so without the wait
    a tiny model's 10 ms steps would die before any checkpoint counts.
    """

    def __init__(self, step: int, marker: str, committed: str):
        self.step, self.marker, self.committed = step, marker, committed

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and not os.path.exists(self.marker):
            deadline = time.time() + 600
            while not os.path.exists(self.committed) and time.time() < deadline:
                time.sleep(0.2)
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)


def committed(spec: TrainSpec) -> str:
    return str(Path(storage_path(spec)) / run_name(spec) / "checkpoint_manager_snapshot.json")


class WaitForPeers(TrainerCallback):
    """At step 1, waits until `n` runs have reached step 1: only concurrent runs get past it.

    Each run's file records the worker's view of the variables its spec's `ray_env` sets.
    """

    def __init__(self, directory: str, n: int, timeout: float = 150):
        self.directory, self.n, self.timeout = directory, n, timeout

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != 1:
            return
        seen = {k: os.environ.get(k) for k in ("NEEDLEWORK_TEST_RUN", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
        Path(self.directory, f"{os.getpid()}").write_text(json.dumps(seen))
        deadline = time.time() + self.timeout
        while len(os.listdir(self.directory)) < self.n:
            if time.time() > deadline:
                raise TimeoutError(f"only {len(os.listdir(self.directory))} of {self.n} runs started")
            time.sleep(0.2)


def losses(out_dir) -> list[float]:
    return pq.read_table(Path(out_dir) / "metrics.parquet").column("loss").to_pylist()


# --- data preparation (no Ray) -------------------------------------------------------------


def test_tokenize_masks_prompt_and_appends_eos(tiny_checkpoints):
    tokenizer = load_tokenizer(tiny_checkpoints["llama"])
    row = tokenize_example(tokenizer, "key ab? ", "ba", max_length=64)
    # A char tokenizer maps the joined text one char to one id: an independent reference.
    joined = tokenizer("key ab? ba", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == joined + [tokenizer.eos_token_id]
    assert row["labels"] == [IGNORE_INDEX] * 8 + joined[8:] + [tokenizer.eos_token_id]
    assert row["attention_mask"] == [1] * 11
    with pytest.raises(TrainDataError, match="exceed max_length=10"):
        tokenize_example(tokenizer, "key ab? ", "ba", max_length=10)


def test_bad_training_data_names_file_and_row(tiny_checkpoints, tmp_path):
    import pyarrow as pa

    tokenizer = load_tokenizer(tiny_checkpoints["llama"])
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "answer": ["b"]}), path)
    with pytest.raises(TrainDataError, match=r"bad\.parquet: missing column\(s\) target"):
        load_examples(str(path), tokenizer, 64)
    pq.write_table(pa.table({"prompt": ["short", "x" * 100], "target": ["b", "c"]}), path)
    with pytest.raises(TrainDataError, match=r"bad\.parquet: row 1: 102 tokens"):
        load_examples(str(path), tokenizer, 64)


def test_train_all_refuses_data_longer_than_max_length_before_any_run_starts(tiny_checkpoints, train_parquet,
                                                                            tmp_path):
    tokenizer = load_tokenizer(tiny_checkpoints["llama"])
    rows = pq.read_table(train_parquet).to_pylist()
    lengths = [len(tokenize_example(tokenizer, r["prompt"], r["target"], 10_000)["input_ids"]) for r in rows]
    first_too_long = next(i for i, n in enumerate(lengths) if n > max(lengths) - 1)
    spec = spec_for(tiny_checkpoints["llama"], train_parquet, tmp_path / "out", name="toy/short",
                    max_length=max(lengths) - 1)
    with pytest.raises(TrainDataError) as err:
        train_all([spec], show_progress=False)  # no Ray cluster: the check runs first, on the driver
    assert str(err.value) == (f"toy/short: {train_parquet}: row {first_too_long}: {max(lengths)} tokens exceed "
                              f"max_length={max(lengths) - 1} (raise train.max_length, or lower the task's "
                              "target_tokens)")
    assert not (tmp_path / "out").exists()


def test_concurrent_slots_from_cluster_resources(tiny_checkpoints, train_parquet, tmp_path):
    spec = spec_for("m", train_parquet, tmp_path, num_workers=2, cpus_per_worker=1)
    assert concurrent_slots([spec] * 5, {"CPU": 8.0}) == 4
    assert concurrent_slots([spec] * 3, {"CPU": 16.0}) == 3
    gpu = with_train(spec, gpus_per_worker=1, cpus_per_worker=4)
    assert concurrent_slots([gpu] * 8, {"CPU": 64.0, "GPU": 4.0}) == 2
    with pytest.raises(RuntimeError, match="cluster has only"):
        concurrent_slots([spec], {"CPU": 1.0})


def test_ray_environment_is_set_while_starting_then_restored(monkeypatch):
    monkeypatch.setenv("NEEDLEWORK_KEEP", "before")
    monkeypatch.delenv("NEEDLEWORK_NEW", raising=False)
    with ray_environment({"NEEDLEWORK_KEEP": "during", "NEEDLEWORK_NEW": 1}):
        assert os.environ["NEEDLEWORK_KEEP"] == "during" and os.environ["NEEDLEWORK_NEW"] == "1"
    assert os.environ["NEEDLEWORK_KEEP"] == "before" and "NEEDLEWORK_NEW" not in os.environ
    with ray_environment(None):
        assert os.environ["NEEDLEWORK_KEEP"] == "before"


def test_estimated_work_orders_runs_by_text_read(tmp_path):
    small, large = tmp_path / "small.parquet", tmp_path / "large.parquet"
    pq.write_table(to_table(make_examples(20)), small)
    pq.write_table(to_table(make_examples(200, seed=1)), large)
    sizes = {}
    for path in (small, large):
        meta = pq.ParquetFile(path).metadata
        sizes[path] = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    a = spec_for("m", str(small), tmp_path / "a", epochs=3)
    b = spec_for("m", str(large), tmp_path / "b", epochs=1)
    assert estimated_work(a) == pytest.approx(3 * sizes[small])
    assert estimated_work(b) == pytest.approx(sizes[large])
    assert estimated_work(b) > estimated_work(a)
    # max_steps: the share of the file those steps read (batch 2 x accum 1 x 1 worker).
    c = spec_for("m", str(large), tmp_path / "c", max_steps=10, batch_size=2)
    assert estimated_work(c) == pytest.approx(sizes[large] * 20 / 200)
    assert estimated_work(spec_for("m", str(tmp_path / "missing.parquet"), tmp_path / "d")) == 0.0


def test_a_published_run_counts_as_done_only_for_its_settings_and_data(tmp_path):
    from engine.train_spec import finished, publish_variant

    data = tmp_path / "train.parquet"
    pq.write_table(to_table(make_examples(4)), data)
    spec = spec_for("m", str(data), tmp_path / "out")
    final = tmp_path / "final"
    final.mkdir()
    (final / "summary.json").write_text(json.dumps({"steps": 4, "final_loss": 1.0}))
    (final / "adapter_model.safetensors").write_bytes(b"weights")
    publish_variant(final, spec)
    assert finished(spec)["steps"] == 4
    # its name, where it writes and how it is launched do not change what it trains
    assert finished(with_train(spec, ray_env={"X": "1"}, storage_path=str(tmp_path / "s"), max_concurrent=3)) \
        is not None
    assert finished(dataclasses.replace(spec, model=dataclasses.replace(spec.model, name="other"))) is not None
    assert finished(with_train(spec, lr=1e-3)) is None
    assert finished(dataclasses.replace(spec, model=dataclasses.replace(spec.model, dtype="bfloat16"))) is None
    time.sleep(0.01)
    pq.write_table(to_table(make_examples(4, seed=1)), data)  # the dataset was rebuilt at the same path
    assert finished(spec) is None
    assert run_name(spec) != run_name(with_train(spec, lr=1e-3))  # another spec, other checkpoints


# --- one worker in-process, no Ray ----------------------------------------------------------


def test_plain_function_trains_adapter_with_raised_rope_base(tiny_checkpoints, train_parquet, tmp_path):
    base = tiny_checkpoints["mistral"]
    snapshot = Snapshot(str(tmp_path / "snap.pt"))
    spec = spec_for(base, train_parquet, tmp_path / "out", rope_base=40_000.0, sliding_window=24, epochs=2)
    train_loop_per_worker({"spec": spec, "callbacks": [snapshot]})

    meta = json.loads((tmp_path / "out" / "needlework_model.json").read_text())
    assert meta["rope_base"] == 40_000.0 and meta["sliding_window"] == 24
    assert json.loads((tmp_path / "out" / "done.json").read_text())["steps"] == 32
    trained = load_trained(base, tmp_path / "out")
    assert rope_base_of(trained) == 40_000.0 and trained.config.sliding_window == 24
    saved = torch.load(tmp_path / "snap.pt")
    torch.testing.assert_close(probe_logits(trained), saved["logits"], atol=1e-4, rtol=1e-4)


class Payload:
    """A pickle that creates `marker` when it is unpickled: what a tampered checkpoint could hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_resuming_reads_the_checkpoints_pickles_with_weights_only(tiny_checkpoints, train_parquet, tmp_path):
    """The optimizer, scheduler and RNG state a resume reads are .pt pickles; the HF Trainer loads
    them with torch.load(weights_only=True), so a tampered file fails instead of running code."""
    import pickle

    from transformers import DataCollatorForSeq2Seq, Trainer

    from engine.models import add_lora
    from engine.train_worker import training_arguments

    base = tiny_checkpoints["llama"]
    spec = spec_for(base, train_parquet, tmp_path / "out", max_steps=2, save_steps=1)
    tokenizer = load_tokenizer(base)
    tokenizer.padding_side = "right"
    data = load_examples(train_parquet, tokenizer, spec.train.max_length)

    def trainer() -> Trainer:
        torch.manual_seed(0)
        return Trainer(model=add_lora(load_model(base), rank=2, alpha=2),
                       args=training_arguments(spec, str(tmp_path / "scratch"), CPU), train_dataset=data,
                       data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
                       processing_class=tokenizer)

    trainer().train()
    (checkpoint,) = (tmp_path / "scratch").glob("checkpoint-*")
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {p.name for p in checkpoint.iterdir()}
    marker = tmp_path / "code-ran"
    for name in ("optimizer.pt", "rng_state.pth"):
        original = (checkpoint / name).read_bytes()
        torch.save({"state": Payload(str(marker))}, checkpoint / name)
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            trainer().train(resume_from_checkpoint=str(checkpoint))
        assert not marker.exists()
        (checkpoint / name).write_bytes(original)


# --- Ray Train ------------------------------------------------------------------------------


def test_two_worker_run_trains_only_the_adapter(ray_cluster, tiny_checkpoints, train_parquet, tmp_path):
    base = tiny_checkpoints["llama"]
    spec = spec_for(base, train_parquet, tmp_path / "out", num_workers=2, epochs=3, save_steps=8)
    result = within(RAY_TIMEOUT, train_variant, spec, callbacks=[Snapshot(str(tmp_path / "snap.pt"))])

    assert not result.skipped and result.steps == 24  # 16 examples / 2 workers x 3 epochs
    loss = losses(spec.out_dir)
    assert len(loss) == 24 and sum(loss[-4:]) / 4 < sum(loss[:4]) / 4 - 0.2
    snap = torch.load(tmp_path / "snap.pt")
    lora = [k for k in snap["before"] if "lora_" in k]
    assert lora and all(not torch.equal(snap["before"][k], snap["after"][k]) for k in lora if "lora_B" in k)
    for k in snap["before"]:
        if "lora_" not in k:
            assert torch.equal(snap["before"][k], snap["after"][k]), k
    saved = load_file(Path(spec.out_dir) / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    # The reloaded adapter reproduces the trained model; the untouched base does not.
    reloaded = probe_logits(load_trained(base, spec.out_dir))
    torch.testing.assert_close(reloaded, snap["logits"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(probe_logits(load_model(base)), snap["logits"], atol=1e-2)

    again = within(RAY_TIMEOUT, train_variant, spec)
    assert again.skipped and again.steps == 24 and again.final_loss == result.final_loss


def test_three_variants_run_concurrently(ray_cluster, tiny_checkpoints, train_parquet, tmp_path):
    peers = tmp_path / "peers"
    peers.mkdir()
    specs = [spec_for(tiny_checkpoints[f], train_parquet, tmp_path / f, name=f"toy/{f}", max_steps=4,
                      cpus_per_worker=0.5, rope_base=20_000.0 * (i + 1),
                      ray_env={"NEEDLEWORK_TEST_RUN": f, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": 0.5})
             for i, f in enumerate(("llama", "mistral", "qwen2"))]
    # max_concurrent=3, not the slots free right now: an actor of an earlier test may still hold
    # a CPU for a moment, and two slots would leave two runs waiting for a third that never starts.
    results = within(RAY_TIMEOUT, train_all, specs, show_progress=False, max_concurrent=3,
                     callbacks=[WaitForPeers(str(peers), n=3)])

    assert [r.name for r in results] == ["toy/llama", "toy/mistral", "toy/qwen2"]
    for i, (family, r) in enumerate(zip(("llama", "mistral", "qwen2"), results)):
        assert r.out_dir == str(tmp_path / family) and not r.skipped and r.steps == 4
        meta = json.loads((tmp_path / family / "needlework_model.json").read_text())
        assert meta["model_type"] == family and meta["rope_base"] == 20_000.0 * (i + 1)
        assert (tmp_path / family / "done.json").exists()
    summaries = [json.loads((tmp_path / f / "summary.json").read_text()) for f in ("llama", "mistral", "qwen2")]
    assert max(s["started_at"] for s in summaries) < min(s["finished_at"] for s in summaries)
    # Each run's workers saw its own ray_env, the Ray Train variable included; the driver did not.
    seen = [json.loads(p.read_text()) for p in peers.iterdir()]
    assert sorted(s["NEEDLEWORK_TEST_RUN"] for s in seen) == ["llama", "mistral", "qwen2"]
    assert all(s["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5" for s in seen)
    assert "NEEDLEWORK_TEST_RUN" not in os.environ
    assert all(r.skipped for r in within(RAY_TIMEOUT, train_all, specs, show_progress=False))


def test_killed_worker_resumes_from_checkpoint(ray_cluster, tiny_checkpoints, train_parquet, tmp_path):
    marker = tmp_path / "killed"
    spec = spec_for(tiny_checkpoints["qwen2"], train_parquet, tmp_path / "out", save_steps=4, max_failures=1)
    result = within(RAY_TIMEOUT, train_variant, spec, callbacks=[KillOnce(6, str(marker), committed(spec))])

    assert marker.exists()  # the worker really died once
    assert result.steps == 16 and result.resumed_from_step == 4
    steps = pq.read_table(Path(spec.out_dir) / "metrics.parquet").column("step").to_pylist()
    assert steps == list(range(1, 17))  # the log history survived the restart


def test_interrupted_run_continues_on_rerun(ray_cluster, tiny_checkpoints, train_parquet, tmp_path):
    from ray.train import TrainingFailedError

    marker = tmp_path / "killed"
    spec = spec_for(tiny_checkpoints["llama"], train_parquet, tmp_path / "out", save_steps=4, max_failures=0)
    with pytest.raises(TrainingFailedError):
        within(RAY_TIMEOUT, train_variant, spec, callbacks=[KillOnce(6, str(marker), committed(spec))])
    assert marker.exists() and not (tmp_path / "out" / "done.json").exists()

    result = within(RAY_TIMEOUT, train_variant, spec)
    assert result.resumed_from_step == 4 and result.steps == 16 and not result.skipped


ZERO2 = {
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
}


def test_deepspeed_zero2_on_cpu(ray_cluster, tiny_checkpoints, train_parquet, tmp_path):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    base = tiny_checkpoints["llama"]
    spec = spec_for(base, train_parquet, tmp_path / "out", num_workers=2, deepspeed=ZERO2, epochs=2,
                    max_failures=0)
    # DeepSpeed may build its CPU Adam extension on first use: more time than the other runs.
    result = within(3 * RAY_TIMEOUT, train_variant, spec, callbacks=[Snapshot(str(tmp_path / "snap.pt"))])

    assert result.steps == 16
    loss = losses(spec.out_dir)
    assert sum(loss[-4:]) / 4 < sum(loss[:4]) / 4
    snap = torch.load(tmp_path / "snap.pt")
    assert snap["optimizer"] == "DeepSpeedZeroOptimizer"  # ZeRO stage 2 stepped the adapter, not torch.optim
    torch.testing.assert_close(probe_logits(load_trained(base, spec.out_dir)), snap["logits"],
                               atol=1e-4, rtol=1e-4)
