"""Attention heads: knockout, activation patching and inline retrieval/insight scoring.

Source: Zhao, Yin, Durrett, "Understanding Synthetic Context Extension via Retrieval
Heads" (ICML 2025): retrieval score (Eq. 1, after Wu et al. 2024), insight score (Eq. 2),
head knockout (Sec. 5, Fig. 3) and cross-model patching (Sec. 5, Tables 3, 11).

One instrumentation point: the input of each layer's `o_proj`, viewed as
`[batch, pos, head, d_head]`. Knockout zeroes a head's slice there at every position;
patching overwrites it with the slice another model computed on the same prompt. Scoring
reads, at every decoding step, the argmax of each query head's attention (over every visible
key, or over the prompt keys only), computed inside the model's own attention call from the
KV cache (one q·Kᵀ row per head, O(T) per step), so it costs almost nothing on top of plain
greedy decoding. Scored or not, a decode step runs the same attention (`decode_attention`):
scoring never changes what is decoded.

Example (runnable with the tiny models of tests/tiny.py):
    >>> from engine.decode import ScoreSpans, greedy_decode
    >>> model, tok = tiny_model("llama"), char_tokenizer()
    >>> with knockout(model, [(0, 1), (1, 3)]):      # heads (0,1), (1,3) contribute nothing
    ...     logits = model(torch.tensor([tok("abc")["input_ids"]])).logits
    >>> decoded = greedy_decode(model, tok, ["key: q4zx. key?"], max_new_tokens=4,
    ...                         spans=[ScoreSpans(answer_spans=((5, 9),), needle_spans=((0, 10),))])
    >>> score_table(np.stack([d.retrieval for d in decoded]), np.stack([d.insight for d in decoded]))

Scores are per example `[n_layers, n_heads]` (NaN: not counted); `score_table` averages them.

Two readings of Eq. 1 differ between the paper and Wu et al.'s published code, and both are
options (`scoring.argmax_over`, `scoring.count` in the experiment YAML):
- `argmax_over`: "all" (the paper, and Wu et al.'s code: the top-1 over every key the query
  sees, prompt and tokens generated so far) or "prompt" (the top-1 over the prompt keys only).
  Under "all" a step whose argmax lands on a generated token retrieves nothing.
- `count`: "unique" (the paper's Eq. 1: each answer-span position counts once, so S_h <= 1)
  or "repeats" (Wu et al.'s code: 1/|y*| at every step that retrieves, so repeats count and a
  score can pass 1).
The defaults, `all` and `unique`, are the paper's reading.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from engine.models import Architecture, architecture

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Head = tuple[int, int]  # (layer, query head)
ARGMAX_OVER = ("all", "prompt")  # which keys a head's attention argmax is taken over
COUNTS = ("unique", "repeats")  # how often one answer-span position may count for a head
ENGINE_PREFIX = "needlework_"  # the engine's decode attention, registered per backend
ARGMAX_KWARG = "head_argmax"  # forward kwarg that carries a HeadArgmax to the attention call


class HeadError(ValueError):
    """A head, intervention or recorded activation that does not fit the model."""


@dataclass(frozen=True)
class Knockout:
    """Zero the outputs of `heads` at every position, in prefill and decode."""

    heads: tuple[Head, ...]


@dataclass(frozen=True)
class Patch:
    """Replace `heads`' outputs over the prompt by those of `source` (model A) on the same prompt."""

    source: PreTrainedModel
    heads: tuple[Head, ...]


# --------------------------------------------------------------------------- o_proj hooks


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


# --------------------------------------------------------------------------- inline argmax


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


# --------------------------------------------------------------------------- Eq. 1, Eq. 2


def _copied(argmax: np.ndarray, generated: np.ndarray, prompt_ids: np.ndarray) -> np.ndarray:
    """`[steps, layer, head]`: the argmax is a prompt position holding the token generated then."""
    in_prompt = (argmax >= 0) & (argmax < len(prompt_ids))  # "all": generated keys lie past the prompt
    safe = np.clip(argmax, 0, max(len(prompt_ids) - 1, 0))
    return in_prompt & (prompt_ids[safe] == generated[:, None, None])


def _spans(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(int(s), int(e)) for s, e in spans if e > s]


def retrieval_hits(
    argmax: np.ndarray,
    generated: np.ndarray,
    prompt_ids: np.ndarray,
    answer_spans: Sequence[tuple[int, int]],
) -> np.ndarray:
    """Which heads retrieve at which step (the event Eq. 1 counts): `[steps, layer, head]` bool.

    Head h retrieves at step t when its argmax j lies in an answer span and `prompt_ids[j]`
    is the token generated at t. Args as `retrieval_scores`.
    """
    copied = _copied(argmax, generated, prompt_ids)
    inside = np.zeros(argmax.shape, dtype=bool)
    for start, end in _spans(answer_spans):
        inside |= (argmax >= start) & (argmax < end)
    return copied & inside


def retrieval_scores(
    argmax: np.ndarray,
    generated: np.ndarray,
    prompt_ids: np.ndarray,
    answer_spans: Sequence[tuple[int, int]],
    count: str = "unique",
) -> np.ndarray:
    """Retrieval score (Eq. 1) of every head for one example.

    At decoding step t the model generates token w_t; head h retrieves it if its argmax
    position j lies in an answer span and `prompt_ids[j] == w_t`. With `count="unique"`
    (Eq. 1) each span position counts at most once per head; with `count="repeats"` (Wu et
    al.'s code) every retrieving step adds 1/|s|. The score is the best span's: max over spans
    s of (retrieved positions, or retrieving steps, in s) / |s|.

    Args:
        argmax: `[steps, layer, head]` each step's argmax as a position in the sequence
            (prompt tokens first, then generated ones), -1 for none.
        generated: `[steps]` the token generated at each scored step.
        prompt_ids: `[prompt_len]` the example's prompt tokens (no padding).
        answer_spans: token spans `(start, end)`, end exclusive.
        count: "unique" or "repeats".

    Returns:
        `[layer, head]` float scores; all NaN when no answer span is given (not counted).
    """
    if count not in COUNTS:
        raise HeadError(f"count must be one of {COUNTS}, got {count!r}")
    n_layers, n_heads = argmax.shape[1:]
    spans = _spans(answer_spans)
    if not spans:
        return np.full((n_layers, n_heads), np.nan)
    copied = _copied(argmax, generated, prompt_ids)
    best = np.zeros((n_layers, n_heads))
    for start, end in spans:
        hit = copied & (argmax >= start) & (argmax < end)
        if count == "repeats":
            best = np.maximum(best, hit.sum(axis=0) / (end - start))
            continue
        retrieved = np.zeros((n_layers, n_heads, end - start), dtype=bool)
        _, layer, head = np.nonzero(hit)
        retrieved[layer, head, argmax[hit] - start] = True
        best = np.maximum(best, retrieved.sum(-1) / (end - start))
    return best


def insight_hits(
    argmax: np.ndarray,
    generated: np.ndarray,
    prompt_ids: np.ndarray,
    needle_spans: Sequence[tuple[int, int]],
    strict: bool = False,
) -> np.ndarray:
    """Which heads look into a needle at which step (the event Eq. 2 tests): `[steps, layer, head]`.

    Args as `insight_scores`.
    """
    inside = np.zeros(argmax.shape, dtype=bool)
    for start, end in _spans(needle_spans):
        inside |= (argmax >= start) & (argmax < end)
    if strict:
        inside &= _copied(argmax, generated, prompt_ids)
    return inside


def insight_scores(
    argmax: np.ndarray,
    generated: np.ndarray,
    prompt_ids: np.ndarray,
    needle_spans: Sequence[tuple[int, int]],
    strict: bool = False,
) -> np.ndarray:
    """Insight score (Eq. 2) of every head for one example.

    1 if at any step the head's argmax falls inside any needle span, else 0. The generated
    answers (document ids) never occur in the needle, so the token match of Eq. 1 is dropped,
    as HeadKV does; `strict=True` keeps it (prompt token at j == w_t). An indicator, so the
    `count` reading of Eq. 1 does not apply.

    Args: as `retrieval_scores`, with `needle_spans` token spans.

    Returns:
        `[layer, head]` of 0.0 / 1.0; all NaN when no needle span is given (not counted).
    """
    n_layers, n_heads = argmax.shape[1:]
    if not _spans(needle_spans):
        return np.full((n_layers, n_heads), np.nan)
    return insight_hits(argmax, generated, prompt_ids, needle_spans, strict).any(axis=0).astype(np.float64)


SCORE_SCHEMA = pa.schema(
    [
        ("layer", pa.int32()),
        ("head", pa.int32()),
        ("kind", pa.string()),
        ("score", pa.float64()),
        ("n_examples", pa.int64()),
    ]
)


def score_table(retrieval: np.ndarray | None, insight: np.ndarray | None) -> pa.Table:
    """Per-head mean scores as a table: layer, head, kind, score, n_examples.

    Args:
        retrieval: per-example retrieval scores `[n_examples, n_layers, n_heads]`; NaN marks
            an example without a located answer span (not counted).
        insight: the same for insight scores.

    Returns:
        One row per (kind, layer, head); `score` is the mean over counted examples (NaN if
        none), `n_examples` how many were counted.
    """
    columns: dict[str, list] = {name: [] for name in SCORE_SCHEMA.names}
    for kind, scores in (("retrieval", retrieval), ("insight", insight)):
        if scores is None:
            continue
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 3:
            raise HeadError(f"{kind} scores must be [n_examples, n_layers, n_heads], got shape {scores.shape}")
        counted = (~np.isnan(scores)).sum(axis=0)
        total = np.nansum(scores, axis=0)
        mean = np.divide(total, counted, out=np.full(total.shape, np.nan), where=counted > 0)
        layers, heads = np.meshgrid(np.arange(scores.shape[1]), np.arange(scores.shape[2]), indexing="ij")
        columns["layer"] += layers.ravel().tolist()
        columns["head"] += heads.ravel().tolist()
        columns["kind"] += [kind] * layers.size
        columns["score"] += mean.ravel().tolist()
        columns["n_examples"] += counted.ravel().tolist()
    return pa.table(columns, schema=SCORE_SCHEMA)
