"""engine/cost.py and engine/cost_inputs.py: the cost arithmetic against hand-computed values,
the largest cluster of a launcher file, stated rates from specs, measured rates from a
calibration file, and the request counts against the task builders themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.config import load_experiment
from engine.cost import estimate, estimate_experiment, lpt_makespan, pool_time, synth_requests
from engine.cost_inputs import (CostError, InstanceType, Prices, Rates, attended_keys, load_cluster, load_prices,
                                stated_rates)
from engine.pipeline import plan

ROOT = Path(__file__).parents[2]
HOUR = 3600.0


def test_lpt_and_pool_time_by_hand():
    # longest first to the freest slot: 5 | 4, then 3 -> slot 2 (7), 3 -> slot 1 (8), 2 -> slot 2 (9)
    assert lpt_makespan([3, 5, 2, 4, 3], slots=2) == 9
    assert lpt_makespan([3, 5, 2, 4, 3], slots=10) == 5
    assert lpt_makespan([], slots=2) == 0
    # 34 s of shards and max(2 models, 3 actors) = 3 loads of 5 s: 49 actor-seconds, 49 / 3 > 10 + 5
    busy, wall = pool_time([10, 10, 10, 4], models=2, actors=3, load_s=5)
    assert busy == 49 and wall == pytest.approx(49 / 3)
    # one long shard bounds the wall time: max(26 / 2, 20 + 3)
    assert pool_time([20, 1, 1], models=1, actors=2, load_s=3) == (28, 23)
    with pytest.raises(CostError, match="no slot fits a job"):
        lpt_makespan([1.0], slots=0)


PRICES = """
date: 2026-01-01
region: test
instances:
  head.large: {usd_per_hour: 1.0, gpus: 0, vcpus: 8}
  gpu.one: {usd_per_hour: 3.0, gpus: 1, vcpus: 8, gpu: G}
  gpu.eight: {usd_per_hour: 16.0, gpus: 8, vcpus: 96, gpu: G}
"""
CLUSTER = """
max_workers: 6
head_node_type: head
available_node_types:
  head: {node_config: {InstanceType: head.large}, resources: {}}
  one: {min_workers: 0, max_workers: 8, node_config: {InstanceType: gpu.one}}
  eight: {min_workers: 0, max_workers: 2, node_config: {InstanceType: gpu.eight}}
  one_spot: {max_workers: 8, node_config: {InstanceType: gpu.one, InstanceMarketOptions: {MarketType: spot}}}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_largest_cluster_fills_the_cap_with_the_biggest_nodes_first(tmp_path):
    prices = load_prices(write(tmp_path / "prices.yaml", PRICES))
    cluster = load_cluster(write(tmp_path / "cluster.yaml", CLUSTER), prices)
    # the cap of 6 nodes: both 8-GPU nodes, then 4 of the 1-GPU ones; spot capacity is left out
    assert [(t.name, n) for t, n in cluster.workers] == [("gpu.eight", 2), ("gpu.one", 4)]
    assert cluster.gpus == 20 and cluster.gpu == "G" and cluster.head.name == "head.large"
    assert cluster.slots(1) == 20 and cluster.slots(8) == 2 and cluster.slots(2) == 8
    assert cluster.usd_per_gpu_hour(1) == 2.0  # 16 / 8 beats 3 / 1
    assert cluster.usd_per_gpu_hour(8) == 2.0
    with pytest.raises(CostError, match="no node type of the cluster has 16 GPUs"):
        cluster.usd_per_gpu_hour(16)
    bad = write(tmp_path / "bad.yaml", CLUSTER.replace("InstanceType: gpu.one}", "InstanceType: gpu.two}", 1))
    with pytest.raises(CostError, match=r"bad.yaml: node type 'one' is gpu.two, which .*prices.yaml does not price"):
        load_cluster(bad, prices)


def test_shipped_cluster_and_price_table_load():
    cluster = load_cluster(ROOT / "cluster.yaml", load_prices(ROOT / "data/costs/prices.yaml"))
    # 2 x p5.48xlarge + 8 x p5.4xlarge under max_workers 16; the spot type is not counted
    assert cluster.gpus == 24 and cluster.gpu == "H100-80GB"
    assert cluster.prices.date and cluster.head.name == "m6i.4xlarge"


EXPERIMENT = """
name: costed
run_dir: {run_dir}
model: {{name: m, path: org/model, max_context: 2048}}
tasks:
  mdqa:
    variants: [real, hl, base]
    n_train: 100
    n_eval: 20
    target_tokens: 1000
train: {{gpus_per_worker: 1, epochs: 1}}
evaluate: {{batch_size: 4, shard_size: 10, gpus_per_actor: 1, max_new_tokens: 10}}
knockout: {{ks: [0, 2], seeds: [0, 1]}}
patching: {{seeds: [0]}}
"""
RATES = Rates(train_s_per_token=1e-3, prefill_s_per_token=1e-4, decode_s_per_token=1e-2, train_startup_s=100,
              load_s=50, source="test")


def hand_cluster():
    head = InstanceType("head", 1.0, 0, 8)
    gpu = InstanceType("gpu", 2.0, 1, 8, "G")
    from engine.cost_inputs import Cluster

    return Cluster(head, ((gpu, 2),), Prices("2026-01-01", "test", {"head": head, "gpu": gpu}, "test"))


def test_estimate_matches_a_hand_computed_grid(tmp_path):
    exp = load_experiment(write(tmp_path / "exp.yaml", EXPERIMENT.format(run_dir=tmp_path / "run")))
    table = estimate(exp, plan(exp), hand_cluster(), RATES, synth=None, fit_s_per_token=1e-6)
    got = {s.stage: s for s in table.stages}
    # data: real builds 100 + 20 prompts, hl 100, of 1000 tokens at 1e-6 s; templates, no GPU
    assert (got["data"].jobs, got["data"].gpu_hours) == (2, 0.0)
    assert got["data"].wall_hours * HOUR == pytest.approx(0.22)
    # train: 90 train examples x 1000 tokens x 1e-3 s + 100 s start-up = 190 s each; 2 slots
    assert got["train"].jobs == 2
    assert got["train"].gpu_hours * HOUR == pytest.approx(380)
    assert got["train"].wall_hours * HOUR == pytest.approx(190)
    # an example: 1000 x 1e-4 + 10 x 1e-2 = 0.2 s. evaluate: 3 models x (2 shards of the real set's
    # 20 + 1 shard of the 10 validation examples) x 2 s = 18 s, 3 loads of 50 s on 2 actors
    assert got["evaluate"].jobs == 6
    assert got["evaluate"].gpu_hours * HOUR == pytest.approx(18 + 3 * 50)
    assert got["evaluate"].wall_hours * HOUR == pytest.approx((18 + 150) / 2)
    # knockout of real: k=0 top, k=2 top and 2 random = 4 runs x 2 shards x 2 s, 2 loads (one per actor)
    assert got["knockout"].jobs == 4
    assert got["knockout"].gpu_hours * HOUR == pytest.approx(16 + 2 * 50)
    assert got["knockout"].wall_hours * HOUR == pytest.approx((16 + 100) / 2)
    # patching hl: 3 sets x 1 seed x 2 shards of 10 x (2 x 0.1 + 0.1) s = 18 s, 2 loads
    assert got["patching"].jobs == 3
    assert got["patching"].gpu_hours * HOUR == pytest.approx(18 + 2 * 50)
    assert got["patching"].wall_hours * HOUR == pytest.approx((18 + 100) / 2)
    wall = 0.22 + 190 + 84 + 58 + 59
    assert table.total.wall_hours * HOUR == pytest.approx(wall)
    assert table.head_usd == pytest.approx(wall / HOUR * 1.0)
    gpu_seconds = 380 + 168 + 116 + 118
    assert table.total.gpu_hours * HOUR == pytest.approx(gpu_seconds)
    assert table.total.usd == pytest.approx(gpu_seconds / HOUR * 2.0 + wall / HOUR * 1.0)


def test_estimate_counts_only_outputs_not_done(tmp_path):
    exp = load_experiment(write(tmp_path / "exp.yaml", EXPERIMENT.format(run_dir=tmp_path / "run")))
    rows = [{**r, "done": r["stage"] != "train" or r["run"] != "real"} for r in plan(exp)]
    table = estimate(exp, rows, hand_cluster(), RATES, synth=None, fit_s_per_token=1e-6)
    (train,) = [s for s in table.stages if s.stage == "train"]
    assert train.jobs == 1 and train.gpu_hours * HOUR == pytest.approx(190)
    assert table.total.jobs == 1


def test_stated_rates_by_hand():
    table = {
        "gpus": {"G": {"bf16_flops": "1e12", "memory_bytes_per_s": 1e11}},
        "models": {"m": {"params": 1e9, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 8, "hidden": 100,
                         "vocab": 1000}},
        "assumptions": {"train_mfu": 0.5, "prefill_mfu": 0.5, "memory_efficiency": 0.5,
                        "decode_step_overhead_s": 0.01, "train_startup_s": 7, "model_load_s": 3, "bytes_per_param": 2},
    }
    r = stated_rates(table, "m", "G", context=1000, window=None, batch=4, checkpointing=True)
    matmul = 2 * (1e9 - 1000 * 100)  # the input embedding is a lookup, not a matmul
    attention = 4 * 2 * 4 * 8 * 500  # 500 keys on average in a causal sequence of 1000
    assert r.train_s_per_token == pytest.approx((3 * matmul + 4.5 * attention) / 5e11)
    assert r.prefill_s_per_token == pytest.approx((matmul + attention) / 5e11)
    # memory-bound step: 2 GB of weights + 4 x (K and V: 2 x 2 layers x 2 heads x 8 x 2 B x 1000 keys)
    memory = (2e9 + 4 * 2 * 2 * 2 * 8 * 2 * 1000) / (1e11 * 0.5)
    assert r.decode_s_per_token == pytest.approx((memory + 0.01) / 4)
    assert (r.train_startup_s, r.load_s) == (7, 3)
    no_ckpt = stated_rates(table, "m", "G", context=1000, window=None, batch=4, checkpointing=False)
    assert no_ckpt.train_s_per_token == pytest.approx((2 * matmul + 3.5 * attention) / 5e11)
    assert attended_keys(1000, 200) == pytest.approx(200 - 200 * 200 / 2000)
    assert attended_keys(1000, 4000) == 500
    with pytest.raises(CostError, match="no shape for model 'other'.*scripts/bench_cost.py"):
        stated_rates(table, "other", "G", 1000, None, 4, True)
    with pytest.raises(CostError, match="no specs for GPU 'H'"):
        stated_rates(table, "m", "H", 1000, None, 4, True)


def test_calibration_replaces_stated_rates(tmp_path):
    exp_path = write(tmp_path / "exp.yaml", EXPERIMENT.format(run_dir=tmp_path / "run"))
    exp = load_experiment(exp_path)
    rows = plan(exp)
    with pytest.raises(CostError, match="no shape for model 'org/model'"):
        estimate_experiment(exp, rows)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    measured = {"model": "org/model", "device": "test-gpu", "measured_at": "2026-01-01", "context_tokens": 1000,
                **{k: getattr(RATES, k) for k in ("train_s_per_token", "prefill_s_per_token", "decode_s_per_token",
                                                  "train_startup_s", "load_s")}}
    (run_dir / "calibration.json").write_text(json.dumps(measured))
    table = estimate_experiment(exp, rows)
    assert any(line.startswith("per-token costs: measured:") and "test-gpu" in line for line in table.inputs)
    (train,) = [s for s in table.stages if s.stage == "train"]
    assert train.gpu_hours * HOUR == pytest.approx(380)  # the measured rates, as in the hand-computed grid
    (run_dir / "calibration.json").write_text(json.dumps({**measured, "model": "org/other"}))
    with pytest.raises(CostError, match=r"calibration.json: measured for model 'org/other'"):
        estimate_experiment(exp, rows)


class CountingSynth:
    """Counts what a task asks an LLM for, answering with each request's template."""

    def __init__(self):
        self.calls, self.requests = 0, 0

    def generate(self, requests):
        self.calls += 1
        self.requests += len(requests)
        return [r.template for r in requests]


@pytest.mark.parametrize("task", ["mdqa", "musique", "summhay"])
@pytest.mark.parametrize("variant", ["hh", "hl", "lh", "ll", "symbolic"])
def test_synth_request_counts_match_the_task_builders(task, variant):
    from tasks import get_task
    from tiny import char_tokenizer

    synth, options = CountingSynth(), {"pool_size": 5}
    get_task(task).build(variant, sources={}, options=options, tokenizer=char_tokenizer(), target_tokens=3000,
                         n=3, seed=0, split="train", synth=synth)
    assert synth_requests(task, variant, 3, options) == (synth.requests, synth.calls)


def test_plan_cost_of_the_paper_mdqa_config_lists_l1_to_l3():
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "engine.cli", "plan", "experiments/paper/llama3_8b_mdqa.yaml",
                          "run_dir=/nonexistent/needlework-plan", "--cost"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for variant in ("real_limited_l1", "real_limited_l2", "real_limited_l3"):
        assert f"│ mdqa │ {variant} " in out.stdout
    for stage in ("data", "train", "evaluate", "knockout", "patching", "total"):
        assert f"│ {stage} " in out.stdout
    assert "per-token costs: stated:" in out.stdout and "prices: " in out.stdout
