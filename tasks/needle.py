"""Needle in a haystack: a pass key hidden in real text, the setting retrieval heads are found in.

Wu et al. (2024, "Retrieval Head Mechanistically Explains Long-Context Factuality", Sec. 2)
detect retrieval heads with Needle-in-a-Haystack prompts: a needle sentence hidden at a random
depth of a long real text, and a question whose answer the model must copy from it. The
needle here is the pass key of Mohtashami & Jaggi (2023, "Landmark Attention", Sec. 4.1):
"The pass key is 48213. Remember it. 48213 is the pass key."; the key is random, so only a
copy from the context answers it. The haystack is real text: the passages of an MDQA file
(the repository's NQ-Open gold Wikipedia passages), shuffled per example, or with
`haystack: filler` the repeated filler sentences of the synthetic tasks.

The base model's retrieval heads on these prompts (scored on the validation split) and a
knockout of them on the evaluation split are the paper's Sec. 4 test on a task the model
does without fine-tuning. Only the `real` variant (and `base`, the model as it is) exists.

Example:
    >>> from tasks import needle
    >>> res = needle.build("real", sources={"haystack": "data/nq-open-oracle.jsonl.gz"}, options={},
    ...                    tokenizer=tok, target_tokens=256, n=4, seed=0, split="eval")
    >>> needle.score(res.examples[0].answers[0], res.examples[0])["em"]
    1.0
"""

from __future__ import annotations

import random
from collections import Counter

from tasks import symbols as sym
from tasks.build import BuildResult, DataError, count, make_example, resolve_options, source_path
from tasks.example import Example
from tasks.fitting import Draft, FitRequest, TokenCounter, fit_stream
from tasks.haystack import Plain, filler_stream, needle_marks, segments, take_tokens
from tasks.mdqa import load_pool
from tasks.text import best_f1_em, find_all, first_answer_line

NAME = "needle"
VARIANTS = ("real",)
MAX_NEW_TOKENS = 12
HEAD_KIND = "retrieval"
STOP_STRINGS = ("\n",)
SOURCES = ("haystack",)
OPTIONS = {
    "haystack": "passages",  # "passages" (the `haystack` source's real text) or "filler"
    "key_digits": 5,
    "needle_frame": "The pass key is {key}. Remember it. {key} is the pass key.",
    "filler": sym.FILLER,  # closes the last gap to the target length, and the "filler" haystack
}

HEAD = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the pass key.\n\n")
TAIL = "\n\nWhat is the pass key? Reply with only the pass key.\nAnswer:"


def score(prediction: str, example: Example) -> dict[str, float]:
    """RULER's string match (Hsieh et al. 2024, the NIAH metric): 1 when the first line of the
    prediction contains the pass key ("The pass key is 48213." is right), else 0; `em` is the
    strict SQuAD exact match."""
    line = first_answer_line(prediction)
    found = float(any(key in line for key in example.answers))
    return {"f1": found, "em": best_f1_em(line, example.answers)["em"]}


def build(variant: str, *, sources: dict, options: dict, tokenizer, target_tokens: int, n: int, seed: int,
          split: str, synth=None) -> BuildResult:
    """Builds `n` pass-key prompts of `target_tokens` (within 2%, never over) for `split`.

    Args:
        variant: "real".
        sources: `haystack`, an MDQA JSONL (its ctxs) or JSONL of {"title", "text"}; not needed
            with `haystack: filler`.
        options: OPTIONS keys.
        tokenizer: the model's tokenizer (or a TokenCounter).
        target_tokens: prompt length budget.
        n: number of prompts.
        seed: seeds keys, depths and passage order; the splits draw from different streams.
        split: "train" (train + validation) or "eval".
        synth: unused (no text is written by an LLM).
    """
    opts = resolve_options(OPTIONS, options, NAME)
    if variant not in VARIANTS:
        raise DataError(f"{NAME}: unknown variant {variant!r}; valid: {list(VARIANTS)}")
    if opts["haystack"] not in ("passages", "filler"):
        raise DataError(f"{NAME}: option haystack must be 'passages' or 'filler', got {opts['haystack']!r}")
    digits = int(opts["key_digits"])
    if not 1 <= digits <= 18:
        raise DataError(f"{NAME}: option key_digits must be between 1 and 18, got {digits}")
    counter = tokenizer if isinstance(tokenizer, TokenCounter) else TokenCounter(tokenizer)
    rng = random.Random(f"{seed}:{split}:{NAME}")
    if opts["haystack"] == "passages":
        pool = [text.strip() + "\n" for _, text in load_pool(source_path(sources, "haystack", NAME, SOURCES))]
    else:
        pool = take_tokens(counter, filler_stream(opts["filler"]), target_tokens)

    def jobs():
        while True:
            key = str(rng.randrange(10 ** (digits - 1), 10**digits))
            text = opts["needle_frame"].format(key=key) + "\n"
            spans = find_all(text, key)
            if not spans:
                raise DataError(f"{NAME}: option needle_frame must contain {{key}}, got {opts['needle_frame']!r}")
            units = rng.sample(pool, len(pool)) if opts["haystack"] == "passages" else pool
            depth = rng.random()
            needle = Plain(text, needle_marks(text, spans, 0, len(text) - 1))

            def arrange(k: int, units=units, needle=needle, depth=depth) -> Draft:
                g = min(k, int(depth * (k + 1)))
                items = [Plain(u) for u in units[:k]]
                return Draft(HEAD, segments(items[:g] + [needle] + items[g:]), TAIL, filler_suffix=" ")

            yield FitRequest(arrange, len(units), target_tokens, opts["filler"], unit_texts=units), (key, depth)

    examples, dropped = [], Counter()
    for (key, depth), fitted in fit_stream(counter, jobs(), n):
        if fitted is None:
            count(dropped, "too_long_for_target")
            if dropped["too_long_for_target"] >= n:
                break  # the needle and instructions alone exceed the target
            continue
        examples.append(make_example(task=NAME, variant=variant, split=split, index=len(examples), seed=seed,
                                     fitted=fitted, target=" " + key, answers=[key],
                                     meta={"key": key, "depth": round(depth, 4)}))
    return BuildResult(examples, dict(dropped))


__all__ = ["NAME", "VARIANTS", "MAX_NEW_TOKENS", "STOP_STRINGS", "OPTIONS", "SOURCES", "build", "score"]
