"""The GPU path, where a CUDA GPU and the `gpu` extra (flash-attn) are installed:

    pytest -m gpu tests/engine/test_gpu.py

- an evaluation actor given a GPU by Ray holds a bfloat16 model on CUDA;
- FlashAttention-2 prefill with inline scoring decodes the same tokens and gives the same head
  scores as SDPA (the reference);
- a LoRA fine-tune with gradient checkpointing trains the adapter on the GPU.

Plain `pytest` deselects them by the `gpu` marker (pyproject.toml); nothing inside a test skips.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import TrainerCallback

from engine.config import EvaluateConfig, ModelConfig, ScoringConfig, TrainConfig
from engine.decode import ScoreSpans, greedy_decode
from engine.evaluate import EvalJob, EvalWorker, ModelRef, run_jobs
from engine.models import load_tokenizer
from engine.placement import Placement, held, load_configured, resolve_placement
from engine.train_spec import TrainSpec
from engine.train_worker import train_loop_per_worker
from eval_data import write_eval_set
from tasks import needle

pytestmark = pytest.mark.gpu
NQ = Path(__file__).parents[2] / "data/nq-open-oracle.jsonl.gz"
HALF = "bfloat16"  # every GPU the study runs on (A100, H100) supports it


def test_an_evaluation_actor_given_a_gpu_holds_a_bfloat16_model_on_cuda(tiny_checkpoints, ray_cluster, tmp_path):
    import ray

    evaluate = EvaluateConfig(num_actors=1, cpus_per_actor=1, gpus_per_actor=1, shard_size=4, max_new_tokens=4,
                              timeout_s=600)
    ref = ModelRef(ModelConfig("tiny", tiny_checkpoints["llama"], dtype="auto"))
    data = write_eval_set(tmp_path / "eval.parquet", 4)
    job = EvalJob("gpu", ref, "mdqa", data, str(tmp_path / "gpu"), evaluate, ScoringConfig())

    actor = ray.remote(EvalWorker).options(num_cpus=1, num_gpus=1).remote(torch_threads=1)
    try:
        ray.get(actor.run.remote(job, 0, pq.read_table(data).to_pylist()), timeout=600)
        placed = ray.get(actor.held.remote(), timeout=60)
    finally:
        ray.kill(actor)
    assert placed["device"].startswith("cuda:") and placed["dtype"] == HALF, placed
    summary = run_jobs([job], show_progress=False)["gpu"]
    assert [p["dtype"] for p in summary["placement"]] == [HALF]
    assert all(p["device"].startswith("cuda:") for p in summary["placement"])


def test_flash_attention_prefill_with_inline_scoring_equals_sdpa(tmp_path):
    from engine.model_sources import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(path)
    examples = needle.build("real", sources={"haystack": str(NQ)}, options={}, tokenizer=tok, target_tokens=512,
                            n=4, seed=0, split="train").examples
    spans = [ScoreSpans(tuple((s.start, s.end) for s in e.answer_spans),
                        tuple((s.start, s.end) for s in e.needle_spans)) for e in examples]
    decoded = {}
    for attn in ("sdpa", "flash_attention_2"):
        section = ModelConfig("smollm2", path, dtype="bfloat16", attn_implementation=attn)
        resolved = resolve_placement(section, gpus=1)
        model = load_configured(section, resolved)
        assert held(model) == resolved == Placement(resolved.device, HALF, attn)
        decoded[attn] = greedy_decode(model, tok, [e.prompt for e in examples], max_new_tokens=12, spans=spans,
                                      stop_strings=("\n",), batch_size=2, chat_template=True, keep_argmax=True)
        del model
        torch.cuda.empty_cache()
    for sdpa, flash, example in zip(decoded["sdpa"], decoded["flash_attention_2"], examples):
        assert example.meta["key"] in sdpa.text  # the reference retrieves: the comparison has teeth
        assert flash.token_ids == sdpa.token_ids
        np.testing.assert_array_equal(flash.argmax, sdpa.argmax)
        np.testing.assert_array_equal(flash.retrieval, sdpa.retrieval)
        np.testing.assert_array_equal(flash.insight, sdpa.insight)


class Seen(TrainerCallback):
    """Records, at the start of training, where the model is and whether it checkpoints."""

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        parameter = next(p for p in model.parameters() if p.requires_grad)
        Path(self.path).write_text(json.dumps({
            "device": str(parameter.device), "checkpointing": bool(model.is_activation_checkpointing),
            "bf16": bool(args.bf16), "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }))


def test_a_lora_fine_tune_with_gradient_checkpointing_trains_on_the_gpu(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file

    from tasks.example import Example, Span, to_table

    keys = ["".join(chr(97 + (i * 7 + j * 3) % 8) for j in range(4)) for i in range(16)]
    prompts = [f"key {k} value {k[::-1]}. key {k}? " for k in keys]
    data = tmp_path / "train.parquet"
    pq.write_table(to_table([Example(str(i), "toy", "hh", p, k[::-1], (k[::-1],), Span(0, len(p)), (), (), ())
                             for i, (k, p) in enumerate(zip(keys, prompts))]), data)
    train = TrainConfig(max_length=128, grad_accum=1, lr=2e-2, max_steps=8, save_steps=100, gpus_per_worker=1,
                        gradient_checkpointing=True)
    spec = TrainSpec("gpu/ckpt", ModelConfig("tiny", tiny_checkpoints["llama"]), train, str(data), None,
                     str(tmp_path / "out"))
    train_loop_per_worker({"spec": spec, "callbacks": [Seen(str(tmp_path / "seen.json"))]})

    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["device"].startswith("cuda") and seen["checkpointing"] and seen["bf16"], seen
    done = json.loads((tmp_path / "out" / "done.json").read_text())
    assert done["steps"] == 8
    losses = pq.read_table(tmp_path / "out" / "metrics.parquet")["loss"].to_pylist()
    assert len(losses) == 8 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
