"""Exact length fitting: every prompt lands at or under the target token count, within 2%.

RULER (Hsieh et al., 2024) fits a haystack by binary search over its size, tokenizing the
whole prompt at every probe. Here each unit (passage, paragraph, filler block) is tokenized
once and cached, the number of units is chosen from prefix sums of cached lengths, and the
rendered prompt is tokenized once to verify; a remaining gap larger than the tolerance is
closed with filler words at a slot the task chooses (needed when one unit is larger than
the tolerance, e.g. for targets of a few hundred tokens). Counts use the model's own
tokenizer without special tokens.

Example:
    >>> from tasks.fitting import Draft, Segment, TokenCounter, fit
    >>> counter = TokenCounter(tokenizer)  # any HF tokenizer
    >>> units = ["Some passage. "] * 1000
    >>> fitted = fit(counter, lambda k: Draft("Read:\\n", [Segment(u) for u in units[:k]], "Q?"),
    ...              n_max=1000, target=512, filler="The grass is green.")
    >>> 0.98 * 512 <= fitted.n_tokens <= 512
    True
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

TOLERANCE = 0.02  # contract: within 2% of the target, never over
_AIM = 0.005  # fill when more than 0.5% short, so the 2% bound holds with margin


class TokenCounter:
    """Token counts with the model's tokenizer; unit counts are cached by text."""

    def __init__(self, tokenizer, max_cache: int = 400_000):
        self.tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._cache: dict[str, int] = {}
        self.max_cache = max_cache

    def _encode(self, texts: list[str]) -> list[int]:
        if self._backend is not None:
            # encode_batch_fast skips offset tracking: counts only, about twice as fast.
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
            return [len(e.ids) for e in encode(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def count(self, text: str) -> int:
        """Exact token count of `text` (not cached: used for whole prompts)."""
        return self._encode([text])[0]

    def counts(self, texts: Sequence[str]) -> list[int]:
        """Cached token counts of many unit texts; misses are tokenized in one batch."""
        cache = self._cache
        missing = list({t for t in texts if t not in cache})
        if missing:
            if len(cache) + len(missing) > self.max_cache:
                cache.clear()
            cache.update(zip(missing, self._encode(missing)))
        return [cache[t] for t in texts]


@dataclass(frozen=True)
class Segment:
    """One piece of the context; `marks` are (start, end, kind) offsets inside `text`."""

    text: str
    marks: tuple[tuple[int, int, str], ...] = ()


@dataclass
class Draft:
    """A prompt before fitting: instructions, context segments, question.

    Attributes:
        head: text before the context (instructions).
        segments: the context, in order; marks on them become spans in the prompt.
        tail: text after the context (question, answer cue).
        slot: index into `segments` before which filler words go if needed (default: end).
        filler_suffix: text after inserted filler words (e.g. the context separator).
    """

    head: str
    segments: list[Segment]
    tail: str
    slot: int | None = None
    filler_suffix: str = "\n\n"


@dataclass(frozen=True)
class Fitted:
    """A rendered prompt: its text, exact token count and spans by mark kind."""

    prompt: str
    n_tokens: int
    context: tuple[int, int]
    spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    n_units: int = 0
    n_filler_words: int = 0


def render(draft: Draft) -> tuple[str, tuple[int, int], dict[str, list[tuple[int, int]]]]:
    """The prompt text, the context span and the global spans of every mark kind."""
    parts, spans, pos = [draft.head], {}, len(draft.head)
    for seg in draft.segments:
        for s, e, kind in seg.marks:
            spans.setdefault(kind, []).append((pos + s, pos + e))
        parts.append(seg.text)
        pos += len(seg.text)
    context = (len(draft.head), pos)
    parts.append(draft.tail)
    return "".join(parts), context, spans


def estimate(counter: TokenCounter, draft: Draft) -> int:
    """Sum of cached counts of the draft's pieces (close to, not exactly, the real count)."""
    return sum(counter.counts([draft.head, draft.tail, *[s.text for s in draft.segments]]))


def filler_words(filler: str, n: int) -> str:
    """The first `n` words of `filler` repeated as needed."""
    words = filler.split()
    return " ".join(itertools.islice(itertools.cycle(words), n)) if words and n > 0 else ""


def with_filler(draft: Draft, filler: str, n: int) -> Draft:
    if n <= 0:
        return draft
    slot = len(draft.segments) if draft.slot is None else draft.slot
    seg = Segment(filler_words(filler, n) + draft.filler_suffix)
    return Draft(draft.head, draft.segments[:slot] + [seg] + draft.segments[slot:], draft.tail, slot,
                 draft.filler_suffix)


def fit(
    counter: TokenCounter,
    arrange: Callable[[int], Draft],
    n_max: int,
    target: int,
    filler: str,
    *,
    unit_texts: Sequence[str] | None = None,
    tolerance: float = TOLERANCE,
) -> Fitted | None:
    """Chooses how many candidate units to use so the prompt fits `target` tokens exactly.

    Args:
        counter: token counter of the model's tokenizer.
        arrange: `k -> Draft` using the first `k` candidate units (in priority order) plus
            everything that must stay (needles, instructions); must grow with `k`.
        n_max: number of candidate units available.
        target: token budget of the whole prompt.
        filler: text whose words close the last gap.
        unit_texts: the candidate units' texts, for prefix sums; if None, `arrange` is
            probed by bisection on estimates instead.
        tolerance: the prompt must be at least `(1 - tolerance) * target` tokens.

    Returns:
        The fitted prompt, or None when even the mandatory content exceeds `target`.
    """
    base = estimate(counter, arrange(0))
    if unit_texts is not None:
        costs = counter.counts(list(unit_texts[:n_max]))
        prefix = list(itertools.accumulate(costs, initial=0))

        def choose(budget: float, extra: float) -> int:
            # Largest k with prefix[k] + extra * k <= budget; bisect since costs are positive.
            lo, hi = 0, n_max
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if prefix[mid] + extra * mid <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            return lo

        extra = 0.0
        k = choose(target - base, extra)
        for _ in range(3):  # learn the per-unit overhead arrange() adds (numbering, separators)
            if k == 0:
                break
            est = estimate(counter, arrange(k))
            extra = max(0.0, (est - base - prefix[k]) / k)
            k_new = choose(target - base, extra)
            if k_new == k:
                break
            k = k_new
    else:
        lo, hi = 0, n_max
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if estimate(counter, arrange(mid)) <= target:
                lo = mid
            else:
                hi = mid - 1
        k, prefix, extra = lo, None, 0.0

    # Verify with the real tokenization; cut units in proportion to the overshoot.
    for _ in range(8):
        draft = arrange(k)
        prompt, _, _ = render(draft)
        actual = counter.count(prompt)
        if actual <= target or k == 0:
            break
        over = actual - target
        if prefix is not None:
            k_cut = choose(prefix[k] + extra * k - over, extra)
            k = min(k - 1, k_cut)
        else:
            k -= max(1, (k * over) // max(actual, 1))
    if actual > target:
        return None

    # Close the gap with filler words, correcting by the measured tokens per word.
    n_words, best = 0, (draft, actual, 0)
    gap = target - actual
    if gap > _AIM * target and gap >= 1:
        per_word = max(counter.count(" " + filler_words(filler, 50)) / 50, 0.5) if filler.split() else 0
        n_words = int(gap / per_word) if per_word else 0
        for _ in range(6):
            if n_words <= 0:
                break
            trial = with_filler(draft, filler, n_words)
            n = counter.count(render(trial)[0])
            if n <= target:
                if n > best[1]:
                    best = (trial, n, n_words)
                if target - n <= _AIM * target:
                    break
                n_words += max(1, int((target - n) / per_word))
            else:
                n_words -= max(1, int(round((n - target) / max(per_word, 1))))
    draft, actual, n_words = best
    prompt, context, spans = render(draft)
    return Fitted(prompt, actual, context, spans, n_units=k, n_filler_words=n_words)


def within_tolerance(n_tokens: int, target: int, tolerance: float = TOLERANCE) -> bool:
    return (1 - tolerance) * target <= n_tokens <= target


def place(k: int, fraction: float) -> int:
    """Index among `k + 1` slots at relative depth `fraction` in [0, 1]."""
    return min(k, max(0, int(round(fraction * k))))


__all__ = ["Draft", "Fitted", "Segment", "TokenCounter", "fit", "render", "place", "within_tolerance"]
