"""transformers `generate` in Ray Data actors, so a CPU or a small GPU can synthesize.

`HFGenerator` is a plain class (callable on a batch, testable without Ray); `HFBackend`
runs it with `Dataset.map_batches` over a fixed pool of `concurrency` actors, each loading
the model once, as every stage loads a model: from a `ModelConfig` (`synth_model`), placed by
`engine.placement.resolve_placement` for the actor's `num_gpus` (bfloat16 and FlashAttention-2
on a GPU where they run, float32 and SDPA on the CPU). Decoding is batched, greedy or sampled:
sampling draws each row's tokens from its own `torch.Generator` seeded by the row's seed
(`RowSampler`, a logits processor ahead of a greedy pick), so a row's text depends only on its
own prompt and seed, never on which rows shared its batch (the cache key assumes exactly that).

Example:
    >>> backend = HFBackend(SynthConfig(backend="hf", model="Qwen/Qwen2.5-0.5B-Instruct",
    ...                                 temperature=0, concurrency=1, batch_size=8))
    >>> backend.complete([[{"role": "user", "content": "Name a colour."}]], seeds=[0])
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from engine.config import ModelConfig
from engine.synth.config import SynthConfig


def synth_model(config: SynthConfig) -> ModelConfig:
    """The synthesis model as a model section: `synth.model` (a fetchable model by name, such as
    smollm2-135m-instruct, is its cached checkpoint), its dtype and attention left to the placement."""
    from engine.model_sources import resolve_model

    return ModelConfig(name=config.model, path=resolve_model(config.model))


def render_chat(tokenizer, chat: list[dict]) -> str:
    """The prompt text: the model's chat template, or a plain transcript if it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role']}: {m['content']}" for m in chat]
    return "\n".join(lines) + "\nassistant:"


class RowSampler(LogitsProcessor):
    """Samples the next token of each row from its own generator, after transformers' own
    temperature and top-p warpers (the smallest set of tokens whose probability reaches
    `top_p`), and leaves every other token at -inf, so that a greedy `generate` emits exactly
    the sampled tokens."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device):
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                           + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(self.warpers(input_ids, scores.float()), dim=-1)
        picked = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, picked, 0.0)


class HFGenerator:
    """Loads a causal LM once and generates for batches of rows {index, chat, seed}."""

    def __init__(
        self,
        model: ModelConfig,
        max_tokens: int,
        temperature: float,
        top_p: float,
        gpus: float = 0,
        torch_threads: int = 1,
    ):
        from engine.models import load_tokenizer
        from engine.placement import load_configured, resolve_placement

        torch.set_num_threads(torch_threads)
        self.placement = resolve_placement(model, gpus)
        self.device = self.placement.device
        self.tokenizer = load_tokenizer(model.path, trust_remote_code=model.trust_remote_code)  # pads on the left
        # safetensors only (a pickle checkpoint could run code while it loads); any causal LM,
        # not only the families whose heads the engine instruments
        self.model = load_configured(model, self.placement, instrumented=False)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p

    def _generate(self, prompts: list[str], seeds: list[int] | None) -> list[str]:
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        enc = self.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=not templated
        ).to(self.device)
        kwargs = dict(max_new_tokens=self.max_tokens, pad_token_id=self.tokenizer.pad_token_id, do_sample=False,
                      temperature=None, top_p=None, top_k=None)  # no warpers from the model's generation config
        if seeds is not None:
            kwargs["logits_processor"] = LogitsProcessorList(
                [RowSampler(seeds, self.temperature, self.top_p, self.device)])
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)  # [batch, prompt + new]
        new = out[:, enc["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def generate(self, chats: list[list[dict]], seeds: list[int]) -> list[str]:
        prompts = [render_chat(self.tokenizer, c) for c in chats]
        return self._generate(prompts, None if self.temperature == 0 else [int(s) for s in seeds])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        chats = [json.loads(c) for c in batch["chat"]]
        texts = self.generate(chats, [int(s) for s in batch["seed"]])
        actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
        worker = f"{os.getpid()}:{actor}"
        return {
            "index": np.asarray(batch["index"]),
            "text": np.array(texts, dtype=object),
            "worker": np.array([worker] * len(texts), dtype=object),
        }


class HFBackend:
    """Runs `HFGenerator` over a Ray Data actor pool; `workers` records who generated."""

    def __init__(self, config: SynthConfig):
        self.config = config
        self.workers: set[str] = set()

    def complete(self, chats: list[list[dict]], seeds: list[int]) -> list[str]:
        import ray

        if not chats:
            return []
        c = self.config
        rows = [{"index": i, "chat": json.dumps(chat), "seed": int(s)} for i, (chat, s) in enumerate(zip(chats, seeds))]
        ds = ray.data.from_items(rows).map_batches(
            HFGenerator,
            fn_constructor_kwargs=dict(model=synth_model(c), max_tokens=c.max_tokens, temperature=c.temperature,
                                       top_p=c.top_p, gpus=c.num_gpus),
            batch_size=c.batch_size,
            compute=ray.data.ActorPoolStrategy(size=c.concurrency),
            num_cpus=1,
            num_gpus=c.num_gpus or None,
        )
        texts: list[str | None] = [None] * len(chats)
        for row in ds.iter_rows():
            texts[int(row["index"])] = str(row["text"])
            self.workers.add(str(row["worker"]))
        missing = [i for i, t in enumerate(texts) if t is None]
        if missing:
            raise RuntimeError(f"hf backend returned no text for rows {missing[:10]}")
        return texts  # type: ignore[return-value]
