"""vLLM through Ray Data (`ray.data.llm`, Ray 2.60) on GPU workers.

The processor is `ray.data.llm.build_processor(vLLMEngineProcessorConfig(...))`: chat
template -> tokenize -> vLLM engine -> detokenize stages, with `concurrency` engine
replicas of `tensor_parallel_size` GPUs each. vLLM pins its own torch, so it comes from the
cluster image or from `synth.runtime_env` (e.g. `{"pip": ["vllm"]}`), never from the CPU
install; building the processor needs no vLLM, running it does.

Example:
    >>> config = SynthConfig(backend="vllm", model="meta-llama/Meta-Llama-3-8B-Instruct",
    ...                      tensor_parallel_size=2, concurrency=2, batch_size=64)
    >>> VLLMBackend(config).complete([[{"role": "user", "content": "Name a colour."}]], [0])
"""

from __future__ import annotations

import functools
import json

from engine.synth.config import SynthConfig


def processor_config(config: SynthConfig):
    """The `vLLMEngineProcessorConfig` for `config` (model, parallelism, batch size, env)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    engine_kwargs = {"tensor_parallel_size": config.tensor_parallel_size, **(config.engine_kwargs or {})}
    return vLLMEngineProcessorConfig(
        model_source=config.model,
        engine_kwargs=engine_kwargs,
        concurrency=config.concurrency,
        batch_size=config.batch_size,
        runtime_env=config.runtime_env,
    )


def sampling_params(config: SynthConfig, seed: int) -> dict:
    """vLLM `SamplingParams` fields for one row; the seed makes each row reproducible."""
    return dict(
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=int(seed),
    )


def preprocess_row(row: dict, config: SynthConfig) -> dict:
    return dict(
        index=row["index"],
        messages=json.loads(row["chat"]),
        sampling_params=sampling_params(config, row["seed"]),
    )


def postprocess_row(row: dict) -> dict:
    return dict(index=row["index"], text=row["generated_text"])


def build_vllm_processor(config: SynthConfig):
    """The Ray Data LLM processor; call it on a dataset of rows {index, chat, seed}."""
    from ray.data.llm import build_processor

    return build_processor(
        processor_config(config),
        preprocess=functools.partial(preprocess_row, config=config),
        postprocess=postprocess_row,
    )


class VLLMBackend:
    """Generates with a vLLM processor over `ray.data.from_items`; rows keep their index."""

    def __init__(self, config: SynthConfig):
        self.config = config
        self._processor = None

    def complete(self, chats: list[list[dict]], seeds: list[int]) -> list[str]:
        import ray

        if not chats:
            return []
        if self._processor is None:
            self._processor = build_vllm_processor(self.config)
        rows = [{"index": i, "chat": json.dumps(c), "seed": int(s)} for i, (c, s) in enumerate(zip(chats, seeds))]
        texts: list[str | None] = [None] * len(chats)
        for row in self._processor(ray.data.from_items(rows)).iter_rows():
            texts[int(row["index"])] = str(row["text"])
        missing = [i for i, t in enumerate(texts) if t is None]
        if missing:
            raise RuntimeError(f"vllm backend returned no text for rows {missing[:10]}")
        return texts  # type: ignore[return-value]
