"""Attention heads: the one instrumentation point, and the interventions on it.

Source: Zhao, Yin, Durrett, "Understanding Synthetic Context Extension via Retrieval
Heads" (ICML 2025): head knockout (Sec. 5, Fig. 3) and cross-model patching (Sec. 5,
Tables 3, 11).

One instrumentation point: the input of each layer's `o_proj`, viewed as
`[batch, pos, head, d_head]`. Knockout zeroes a head's slice there at every position;
patching overwrites it with the slice another model computed on the same prompt. Scoring reads
the attention itself, inside the attention call (`engine.head_argmax`); the scores are
computed from what it reads by `engine.head_scores`.

Example (runnable with the tiny models of tests/tiny.py):
    >>> model, tok = tiny_model("llama"), char_tokenizer()
    >>> with knockout(model, [(0, 1), (1, 3)]):      # heads (0,1), (1,3) contribute nothing
    ...     logits = model(torch.tensor([tok("abc")["input_ids"]])).logits
    >>> with record_heads(source, [(0, 1)]) as recorded:   # model A's slices on a prompt
    ...     source(ids)
    >>> with patch_heads(model, [(0, 1)], recorded):       # model B with A's slices
    ...     model(ids)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.head_scores import Head, HeadError
from engine.models import Architecture, architecture

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Knockout:
    """Zero the outputs of `heads` at every position, in prefill and decode."""

    heads: tuple[Head, ...]


@dataclass(frozen=True)
class Patch:
    """Replace `heads`' outputs over the prompt by those of `source` (model A) on the same prompt."""

    source: PreTrainedModel
    heads: tuple[Head, ...]


def heads_by_layer(heads: Iterable[Head], arch: Architecture) -> dict[int, list[int]]:
    """Groups heads by layer after checking that each exists in `arch`."""
    grouped: dict[int, set[int]] = {}
    for head in heads:
        layer, index = (int(h) for h in head)
        if not (0 <= layer < arch.n_layers and 0 <= index < arch.n_heads):
            raise HeadError(
                f"head {tuple(head)} does not exist: model has {arch.n_layers} layers x {arch.n_heads} heads"
            )
        grouped.setdefault(layer, set()).add(index)
    return {layer: sorted(idx) for layer, idx in sorted(grouped.items())}


@contextmanager
def _o_proj_pre_hooks(model, hook_for_layer) -> Iterator[None]:
    """Registers `hook_for_layer(layer)` (None to skip) on each o_proj; always removes them."""
    handles = []
    try:
        for layer, o_proj in enumerate(architecture(model).o_projs):
            hook = hook_for_layer(layer)
            if hook is not None:
                handles.append(o_proj.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def knockout(model, heads: Iterable[Head]) -> Iterator[None]:
    """Zeroes the chosen heads' slices of the o_proj input at every position while active.

    This is the paper's knockout (zero output), not Wu et al.'s query zeroing.
    """
    arch = architecture(model)
    grouped = heads_by_layer(heads, arch)

    def hook_for_layer(layer):
        if layer not in grouped:
            return None
        keep = torch.ones(arch.n_heads, arch.head_dim)
        keep[grouped[layer]] = 0.0
        keep = keep.flatten()  # [head * d_head], matching o_proj's input layout
        cache = {}

        def hook(module, args):
            (x,) = args[:1]  # [batch, pos, head * d_head]
            key = (x.device, x.dtype)
            if key not in cache:
                cache[key] = keep.to(device=x.device, dtype=x.dtype)
            return (x * cache[key], *args[1:])

        return hook

    with _o_proj_pre_hooks(model, hook_for_layer):
        yield


@contextmanager
def record_heads(model, heads: Iterable[Head]) -> Iterator[dict[int, torch.Tensor]]:
    """Records the chosen heads' o_proj-input slices of the next forward pass.

    Yields a dict filled during the forward: layer -> tensor `[batch, pos, k, d_head]` with
    the layer's chosen heads in ascending order.
    """
    arch = architecture(model)
    grouped = heads_by_layer(heads, arch)
    recorded: dict[int, torch.Tensor] = {}

    def hook_for_layer(layer):
        if layer not in grouped:
            return None

        def hook(module, args):
            x = args[0]
            z = x.view(*x.shape[:-1], arch.n_heads, arch.head_dim)  # [batch, pos, head, d_head]
            recorded[layer] = z[:, :, grouped[layer]].detach()  # advanced indexing copies

        return hook

    with _o_proj_pre_hooks(model, hook_for_layer):
        yield recorded


@contextmanager
def patch_heads(model, heads: Iterable[Head], recorded: dict[int, torch.Tensor]) -> Iterator[None]:
    """Overwrites the chosen heads' o_proj-input slices with `recorded` (from `record_heads`).

    The recorded tensors must cover the same batch and positions as the patched forward.
    """
    arch = architecture(model)
    grouped = heads_by_layer(heads, arch)
    missing = sorted(set(grouped) - set(recorded))
    if missing:
        raise HeadError(f"no recorded activations for layers {missing}")

    def hook_for_layer(layer):
        if layer not in grouped:
            return None

        def hook(module, args):
            x = args[0]
            z = x.view(*x.shape[:-1], arch.n_heads, arch.head_dim).clone()  # [batch, pos, head, d_head]
            source = recorded[layer]
            if source.shape[:2] != z.shape[:2] or source.shape[-1] != z.shape[-1]:
                raise HeadError(
                    f"layer {layer}: recorded activations {tuple(source.shape)} do not fit "
                    f"the patched pass {tuple(z.shape)}"
                )
            z[:, :, grouped[layer]] = source.to(device=z.device, dtype=z.dtype)
            return (z.view_as(x), *args[1:])

        return hook

    with _o_proj_pre_hooks(model, hook_for_layer):
        yield


def check_compatible(source, target) -> None:
    """Raises unless `source` and `target` share layers, heads, head size and vocabulary."""
    a, b = architecture(source), architecture(target)
    for key in ("n_layers", "n_heads", "head_dim"):
        if getattr(a, key) != getattr(b, key):
            raise HeadError(f"patch source has {key}={getattr(a, key)}, target has {getattr(b, key)}")
    if source.config.vocab_size != target.config.vocab_size:
        raise HeadError(
            f"patch source vocab_size={source.config.vocab_size}, target {target.config.vocab_size}"
        )
