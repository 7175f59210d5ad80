"""The one interface every synthesis backend implements, and the factory that picks one.

A backend turns chat requests into texts and nothing else: prompts, validation, retries
and the cache live in `engine/synth/synthesizer.py`, so a new backend is one class with a
`complete` method (a Protocol, no base class).

Example:
    >>> backend = make_backend(SynthConfig(backend="http", model="m", base_url="http://127.0.0.1:8000/v1"))
    >>> backend.complete([[{"role": "user", "content": "Say hi."}]], seeds=[0])
"""

from __future__ import annotations

from typing import Protocol

from engine.synth.config import SynthConfig


class Backend(Protocol):
    def complete(self, chats: list[list[dict]], seeds: list[int]) -> list[str]:
        """One generated text per chat, in order; `seeds[i]` seeds chat i's sampling."""
        ...


def make_backend(config: SynthConfig) -> Backend | None:
    """The backend for `config.backend`; None for "template", which needs no model."""
    if config.backend == "template":
        return None
    if config.backend == "hf":
        from engine.synth.hf import HFBackend

        return HFBackend(config)
    if config.backend == "http":
        from engine.synth.openai_http import HTTPBackend

        return HTTPBackend(config)
    if config.backend == "vllm":
        from engine.synth.vllm_batch import VLLMBackend

        return VLLMBackend(config)
    raise ValueError(f"unknown synth backend {config.backend!r}")
