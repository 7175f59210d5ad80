"""Exact length fitting: every prompt lands at or under the target token count, within 2%.

RULER (Hsieh et al., 2024) fits a haystack by binary search over its size, tokenizing the
whole prompt at every probe. Here each unit (passage, paragraph, filler block) is tokenized
once and cached across examples, the number of units is chosen from prefix sums of cached
lengths (corrected by the token change at unit boundaries, learned from earlier prompts),
and the rendered prompt is tokenized once to verify. Verification is batched: many
examples are fitted together and all their pending prompts go to the fast tokenizer in one
call (parallel over cores); the very first prompt is verified alone, so that every batch
starts from a measured boundary correction. The few prompts whose verified count misses
the window (a boundary merge moved it) are re-chosen from their own measured error, still
batched; a gap that units cannot close (one unit larger than the tolerance, e.g. targets
of a few hundred tokens) is closed with filler words at a slot the task chooses. Counts use
the model's own tokenizer without special tokens; no prompt is accepted without an exact
count.

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

import functools
import itertools
import math
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

TOLERANCE = 0.02  # contract: within 2% of the target, never over
_AIM = 0.3  # aim this fraction of the tolerance below the target, so estimate errors stay inside
_BATCH = 64  # prompts verified per tokenizer call: enough to keep every core busy
_BISECT_AFTER = 4  # informed guesses before plain bisection (bounds the probes in odd cases)

T = TypeVar("T")


class TokenCounter:
    """Token counts with the model's tokenizer; unit counts are cached by text."""

    def __init__(self, tokenizer, max_cache: int = 400_000):
        self.tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if self._backend is not None and (self._backend.truncation or self._backend.padding):
            # A tokenizer saved with truncation would cap every count at its max_length: count with a copy.
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(self._backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()
        self._cache: dict[str, int] = {}
        self.max_cache = max_cache
        self.prompts_counted = 0  # whole prompts verified exactly (count / count_many), for benchmarks

    def _encode(self, texts: list[str]) -> list[int]:
        if self._backend is not None:
            # encode_batch_fast skips offset tracking (counts only) and runs in parallel over texts.
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
            return [len(e) for e in encode(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def count(self, text: str) -> int:
        """Exact token count of `text` (not cached: used for whole prompts)."""
        return self.count_many([text])[0]

    def count_many(self, texts: Sequence[str]) -> list[int]:
        """Exact token counts of whole prompts, in one batched (parallel) tokenizer call."""
        self.prompts_counted += len(texts)
        return self._encode(list(texts)) if texts else []

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


@dataclass(frozen=True)
class FitRequest:
    """One prompt to fit; the arguments of `fit`.

    Attributes:
        arrange: `k -> Draft` using the first `k` candidate units (in priority order) plus
            everything that must stay (needles, instructions); must grow with `k`.
        n_max: number of candidate units available.
        target: token budget of the whole prompt.
        filler: text whose words close the last gap.
        unit_texts: the candidate units' texts, for prefix sums; if None, `arrange` is
            probed by bisection on estimates instead.
        tolerance: the prompt must be at least `(1 - tolerance) * target` tokens.
    """

    arrange: Callable[[int], Draft]
    n_max: int
    target: int
    filler: str
    unit_texts: Sequence[str] | None = None
    tolerance: float = TOLERANCE


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
    """`draft` with the first `n` words of `filler` at its filler slot."""
    return with_text(draft, filler_words(filler, n))


def with_text(draft: Draft, text: str) -> Draft:
    """`draft` with `text` (and the filler suffix) inserted at its filler slot."""
    if not text:
        return draft
    slot = len(draft.segments) if draft.slot is None else draft.slot
    seg = Segment(text + draft.filler_suffix)
    return Draft(draft.head, draft.segments[:slot] + [seg] + draft.segments[slot:], draft.tail, slot,
                 draft.filler_suffix)


class _BoundaryDrift:
    """Mean tokens per unit that joining units adds (+) or merges away (-), from verified prompts.

    Shared by the examples of one batch of requests, which come from one task's arrangement.
    """

    def __init__(self, window: int = 256):
        self._seen: deque[float] = deque(maxlen=window)

    def observe(self, per_unit: float) -> None:
        self._seen.append(per_unit)

    @property
    def value(self) -> float:
        return sum(self._seen) / len(self._seen) if self._seen else 0.0


def _largest(ok: Callable[[int], bool], hi: int) -> int:
    """Largest k in [0, hi] with ok(k), for ok true then false as k grows (0 if none)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fit_steps(counter: TokenCounter, req: FitRequest, drift: _BoundaryDrift) -> Generator[str, int, Fitted | None]:
    """Fits one request; yields each prompt to count and receives its exact token count."""
    arrange, target = functools.lru_cache(maxsize=None)(req.arrange), req.target  # probes repeat k
    low = (1 - req.tolerance) * target  # the accepted window is [low, target]
    aim = target * (1 - _AIM * req.tolerance)
    base = estimate(counter, arrange(0))
    n_max = req.n_max
    if req.unit_texts is not None:
        n_max = min(n_max, len(req.unit_texts))
        prefix = list(itertools.accumulate(counter.counts(list(req.unit_texts[:n_max])), initial=0))

        def predict(k: int, per_unit: float) -> float:
            return base + prefix[k] + per_unit * k

        def choose(per_unit: float) -> int:
            return _largest(lambda k: predict(k, per_unit) <= aim, n_max)

        extra = 0.0  # tokens per unit that arrange() adds (numbering, separators), from estimates
        k = choose(drift.value)
        for _ in range(3):
            if k == 0:
                break
            extra = max(0.0, (estimate(counter, arrange(k)) - base - prefix[k]) / k)
            k_new = choose(extra + drift.value)
            if k_new == k:
                break
            k = k_new
    else:
        predict = None
        k = _largest(lambda m: estimate(counter, arrange(m)) <= aim, n_max)

    # Verify exactly; re-choose from this prompt's own error inside the bracket (k_lo, k_hi)
    # of counts known to be under / over the target, so every probe narrows it.
    k_lo, k_hi, best = -1, n_max + 1, None
    for probe in itertools.count():
        draft = arrange(k)
        actual = yield render(draft)[0]
        if predict is not None and k > 0 and probe == 0:
            drift.observe((actual - predict(k, extra)) / k)
        if actual <= target:
            k_lo = k
            if best is None or actual > best[1]:
                best = (draft, actual, k)
            if actual >= low:
                break
        else:
            k_hi = k
        if k_hi - k_lo <= 1:
            break
        if probe >= _BISECT_AFTER:
            guess = (k_lo + k_hi) // 2
        elif predict is not None:
            own = extra + (actual - predict(k, extra)) / k if k else extra + drift.value
            guess = _largest(lambda m, own=own: predict(m, own) <= aim, n_max)
        else:
            guess = k + round(k * (aim - actual) / max(actual, 1))
        k = min(max(guess, k_lo + 1), k_hi - 1)
    if best is None:
        return None  # even the mandatory content is over the target
    draft, actual, n_units = best
    n_words = 0

    # Close a gap that whole units cannot with filler words, in the same bracketed way; if one
    # word still jumps over the window (long words, tiny targets), cut the next word short.
    if actual < low and req.filler.split():
        units_draft = draft
        sample = filler_words(req.filler, 50)
        per_word = max(counter.counts([" " + sample])[0] / 50, 0.5)
        found, w_lo, closed = yield from _bracket(lambda w: with_filler(units_draft, req.filler, w), actual, per_word,
                                                  aim, low, target)
        if found is not None:
            n_words, draft, actual = found
        if actual < low and closed:
            shorter, longer = filler_words(req.filler, w_lo), filler_words(req.filler, w_lo + 1)
            found, _, _ = yield from _bracket(
                lambda c: with_text(units_draft, longer[: len(shorter) + c]), actual, per_word * 50 / len(sample),
                aim, low, target, hi=len(longer) - len(shorter))
            if found is not None:
                _, draft, actual = found
    prompt, context, spans = render(draft)
    return Fitted(prompt, actual, context, spans, n_units=n_units, n_filler_words=n_words)


def _bracket(make: Callable[[int], Draft], start: int, per_step: float, aim: float, low: float, target: int,
             hi: float = math.inf) -> Generator[str, int, tuple[tuple[int, Draft, int] | None, int, bool]]:
    """Searches x in (0, hi) whose prompt `make(x)` counts within [low, target]; yields prompts.

    Returns the best (x, draft, count) at or under the target (None if none), the largest x
    known to be under, and whether the bracket closed (x and x + 1 straddle the window).
    """
    lo, best = 0, None
    x = math.floor((aim - start) / per_step)
    for probe in range(64):
        x = max(x, lo + 1) if hi == math.inf else min(max(x, lo + 1), hi - 1)
        if x <= lo:
            break
        draft = make(x)
        got = yield render(draft)[0]
        if got <= target:
            lo = x
            if best is None or got > best[2]:
                best = (x, draft, got)
            if got >= low:
                break
        else:
            hi = x
        if hi - lo <= 1:
            break
        if probe >= _BISECT_AFTER and hi != math.inf:
            x = (lo + hi) // 2
        else:
            x += math.floor((aim - got) / per_step)
    return best, lo, hi - lo <= 1


def fit_stream(counter: TokenCounter, jobs: Iterable[tuple[FitRequest, T]], n: int | None = None,
               batch: int = _BATCH) -> Iterator[tuple[T, Fitted | None]]:
    """Fits requests in order, verifying many prompts per tokenizer call, until `n` fit.

    Jobs are drawn lazily, only while the ones in flight could not already make `n`, so the
    jobs consumed (and any bookkeeping the caller does while producing them) are the same
    as fitting one at a time until the `n`-th success.

    Args:
        counter: token counter of the model's tokenizer.
        jobs: (request, payload) pairs in priority order; the payload comes back untouched.
        n: stop after this many fitted prompts (None: fit every job).
        batch: most prompts in flight, i.e. per batched tokenizer call.

    Yields:
        (payload, fitted) in job order; fitted is None when the mandatory content of the
        request alone exceeds its target.
    """
    drift = _BoundaryDrift()
    pilot = True  # the first prompt is verified alone, so the batch after it starts from a learned drift
    jobs = iter(jobs)
    active: list[tuple[int, T, Generator, str]] = []
    results: dict[int, tuple[T, Fitted | None]] = {}
    started = emitted = n_ok = 0
    exhausted = False

    def finish(i: int, payload: T, fitted: Fitted | None) -> None:
        nonlocal n_ok
        results[i] = (payload, fitted)
        n_ok += fitted is not None

    while True:
        while not exhausted and len(active) < (1 if pilot else batch) and (n is None or n_ok + len(active) < n):
            job = next(jobs, None)
            if job is None:
                exhausted = True
                break
            req, payload = job
            steps = _fit_steps(counter, req, drift)
            try:
                active.append((started, payload, steps, next(steps)))
            except StopIteration as stop:
                finish(started, payload, stop.value)
            started += 1
        if not active:
            break
        counts = counter.count_many([prompt for *_, prompt in active])
        pilot = False
        pending = []
        for (i, payload, steps, _), c in zip(active, counts):
            try:
                pending.append((i, payload, steps, steps.send(c)))
            except StopIteration as stop:
                finish(i, payload, stop.value)
        active = pending
        while emitted in results:
            yield results.pop(emitted)
            emitted += 1
    while emitted in results:
        yield results.pop(emitted)
        emitted += 1


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

    One request of `fit_stream`; fitting many prompts together is faster.

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
    req = FitRequest(arrange, n_max, target, filler, unit_texts, tolerance)
    ((_, fitted),) = fit_stream(counter, [(req, None)])
    return fitted


def within_tolerance(n_tokens: int, target: int, tolerance: float = TOLERANCE) -> bool:
    return (1 - tolerance) * target <= n_tokens <= target


def place(k: int, fraction: float) -> int:
    """Index among `k + 1` slots at relative depth `fraction` in [0, 1]."""
    return min(k, max(0, int(round(fraction * k))))


__all__ = ["Draft", "FitRequest", "Fitted", "Segment", "TokenCounter", "fit", "fit_stream", "place", "render",
           "within_tolerance"]
