"""Small evaluation sets, a character-F1 scorer and in-process reference decodes for the tests
of engine/evaluate.py, analyses/knockout.py and analyses/patching.py.

The scorer is pickled by value so Ray actors can use it without importing this module.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray.cloudpickle

from tasks.example import Example, Span, to_table

LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


class CharScorer:
    """Task-like scorer: F1 over characters (multiset overlap), EM on the stripped text."""

    MAX_NEW_TOKENS = 8
    STOP_STRINGS = ("\n",)

    def score(self, prediction: str, example) -> dict:
        best = {"f1": 0.0, "em": 0.0}
        for answer in example.answers:
            pred, gold = prediction.strip(), answer.strip()
            common = sum((Counter(pred) & Counter(gold)).values())
            f1 = 0.0 if common == 0 else 2 * common / (len(pred) + len(gold))
            best = {"f1": max(best["f1"], f1), "em": max(best["em"], float(pred == gold))}
        return best


def make_examples(n: int, seed: int = 0) -> list[Example]:
    """Key-value prompts of varied length; the answer span covers the record block so that
    random tiny models still score some heads."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        pairs = [("".join(rng.choices(LETTERS, k=3)), "".join(rng.choices(LETTERS, k=rng.randint(3, 6))))
                 for _ in range(rng.randint(2, 4))]
        key, value = pairs[rng.randrange(len(pairs))]
        records = " ".join(f"{k}={v};" for k, v in pairs)
        prompt = f"records: {records} find {key}:"
        start = prompt.index(records)
        needle = prompt.index(f"{key}={value};")
        examples.append(
            Example(
                id=f"ex{i:03d}",
                task="kv",
                variant="real",
                prompt=prompt,
                target=value,
                answers=(value,),
                context_span=Span(start, start + len(records)),
                answer_spans=(Span(start, start + len(records)),),
                needle_spans=(Span(needle, needle + len(key) + len(value) + 2),),
                needles=(f"{key}={value};",),
                n_tokens=len(prompt),
            )
        )
    return examples


def write_eval_set(path: Path, n: int, seed: int = 0) -> str:
    pq.write_table(to_table(make_examples(n, seed)), path)
    return str(path)


def reference_decode(model, tokenizer, examples, *, intervention=None, score=True, batch_size=1):
    """In-process greedy decode of `examples` (no Ray, no sharding)."""
    from engine.decode import ScoreSpans, greedy_decode

    spans = None
    if score:
        spans = [ScoreSpans(tuple((s.start, s.end) for s in e.answer_spans),
                            tuple((s.start, s.end) for s in e.needle_spans)) for e in examples]
    return greedy_decode(
        model, tokenizer, [e.prompt for e in examples], max_new_tokens=CharScorer.MAX_NEW_TOKENS,
        stop_strings=CharScorer.STOP_STRINGS, batch_size=batch_size, spans=spans, intervention=intervention,
    )


def mean_f1(examples, decoded) -> float:
    scorer = CharScorer()
    return float(np.mean([scorer.score(d.text, e)["f1"] for e, d in zip(examples, decoded)]))



class FlakyWorker:
    """Pool worker for fault tests: behaves by the item's name, remembers attempts in files."""

    def __init__(self, marks: str):
        self.marks = Path(marks)

    def ready(self) -> bool:
        return True

    def run(self, name: str, value: int):
        import time

        mark = self.marks / name
        first = not mark.exists()
        mark.touch()
        if name.startswith("hang") and first:
            time.sleep(600)  # only the first attempt hangs: the pool's timeout must end it
        if name.startswith("bad"):
            raise ValueError(f"{name}: always fails")
        if name.startswith("fatal"):
            raise KeyError(f"{name}: bad input")
        return value * value


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
