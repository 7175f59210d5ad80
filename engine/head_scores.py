"""Retrieval and insight scores of every head from the per-step attention argmax.

Source: Zhao, Yin, Durrett, "Understanding Synthetic Context Extension via Retrieval
Heads" (ICML 2025): retrieval score (Eq. 1, after Wu et al. 2024) and insight score (Eq. 2).
The argmax comes from `engine.head_argmax`, read while the model decodes; this module is the
arithmetic on it (numpy and pyarrow only).

Example:
    >>> scores = retrieval_scores(argmax, generated, prompt_ids, answer_spans=[(5, 9)])  # [layer, head]
    >>> score_table(np.stack([scores]), None)     # per-head means over examples

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

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

Head = tuple[int, int]  # (layer, query head)
COUNTS = ("unique", "repeats")  # how often one answer-span position may count for a head


class HeadError(ValueError):
    """A head, intervention or recorded activation that does not fit the model."""


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
