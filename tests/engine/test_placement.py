"""engine/placement.py: device, dtype and attention backend from the model section and the GPUs
a process holds; the loaded model holds what was resolved.

On this CPU machine the GPU branches are exercised with torch's CUDA queries replaced (the rule
is the function's own); tests/engine/test_gpu.py checks them on a real GPU.
"""

from __future__ import annotations

import pytest
import torch

import engine.placement as placement
from engine.config import ModelConfig
from engine.models import ModelError
from engine.placement import Placement, held, load_configured, resolve_placement


def section(**changes) -> ModelConfig:
    return ModelConfig("tiny", "unused", **changes)


def test_cpu_without_gpus_is_float32_sdpa_unless_configured():
    assert resolve_placement(section(), gpus=0) == Placement("cpu", "float32", "sdpa")
    assert resolve_placement(section(dtype="bfloat16"), gpus=0) == Placement("cpu", "bfloat16", "sdpa")
    assert resolve_placement(section(dtype="float16", attn_implementation="sdpa")) == Placement("cpu", "float16", "sdpa")


def test_flash_attention_asked_for_where_it_cannot_run_is_an_error_naming_the_key():
    with pytest.raises(ModelError, match=r"model\.attn_implementation: flash_attention_2 cannot run here: the model "
                                         r"is on the CPU \(no GPU reserved\); set it to sdpa"):
        resolve_placement(section(attn_implementation="flash_attention_2"), gpus=0)


def test_gpus_reserved_but_no_cuda_visible_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"1 GPU\(s\) reserved for this process, but torch .* sees no CUDA device"):
        resolve_placement(section(), gpus=1)


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch reports one CUDA device (index 0); bf16 support and flash-attn set per test."""
    state = {"bf16": True, "flash": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: state["bf16"])
    monkeypatch.setattr(placement, "is_flash_attn_2_available", lambda: state["flash"])
    return state


def test_auto_on_a_gpu_is_bfloat16_or_float16_and_flash_attention_where_installed(fake_gpu):
    assert resolve_placement(section(), gpus=1) == Placement("cuda:0", "bfloat16", "sdpa")
    fake_gpu["flash"] = True
    assert resolve_placement(section(), gpus=0.5) == Placement("cuda:0", "bfloat16", "flash_attention_2")
    assert resolve_placement(section(attn_implementation="sdpa"), gpus=1) == Placement("cuda:0", "bfloat16", "sdpa")
    # FlashAttention-2 runs in 16 bits only: a float32 model keeps SDPA, and asking for it fails
    assert resolve_placement(section(dtype="float32"), gpus=1) == Placement("cuda:0", "float32", "sdpa")
    with pytest.raises(ModelError, match=r"model\.dtype is float32; FlashAttention-2 runs in bfloat16 or float16"):
        resolve_placement(section(dtype="float32", attn_implementation="flash_attention_2"), gpus=1)
    fake_gpu["bf16"] = False  # a GPU without bfloat16 (V100, T4)
    assert resolve_placement(section(), gpus=1) == Placement("cuda:0", "float16", "flash_attention_2")
    # the stage reserved no GPU: the CPU, whatever the machine has
    assert resolve_placement(section(), gpus=0) == Placement("cpu", "float32", "sdpa")


def test_flash_attention_not_installed_on_a_gpu_names_the_extra(fake_gpu):
    with pytest.raises(ModelError, match=r"flash-attn is not installed \(pip install 'needlework\[gpu\]'\)"):
        resolve_placement(section(attn_implementation="flash_attention_2"), gpus=1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_loaded_model_holds_what_was_resolved(tiny_checkpoints, dtype):
    model = ModelConfig("tiny", tiny_checkpoints["qwen2"], rope_base=50_000.0, dtype=dtype)
    resolved = resolve_placement(model, gpus=0)
    loaded = load_configured(model, resolved)
    assert held(loaded) == resolved == Placement("cpu", dtype, "sdpa")
    assert {p.dtype for p in loaded.parameters()} == {getattr(torch, dtype)}
    assert loaded.config.rope_parameters["rope_theta"] == 50_000.0
