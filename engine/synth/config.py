"""Synthesis settings: the `synth:` section of an experiment YAML, one key per field.

Example YAML (every key optional; unknown keys are an error in the config loader):

    synth:
      backend: vllm                     # template | hf | http | vllm
      model: meta-llama/Meta-Llama-3-8B-Instruct
      max_tokens: 256
      temperature: 0.7
      top_p: 0.95
      concurrency: 2                    # vLLM engines / hf actors / parallel HTTP requests
      batch_size: 32
      tensor_parallel_size: 1
      max_retries: 3
      on_invalid: fallback              # or raise
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# How the hf backend draws sampled tokens, part of its cache keys since a change of it changes
# what a seed writes. 1: rows sampled one at a time under torch.manual_seed; 2: each row from its
# own generator inside a batch (engine.synth.hf.RowSampler).
HF_SAMPLER_VERSION = 2

BACKENDS = ("template", "hf", "http", "vllm")
ON_INVALID = ("fallback", "raise")


@dataclass(frozen=True)
class SynthConfig:
    """How text is generated.

    Attributes:
        backend: "template" (no LLM), "hf" (transformers in Ray Data actors), "http" (an
            OpenAI-compatible chat endpoint) or "vllm" (`ray.data.llm` on GPU workers).
        model: HF id or local path (hf, vllm); the served model name (http).
        base_url: endpoint root for http, e.g. "http://127.0.0.1:8000/v1".
        api_key_env: name of the environment variable holding the http API key, if any.
        max_tokens: generation budget per request.
        temperature: sampling temperature; 0 means greedy, and then invalid outputs are
            not retried (a new seed would reproduce them) but go straight to `on_invalid`.
        top_p: nucleus sampling mass.
        concurrency: vLLM engine replicas, hf actors, or parallel HTTP requests.
        batch_size: rows per Ray Data batch (hf, vllm).
        tensor_parallel_size: GPUs per vLLM engine.
        num_gpus: GPUs per hf actor (0 for CPU).
        max_retries: regenerations (with new seeds) of an invalid output before giving up.
        timeout_s: per-HTTP-request timeout in seconds.
        on_invalid: after `max_retries`, "fallback" returns the request's template and
            counts it under `fallback` in the report; "raise" raises `SynthError`.
        runtime_env: Ray runtime_env for the vLLM stage, e.g. {"pip": ["vllm"]} when the
            cluster image has no vLLM.
        engine_kwargs: extra vLLM engine arguments (max_model_len, dtype, ...).
    """

    backend: str = "template"
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    concurrency: int = 1
    batch_size: int = 8
    tensor_parallel_size: int = 1
    num_gpus: float = 0
    max_retries: int = 3
    timeout_s: float = 60
    on_invalid: str = "fallback"
    runtime_env: dict | None = None
    engine_kwargs: dict | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"synth.backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.on_invalid not in ON_INVALID:
            raise ValueError(f"synth.on_invalid {self.on_invalid!r} is not one of {', '.join(ON_INVALID)}")
        if self.backend in ("hf", "vllm", "http") and not self.model:
            raise ValueError(f"synth.model is required for backend {self.backend!r}")
        if self.backend == "http" and not self.base_url:
            raise ValueError("synth.base_url is required for backend 'http'")
        for name in ("max_tokens", "concurrency", "batch_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"synth.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("synth: need max_retries >= 0, timeout_s > 0, temperature >= 0, 0 < top_p <= 1")

    def identity(self) -> dict[str, Any]:
        """What changes the generated text; part of every cache key (concurrency does not)."""
        identity = dict(
            backend=self.backend,
            model=self.model,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
        )
        if self.backend == "hf" and self.temperature > 0:
            identity["sampler"] = HF_SAMPLER_VERSION
        return identity


def synth_config_from_dict(data: dict, source: str = "synth") -> SynthConfig:
    """Maps a YAML `synth:` mapping onto `SynthConfig`; an unknown key names `source`."""
    known = {f.name for f in fields(SynthConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown synth key(s) {unknown}; known: {sorted(known)}")
    return SynthConfig(**data)
