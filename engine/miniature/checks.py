"""Checks that the miniature base model retrieves by content, at random needle depths.

A copy probe hides a marked span at a random depth of a random-word haystack and asks for it
back after a second mark (the pretraining's copy format). The probe is right only if greedy
decoding reproduces the whole span; with teacher forcing that is "every argmax over the
span equals the span", so one forward pass scores a probe exactly. Depths and gaps are
random, so a model that learned "copy from k tokens back" fails here (DESIGN.md, known traps).

Example:
    >>> rows = retrieval_accuracy(model, tokenizer, lengths=[256, 1024], n=64, seed=0)
    >>> summary(rows)                       # {256: 1.0, 1024: 0.03}
"""

from __future__ import annotations

import itertools
import random

import torch

from .corpus import copy_sequence, token_ids

DEPTH_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def copy_correct(model, batch: list[list[int]], starts: list[int]) -> list[bool]:
    """Whether greedy decoding would reproduce each probe's span (all same length)."""
    ids = torch.tensor(batch)  # [batch, pos]
    logits = model(input_ids=ids).logits  # [batch, pos, vocab]
    predicted = logits[:, :-1].argmax(-1)  # position t predicts token t + 1
    out = []
    for b, start in enumerate(starts):
        out.append(bool((predicted[b, start - 1 :] == ids[b, start:]).all()))
    return out


def depth_bin(depth: float) -> str:
    for lo, hi in itertools.pairwise(DEPTH_BINS):
        if depth < hi or hi == DEPTH_BINS[-1]:
            return f"{lo:.2f}-{hi:.2f}"
    raise AssertionError(depth)


def retrieval_accuracy(model, tokenizer, lengths, n: int = 64, seed: int = 0, span: int = 8,
                       batch_size: int = 16) -> list[dict]:
    """Copy accuracy by total length and needle depth.

    Args:
        model: a causal LM over `tokenizer`'s vocabulary (eval mode is set here).
        tokenizer: the world's tokenizer (provides the marks and the word pool).
        lengths: total probe lengths in tokens (e.g. the pretraining length and 4x it).
        n: probes per length.
        seed: probe seed.
        span: needle length in tokens.
        batch_size: probes per forward pass.

    Returns:
        Rows {"length", "depth", "n", "accuracy"}: one per depth bin (depth = where the span
        starts, as a fraction of the haystack) and one with depth "all".
    """
    model.eval()
    tokens = token_ids(tokenizer)
    rows = []
    for length in lengths:
        rng = random.Random(f"{seed}-{length}")
        probes = [copy_sequence(rng, tokens, length, span) for _ in range(n)]
        correct = []
        for i in range(0, n, batch_size):
            chunk = probes[i : i + batch_size]
            correct += copy_correct(model, [p[0] for p in chunk], [p[1] for p in chunk])
        by_bin: dict[str, list[bool]] = {}
        for (ids, start), ok in zip(probes, correct):
            needle = ids.index(tokens.copy_mark)
            by_bin.setdefault(depth_bin(needle / length), []).append(ok)
        for name in sorted(by_bin):
            rows.append({"length": length, "depth": name, "n": len(by_bin[name]),
                         "accuracy": sum(by_bin[name]) / len(by_bin[name])})
        rows.append({"length": length, "depth": "all", "n": n, "accuracy": sum(correct) / n})
    return rows


@torch.no_grad()
def answer_accuracy(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Share of (prompt, target) pairs whose target greedy decoding would produce exactly."""
    model.eval()
    correct = 0
    for prompt, target in pairs:
        p = tokenizer(prompt)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        correct += copy_correct(model, [p + t], [len(p)])[0]
    return correct / max(1, len(pairs))


def summary(rows: list[dict]) -> dict[int, float]:
    """Accuracy over all depths, per length."""
    return {r["length"]: r["accuracy"] for r in rows if r["depth"] == "all"}


def format_table(rows: list[dict]) -> str:
    """A markdown table: one line per length, one column per depth bin."""
    bins = sorted({r["depth"] for r in rows if r["depth"] != "all"}) + ["all"]
    lines = ["| length | " + " | ".join(bins) + " |", "|---" * (len(bins) + 1) + "|"]
    for length in sorted({r["length"] for r in rows}):
        cells = {r["depth"]: r for r in rows if r["length"] == length}
        lines.append(f"| {length} | " + " | ".join(
            f"{cells[b]['accuracy']:.2f} (n={cells[b]['n']})" if b in cells else "-" for b in bins) + " |")
    return "\n".join(lines)
