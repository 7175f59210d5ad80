"""Answer normalization and scores: SQuAD token F1 / exact match, and citation F1.

Source: the SQuAD v1.1 evaluation script (Rajpurkar et al., 2016), as used for MDQA and
MuSiQue F1 by Zhao et al. (2025, Section 3); citation F1 over the set of cited document ids
as in Summary of a Haystack (Laban et al., 2024).

Example:
    >>> round(token_f1("the Eiffel Tower", "Eiffel tower in Paris"), 3)
    0.667
    >>> best_f1_em("Paris.", ["paris", "Paris, France"])
    {'f1': 1.0, 'em': 1.0}
    >>> citation_f1("[3][7]", "[7][2]")
    0.5
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)
_CITATION = re.compile(r"\[\s*(\d+)\s*\]")


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and articles, collapse whitespace (SQuAD)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def contains_answer(normalized_text: str, normalized_answers: Iterable[str]) -> bool:
    """Whether any answer occurs as whole tokens in `normalized_text` (both SQuAD-normalized).

    Token-level, not substring: the one-letter answer "s" matches the token "s" but not every
    passage with an "s" in it, and "U.S." (normalized "us") does not match "bus".

    Args:
        normalized_text: `normalize_answer(text)`, computed once per passage.
        normalized_answers: `normalize_answer(a)` of each gold answer; empty ones never match.
    """
    padded = f" {normalized_text} "
    return any(a and f" {a} " in padded for a in normalized_answers)


def token_f1(prediction: str, gold: str) -> float:
    """Token-level F1 between normalized prediction and gold (SQuAD)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        # SQuAD scores two empty answers as a match and anything else against empty as 0.
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def best_f1_em(prediction: str, golds: Iterable[str]) -> dict[str, float]:
    """Max F1 and max EM over the gold answers (aliases included)."""
    golds = list(golds)
    if not golds:
        return {"f1": 0.0, "em": 0.0}
    return {
        "f1": max(token_f1(prediction, g) for g in golds),
        "em": max(exact_match(prediction, g) for g in golds),
    }


def first_answer_line(prediction: str) -> str:
    """The answer a model gave: its first non-empty line, since decoding may run past it."""
    for line in prediction.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def parse_citations(text: str) -> set[int]:
    """Document ids cited as `[n]` anywhere in `text`."""
    return {int(m) for m in _CITATION.findall(text)}


def citation_f1(prediction: str, gold: str | Sequence[int]) -> float:
    """F1 between the sets of cited document ids; gold as `[i][j]` text or ids."""
    pred = parse_citations(prediction)
    ref = parse_citations(gold) if isinstance(gold, str) else set(gold)
    if not pred or not ref:
        return float(pred == ref)
    tp = len(pred & ref)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(pred), tp / len(ref)
    return 2 * precision * recall / (precision + recall)


def find_all(text: str, needle: str, *, ignore_case: bool = False) -> list[tuple[int, int]]:
    """Non-overlapping occurrences of `needle` in `text` as (start, end) char offsets.

    Matches only at word boundaries where the needle itself starts/ends with a word
    character, so the answer "1901" is not found inside "19012".
    """
    if not needle:
        return []
    hay, pat = (text.lower(), needle.lower()) if ignore_case else (text, needle)
    if len(hay) != len(text):  # lower() changed lengths (rare Unicode): fall back to exact case
        hay, pat = text, needle
    out, i = [], hay.find(pat)
    while i >= 0:
        j = i + len(pat)
        left_ok = i == 0 or not (pat[0].isalnum() and hay[i - 1].isalnum())
        right_ok = j == len(hay) or not (pat[-1].isalnum() and hay[j].isalnum())
        if left_ok and right_ok:
            out.append((i, j))
            i = hay.find(pat, j)
        else:
            i = hay.find(pat, i + 1)
    return out


def locate_answers(text: str, answers: Sequence[str]) -> list[tuple[int, int]]:
    """Where any gold answer occurs in `text`: exact-case matches first, else case-insensitive.

    Returns the occurrences of the first alias (in the given order) that occurs at all, so
    the spans are of one surface string; empty if no alias occurs.
    """
    for ignore_case in (False, True):
        for answer in answers:
            spans = find_all(text, answer.strip(), ignore_case=ignore_case)
            if spans:
                return spans
    return []
