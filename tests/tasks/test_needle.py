"""tasks/needle.py: pass-key prompts in real text, fitted exactly, with the key's spans located."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tasks import needle
from tasks.build import DataError
from tasks.fitting import within_tolerance

NQ = Path(__file__).parents[2] / "data/nq-open-oracle.jsonl.gz"
HAYSTACK = {"haystack": str(NQ)}


def test_pass_key_prompts_fit_and_locate_the_key(bpe_tokenizer):
    res = needle.build("real", sources=HAYSTACK, options={}, tokenizer=bpe_tokenizer, target_tokens=400, n=6, seed=0,
                       split="eval")
    assert len(res.examples) == 6 and not res.dropped
    for ex in res.examples:
        key = ex.meta["key"]
        assert re.fullmatch(r"[1-9]\d{4}", key) and ex.answers == (key,) and ex.target == " " + key
        assert within_tolerance(ex.n_tokens, 400)
        assert ex.n_tokens == len(bpe_tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
        (needle_span,) = ex.needle_spans
        assert ex.needles == (f"The pass key is {key}. Remember it. {key} is the pass key.",)
        assert ex.prompt[needle_span.start:needle_span.end] == ex.needles[0]
        assert [ex.prompt[s.start:s.end] for s in ex.answer_spans] == [key, key]
        assert ex.prompt.count(key) == 2  # nowhere else: only a copy from the needle answers
        assert ex.prompt.startswith(needle.HEAD) and ex.prompt.endswith(needle.TAIL)
    depths = [ex.meta["depth"] for ex in res.examples]
    assert len(set(depths)) == 6 and min(depths) < 0.5 < max(depths)


def test_splits_and_seeds_draw_different_keys_and_repeat_exactly(bpe_tokenizer):
    def keys(split, seed):
        res = needle.build("real", sources=HAYSTACK, options={}, tokenizer=bpe_tokenizer, target_tokens=200, n=4,
                           seed=seed, split=split)
        return [ex.meta["key"] for ex in res.examples], [ex.prompt for ex in res.examples]

    train, train_prompts = keys("train", 0)
    assert keys("train", 0) == (train, train_prompts)
    assert not set(train) & set(keys("eval", 0)[0])
    assert keys("train", 1)[0] != train


def test_filler_haystack_and_options(bpe_tokenizer):
    res = needle.build("real", sources={}, options={"haystack": "filler", "key_digits": 7}, tokenizer=bpe_tokenizer,
                       target_tokens=200, n=2, seed=0, split="train")
    for ex in res.examples:
        assert len(ex.meta["key"]) == 7 and "The grass is green." in ex.prompt
    with pytest.raises(DataError, match="haystack must be 'passages' or 'filler'"):
        needle.build("real", sources=HAYSTACK, options={"haystack": "essays"}, tokenizer=bpe_tokenizer,
                     target_tokens=200, n=1, seed=0, split="train")
    with pytest.raises(DataError, match="source 'haystack' is required"):
        needle.build("real", sources={}, options={}, tokenizer=bpe_tokenizer, target_tokens=200, n=1, seed=0,
                     split="train")
    with pytest.raises(DataError, match="needle_frame must contain"):
        needle.build("real", sources=HAYSTACK, options={"needle_frame": "No key here."}, tokenizer=bpe_tokenizer,
                     target_tokens=200, n=1, seed=0, split="train")
    short = needle.build("real", sources=HAYSTACK, options={}, tokenizer=bpe_tokenizer, target_tokens=20, n=2, seed=0,
                         split="train")
    assert short.examples == [] and short.dropped == {"too_long_for_target": 2}


def test_score_is_string_match_of_the_first_line(bpe_tokenizer):
    (ex,) = needle.build("real", sources=HAYSTACK, options={}, tokenizer=bpe_tokenizer, target_tokens=200, n=1,
                         seed=0, split="eval").examples
    key = ex.meta["key"]
    assert needle.score(f"The pass key is {key}.", ex) == {"f1": 1.0, "em": 0.0}
    assert needle.score(f" {key}", ex) == {"f1": 1.0, "em": 1.0}
    assert needle.score(f"I do not know.\n{key}", ex) == {"f1": 0.0, "em": 0.0}
    assert needle.score(key[:-1], ex) == {"f1": 0.0, "em": 0.0}
