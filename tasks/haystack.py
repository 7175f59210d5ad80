"""Contexts as ordered items (numbered documents or plain text) rendered into segments.

The QA prompts follow Liu et al. (2024): `Document [i](Title: t) text`, one per line; filler
haystacks (Kamradt; RULER) are plain running text. Marks on an item (needle, answer) become
character spans of the prompt after fitting.

Example:
    >>> segs = segments([Doc("Paris", "Paris is in France.", (("needle", 0, 19),)), Plain("The sky is blue. ")])
    >>> "".join(s.text for s in segs)
    'Document [1](Title: Paris) Paris is in France.\\nThe sky is blue. '
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tasks.fitting import Segment, TokenCounter
from tasks.symbols import filler_sentences


@dataclass(frozen=True)
class Doc:
    """A numbered document; marks are (kind, start, end) inside `text`."""

    title: str
    text: str
    marks: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class Plain:
    """Running text (filler or an embedded needle); marks are inside `text`."""

    text: str
    marks: tuple[tuple[str, int, int], ...] = ()


def segments(items: Iterable[Doc | Plain], doc_sep: str = "\n") -> list[Segment]:
    """Segments of the context; documents numbered from 1 in order of appearance.

    The number and the body are separate segments so both keep cached token counts.
    """
    out, n = [], 0
    for item in items:
        if isinstance(item, Doc):
            n += 1
            lead = f"(Title: {item.title}) " if item.title else ""
            out.append(Segment(f"Document [{n}]"))
            out.append(Segment(lead + item.text + doc_sep,
                               tuple((s + len(lead), e + len(lead), kind) for kind, s, e in item.marks)))
        else:
            out.append(Segment(item.text, tuple((s, e, kind) for kind, s, e in item.marks)))
    return out


def needle_marks(text: str, answer_spans: Iterable[tuple[int, int]], start: int = 0, end: int | None = None):
    """Marks for a needle covering text[start:end] and its answer spans."""
    end = len(text) if end is None else end
    return (("needle", start, end), *(("answer", s, e) for s, e in answer_spans))


def filler_stream(filler: str) -> Iterator[str]:
    """Filler sentences forever (each ends with a space)."""
    sentences = filler_sentences(filler) or ["... "]
    return itertools.cycle(sentences)


def take_tokens(counter: TokenCounter, units: Iterator[str], target: int, chunk: int = 64) -> list[str]:
    """Units from `units` until their cached token counts sum past `target` (or it runs out)."""
    out, total = [], 0
    while total <= target:
        batch = list(itertools.islice(units, chunk))
        if not batch:
            break
        out.extend(batch)
        total += sum(counter.counts(batch))
    return out


def insert_at(items: list, needles: list, depths: list[float]) -> list:
    """`items` with each needle inserted at relative depth (0 = start, 1 = end), in order."""
    out = list(items)
    for needle, depth in sorted(zip(needles, depths), key=lambda p: p[1], reverse=True):
        out.insert(min(len(items), max(0, int(round(depth * len(items))))), needle)
    return out


def random_depths(rng: random.Random, n: int) -> list[float]:
    return sorted(rng.random() for _ in range(n))
