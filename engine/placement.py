"""Where and how a stage holds its model: device, dtype and attention backend, from `model:` alone.

Every process that loads a model (a Ray Train worker, an evaluation, knockout or patching actor,
an `hf` synthesis actor, the calibration task) calls `resolve_placement` with the experiment's
`ModelConfig` and the GPUs Ray reserved for it, and loads with what comes back
(`load_configured`):

- device: the process's GPU when Ray gave it one (Ray exposes only the reserved GPUs, so it is
  the current CUDA device), else the CPU. A process given GPUs that torch cannot see is an error,
  never a silent fall back to the CPU.
- dtype: `model.dtype`; "auto" is bfloat16 on a GPU that supports it (float16 on one that does
  not) and float32 on the CPU.
- attention: `model.attn_implementation`; unset, FlashAttention-2 where it can run (a CUDA
  device, flash-attn installed, a 16-bit dtype), else SDPA. Set to "flash_attention_2" where it
  cannot run, loading fails with the reason and the way out, rather than falling back: a run
  that asked for FlashAttention-2 would otherwise measure a slower backend without saying so.

Example:
    >>> resolve_placement(ModelConfig("m", "/models/m", dtype="auto"), gpus=0)
    Placement(device='cpu', dtype='float32', attn_implementation='sdpa')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import is_flash_attn_2_available

from engine.config import ModelConfig
from engine.models import ModelError, load_model, load_trained

FLASH = "flash_attention_2"
HALF = ("bfloat16", "float16")  # the dtypes FlashAttention-2 runs in


@dataclass(frozen=True)
class Placement:
    """How one process holds a model."""

    device: str  # "cpu" or "cuda:<index>"
    dtype: str  # a torch dtype's name: "float32", "bfloat16", "float16"
    attn_implementation: str  # "sdpa" or "flash_attention_2"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"


def resolve_placement(model: ModelConfig, gpus: float = 0) -> Placement:
    """The device, dtype and attention backend of `model` in a process holding `gpus` GPUs.

    Args:
        model: the experiment's model section (`dtype`, `attn_implementation`).
        gpus: GPUs Ray reserved for this process (`train.gpus_per_worker`,
            `evaluate.gpus_per_actor`, `synth.num_gpus`); 0 places the model on the CPU even
            where a GPU is visible, as the stage asked for none.

    Raises:
        ModelError: GPUs reserved but no CUDA device visible to torch, or FlashAttention-2
            asked for where it cannot run.
    """
    if gpus > 0:
        if not torch.cuda.is_available():
            raise ModelError(
                f"{gpus:g} GPU(s) reserved for this process, but torch {torch.__version__} sees no CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); install a CUDA build of torch "
                f"on the GPU nodes, or reserve 0 GPUs to run on the CPU")
        device = f"cuda:{torch.cuda.current_device()}"
    else:
        device = "cpu"
    dtype = model.dtype
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    attn = model.attn_implementation
    why_not_flash = _why_not_flash(device, dtype)
    if attn is None:
        attn = "sdpa" if why_not_flash else FLASH
    elif attn == FLASH and why_not_flash:
        raise ModelError(f"model.attn_implementation: {FLASH} cannot run here: {why_not_flash}; set it to sdpa, "
                         f"or leave it unset for FlashAttention-2 wherever it can run and SDPA elsewhere")
    return Placement(device=device, dtype=dtype, attn_implementation=attn)


def _why_not_flash(device: str, dtype: str) -> str | None:
    if device == "cpu":
        return "the model is on the CPU (no GPU reserved)"
    if dtype not in HALF:
        return f"model.dtype is {dtype}; FlashAttention-2 runs in {' or '.join(HALF)}"
    if not is_flash_attn_2_available():
        return "flash-attn is not installed (pip install 'needlework[gpu]')"
    return None


def load_configured(model: ModelConfig, placement: Placement, adapter_dir: str | Path | None = None, *,
                    merge: bool = True, instrumented: bool = True):
    """The model a stage uses: `model.path` with the section's RoPE base, sliding window and
    remote-code setting (an adapter's recorded extension settings win), placed as `placement`
    says, with the LoRA adapter at `adapter_dir` merged (`merge=False`: kept as a PEFT model)."""
    placed = dict(dtype=placement.torch_dtype, attn_implementation=placement.attn_implementation,
                  device=placement.device, trust_remote_code=model.trust_remote_code)
    if adapter_dir is None:
        return load_model(model.path, rope_base=model.rope_base, sliding_window=model.sliding_window,
                          instrumented=instrumented, **placed)
    return load_trained(model.path, adapter_dir, rope_base=model.rope_base, sliding_window=model.sliding_window,
                        merge=merge, **placed)


def held(model) -> Placement:
    """The placement a loaded model actually has: its parameters' device and dtype, its backend."""
    parameter = next(model.parameters())
    backend = model.config._attn_implementation
    return Placement(device=str(parameter.device), dtype=str(parameter.dtype).removeprefix("torch."),
                     attn_implementation=backend)
