"""Vocabulary of the synthetic variants: 4-character symbols, filler haystacks, fiction.

Zhao et al. (2025, Section 2): low concept expression replaces entities with 4-character
symbols; low context diversity uses the repeated filler "The grass is green. The sky is
blue. ..." (Kamradt's needle-in-a-haystack, RULER); high concept expression uses fictional
entities described in natural sentences. Every word list here can be overridden from the
experiment YAML (`options:`), so a word-level tokenizer with a small vocabulary can be fed
only words it knows.

Example:
    >>> import random
    >>> symbols(random.Random(0), 3, alphabet="abcd", length=4)  # doctest: +SKIP
    ['dbca', 'acbd', 'bbad']
    >>> invented_name(random.Random(1))  # doctest: +SKIP
    'Velorin'
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SYMBOL_ALPHABET = string.ascii_lowercase + string.digits
SYMBOL_LENGTH = 4

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "x")

# Relation nouns of the templated fiction ("The founder of Velorin is Drathis.").
RELATIONS = ("founder", "leader", "architect", "mentor", "capital", "birthplace", "homeland", "harbor",
             "mascot", "motto", "emblem", "anthem", "rival", "patron", "successor", "neighbor")
# Sentence frames about one fact; "{e}" entity, "{r}" relation noun, "{v}" value.
FACT_FRAMES = (
    "The {r} of {e} is {v}.",
    "{e} has {v} as its {r}.",
    "Records list {v} as the {r} of {e}.",
    "According to local accounts, the {r} of {e} was {v}.",
    "Among its notable facts, {e} counts {v} as its {r}.",
)
QUESTION_FRAME = "What is the {r} of {e}?"
# Sentences with no fact, mixed into template paragraphs for variety.
COLOR_SENTENCES = (
    "{e} is often mentioned in regional histories.",
    "Visitors describe {e} as quiet in winter and crowded in summer.",
    "Little was written about {e} before the modern era.",
    "Scholars still debate the early years of {e}.",
    "{e} appears in several old maps and travel diaries.",
    "Many stories about {e} were passed down orally.",
)


def symbols(rng: random.Random, n: int, alphabet: str = SYMBOL_ALPHABET, length: int = SYMBOL_LENGTH,
            exclude: set[str] | None = None) -> list[str]:
    """`n` distinct random symbols of `length` characters from `alphabet`."""
    if len(set(alphabet)) ** length < n + len(exclude or ()):
        raise ValueError(f"symbol space {alphabet!r}^{length} too small for {n} distinct symbols")
    seen, out = set(exclude or ()), []
    while len(out) < n:
        s = "".join(rng.choice(alphabet) for _ in range(length))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def invented_name(rng: random.Random) -> str:
    """A pronounceable invented word, capitalized (a fictional entity name)."""
    n = rng.choice((2, 2, 3))
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
    return word.capitalize()


def names(rng: random.Random, n: int, pool: Sequence[str] | None = None, exclude: set[str] | None = None) -> list[str]:
    """`n` distinct names: sampled from `pool` if given (an option), else invented."""
    exclude = set(exclude or ())
    if pool:
        choices = [p for p in dict.fromkeys(pool) if p not in exclude]
        if len(choices) < n:
            raise ValueError(f"need {n} distinct names, the configured list has {len(choices)} usable")
        return rng.sample(choices, n)
    out: list[str] = []
    while len(out) < n:
        w = invented_name(rng)
        if w not in exclude:
            exclude.add(w)
            out.append(w)
    return out


def filler_sentences(filler: str) -> list[str]:
    """The sentences of a filler text (split after . ! ?), each with its trailing space."""
    out, cur = [], []
    for word in filler.split():
        cur.append(word)
        if word[-1] in ".!?":
            out.append(" ".join(cur) + " ")
            cur = []
    if cur:
        out.append(" ".join(cur) + " ")
    return out
