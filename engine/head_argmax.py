"""The in-attention argmax: each query head's attention argmax for the newest query, read inside
the model's own attention call, and the engine's decode attention that reads it.

Source: Wu et al. 2024 and Zhao, Yin, Durrett (ICML 2025), Eq. 1: a head retrieves a token when
the position that gets the most attention probability mass holds it. The argmax of the raw
scores is the argmax of the attention (softmax is monotonic), so at a one-query decode step it
is read from the step's own scores, from the KV cache, one q·Kᵀ row per head (O(T) per step),
never a T x T matrix. Scored or not, every decode step runs the same attention
(`decode_attention`): scoring never changes what is decoded. Which keys count (`argmax_over`:
every visible key or the prompt's alone) is `HeadArgmax.context_len`; what the positions score
is `engine.head_scores`.

Example:
    >>> recorder = HeadArgmax(n_layers=2, context_len=None)
    >>> with decoding_attention(model, scored=True):
    ...     model(input_ids, past_key_values=cache, **{ARGMAX_KWARG: recorder})
    >>> recorder.take()            # [batch, layer, head] KV-cache positions, -1 for none
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from engine.head_scores import HeadError

ARGMAX_OVER = ("all", "prompt")  # which keys a head's attention argmax is taken over
ENGINE_PREFIX = "needlework_"  # the engine's decode attention, registered per backend
ARGMAX_KWARG = "head_argmax"  # forward kwarg that carries a HeadArgmax to the attention call


class HeadArgmax:
    """Collects, during one forward pass, each query head's attention argmax for the newest query.

    Only keys in `[0, context_len)` (the padded prompt) are candidates; with `context_len=None`
    every key the query sees is (prompt and generated tokens). Entries are KV-cache indices, or
    -1 when no candidate key is visible to the query (sliding window, all padding).
    """

    def __init__(self, n_layers: int, context_len: int | None):
        self.context_len = context_len
        self.layers: list[torch.Tensor | None] = [None] * n_layers

    def take(self) -> torch.Tensor:
        """Returns `[batch, layer, head]` of the last forward pass and clears the record."""
        if any(t is None for t in self.layers):
            missing = [i for i, t in enumerate(self.layers) if t is None]
            raise HeadError(f"no attention argmax recorded for layers {missing}; is scoring enabled?")
        out = torch.stack(self.layers, dim=1)
        self.layers = [None] * len(self.layers)
        return out


def _visible_keys(mask, batch: int, kv_len: int, sliding_window: int | None, device) -> torch.Tensor | None:
    """Which keys the newest query may attend to: bool `[batch, 1, 1, kv]`, or None for all.

    Accepts the masks transformers builds for each backend: None, a 2D padding mask
    (FlashAttention), a 4D bool mask (SDPA) or a 4D additive float mask (eager).
    """
    visible = None
    if mask is not None:
        if mask.dim() == 2:
            visible = mask[:, -kv_len:].bool()[:, None, None, :]
        else:
            row = mask[:, :, -1:, -kv_len:]
            if row.dtype != torch.bool:
                row = row > torch.finfo(row.dtype).min / 2
            visible = row[:, :1]
    if sliding_window is not None and kv_len > sliding_window:
        # transformers' sliding mask: key k is visible from query q iff q - window < k <= q
        in_window = torch.arange(kv_len, device=device) >= kv_len - sliding_window
        in_window = in_window[None, None, None, :]
        visible = in_window if visible is None else visible & in_window
    return visible


def _grouped_scores(query_last, key, scaling, visible) -> torch.Tensor:
    """Raw attention scores of the newest query per head: `[batch, kv_head, group, kv]`.

    Queries are grouped by the KV head they share, so K is never repeated across a group.
    """
    batch, n_heads, _, d_head = query_last.shape
    n_kv = key.shape[1]
    q = query_last.reshape(batch, n_kv, n_heads // n_kv, d_head)
    scores = torch.matmul(q, key.transpose(-1, -2)) * scaling
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def _context_argmax(scores: torch.Tensor, context_len: int | None) -> torch.Tensor:
    """Argmax over the first `context_len` keys (None: all) of grouped scores -> `[batch, head]`,
    -1 where none is visible."""
    context = scores if context_len is None else scores[..., :context_len]
    best, index = context.max(dim=-1)
    index = torch.where(torch.isfinite(best), index, torch.full_like(index, -1))
    return index.flatten(1)  # kv-head major order == query-head order under GQA


def decode_attention(base_fn):
    """Wraps an attention function with the engine's one-query decode step and the scorer's argmax.

    Every one-query decode step runs grouped manual attention (q·Kᵀ per KV group, softmax, ·V:
    no K/V repeated across a group), whether or not heads are scored; longer passes (prefill)
    call `base_fn` (SDPA / FlashAttention). So scoring never changes what is decoded: with a
    `HeadArgmax` in the kwargs, the argmax of the newest query per head is read from the decode
    step's own scores (softmax is monotonic), and in prefill from one extra q·Kᵀ row per head,
    beside an unchanged computation.
    """

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        recorder: HeadArgmax | None = kwargs.pop(ARGMAX_KWARG, None)
        batch, n_heads, q_len, d_head = query.shape
        if q_len > 1 and recorder is None:
            return base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        scaling = d_head ** -0.5 if scaling is None else scaling
        kv_len = key.shape[2]
        visible = _visible_keys(attention_mask, batch, kv_len, kwargs.get("sliding_window"), query.device)
        scores = _grouped_scores(query[:, :, -1:], key, scaling, visible)  # [batch, kv_head, group, kv]
        if recorder is not None:
            recorder.layers[module.layer_idx] = _context_argmax(scores, recorder.context_len)
        if q_len > 1:
            return base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
        out = torch.matmul(probs, value)  # [batch, kv_head, group, d_head]
        return out.reshape(batch, 1, n_heads, d_head), None  # [batch, pos, head, d_head]

    return attention


@contextmanager
def decoding_attention(model, scored: bool = False) -> Iterator[None]:
    """Switches `model` to the engine's decode attention (`decode_attention`) of its own backend
    while active; greedy decoding always runs under it, scored or not.

    A backend outside transformers' attention registry (eager) keeps its own attention for
    plain decoding; scoring needs SDPA or FlashAttention.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config
    base = config._attn_implementation
    if base.startswith(ENGINE_PREFIX):  # already switched by an enclosing call
        yield
        return
    if base not in ALL_ATTENTION_FUNCTIONS or base not in ALL_MASK_ATTENTION_FUNCTIONS:
        if scored:
            raise HeadError(f"inline scoring supports sdpa and flash attention backends, not {base!r}")
        yield
        return
    # the name keeps "flash" in it so transformers prepares FlashAttention inputs the same way
    name = ENGINE_PREFIX + base
    ALL_ATTENTION_FUNCTIONS.register(name, decode_attention(ALL_ATTENTION_FUNCTIONS[base]))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = base
