"""engine/calibrate.py: a calibration measured with the engine's own fine-tune and evaluation
code, in a Ray task on a real local cluster, and plans priced with exactly those figures."""

from __future__ import annotations

import json
import textwrap

import pytest

from engine.calibrate import calibrate, workload
from engine.config import load_experiment
from engine.cost import estimate_experiment
from engine.models import load_tokenizer
from engine.pipeline import plan

EXPERIMENT = """
name: calibrated
run_dir: {run_dir}
model: {{name: tiny, path: {ckpt}, max_context: 512}}
tasks:
  mdqa: {{variants: [real, base], n_train: 20, n_eval: 10, target_tokens: 200}}
train: {{batch_size: 1, max_steps: 2, max_length: 300, cpus_per_worker: 1}}
evaluate: {{batch_size: 2, cpus_per_actor: 1, max_new_tokens: 4}}
knockout: {{enabled: false}}
patching: {{enabled: false}}
"""


def test_workload_prompts_fit_the_target_and_mark_their_needle(tiny_checkpoints):
    tok = load_tokenizer(tiny_checkpoints["llama"])
    examples = workload(tok, 200, n=3)
    for ex in examples:
        assert 150 <= ex.n_tokens <= 200 and ex.n_tokens == len(tok(ex.prompt)["input_ids"])
        (span,) = ex.answer_spans
        assert span.text(ex.prompt) == ex.answers[0] == ex.target.strip()
        assert ex.needle_spans[0].text(ex.prompt) == ex.needles[0]


def test_calibration_is_measured_and_plans_use_it(ray_cluster, tiny_checkpoints, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(EXPERIMENT.format(run_dir=tmp_path / "run", ckpt=tiny_checkpoints["llama"])))
    exp = load_experiment(path)

    written = calibrate(exp, steps=2, new_tokens=16, timeout_s=600)

    assert written == tmp_path / "run" / "calibration.json"
    measured = json.loads(written.read_text())
    assert measured["model"] == exp.model.path and measured["device"] == "cpu"
    assert measured["context_tokens"] == 200 and measured["eval_batch_size"] == 2
    assert measured["generated_tokens"] > 2 * measured["eval_batch_size"]  # decoding went past the first token
    # durations of real work: positive whatever the machine's speed (t(16 new tokens) holds t(1)'s work and more)
    assert all(measured[k] > 0 for k in ("train_s_per_token", "prefill_s_per_token", "decode_s_per_token", "load_s"))
    assert measured["train_startup_s"] >= 0
    assert measured["provenance"]["torch_threads"] >= 1 and measured["provenance"]["git"]["commit"]

    table = estimate_experiment(exp, plan(exp))
    assert any(line.startswith("per-token costs: measured:") for line in table.inputs)
    stages = {s.stage: s for s in table.stages}
    # one CPU fine-tune: 2 steps x batch 1 x accumulation 4 x 200 tokens at the measured rate, plus start-up
    train = stages["train"]
    assert (train.jobs, train.gpu_hours) == (1, 0.0)
    want = 2 * 1 * 4 * 200 * measured["train_s_per_token"] + measured["train_startup_s"]
    assert train.wall_hours * 3600 == pytest.approx(want)
