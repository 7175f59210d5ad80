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

import functools
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
            out.append(_number(n))
            out.append(_body(item, doc_sep))
        else:
            out.append(_plain(item))
    return out


# Fitting arranges the same items many times per prompt and across prompts (a passage pool
# shared by examples); building their segments once keeps that cheap.
@functools.lru_cache(maxsize=4096)
def _number(n: int) -> Segment:
    return Segment(f"Document [{n}]")


@functools.lru_cache(maxsize=65536)
def _body(item: Doc, doc_sep: str) -> Segment:
    lead = f"(Title: {item.title}) " if item.title else " "  # untitled passages: "Document [3] text"
    return Segment(lead + item.text + doc_sep, tuple((s + len(lead), e + len(lead), kind) for kind, s, e in item.marks))


@functools.lru_cache(maxsize=65536)
def _plain(item: Plain) -> Segment:
    return Segment(item.text, tuple((s, e, kind) for kind, s, e in item.marks))


def needle_marks(text: str, answer_spans: Iterable[tuple[int, int]], start: int = 0, end: int | None = None):
    """Marks for a needle covering text[start:end] and its answer spans."""
    end = len(text) if end is None else end
    return (("needle", start, end), *(("answer", s, e) for s, e in answer_spans))


def filler_stream(filler: str) -> Iterator[str]:
    """Filler sentences forever (each ends with a space)."""
    sentences = filler_sentences(filler) or ["... "]
    return itertools.cycle(sentences)


def take_tokens(counter: TokenCounter, units: Iterator[str], target: int, chunk: int = 64,
                slack: float = 1.5) -> list[str]:
    """Units from `units` until their cached token counts sum past `slack * target` (or it runs out).

    The slack covers tokens that merge away where units join (a sentence's trailing space
    and the next word often become one token), so the units still fill the target.
    """
    out, total = [], 0
    while total <= slack * target:
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
