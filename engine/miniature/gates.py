"""Competence gates of the miniature base model: what it must do before it is shipped.

A head analysis of a model that cannot do the task compares noise. The shipped base must
(i) copy a span at random depths at its own length L (copy accuracy >= 0.95), (ii) answer
held-out prompts of each task at L, built by the tasks' own code with the miniature's task
options and decoded greedily as every evaluation is (exact match: MDQA >= 0.70 with at least
three documents, SummHay >= 0.70 with at least four, MuSiQue >= 0.50), and (iii) have at
least 32 query heads, so that retrieval heads can be a minority. The gates at 4L (the base
with the raised RoPE base must fall at least 0.30 below the real-data fine-tune) and of the
head counts are decided by the demo's own evaluation (engine/report.py reads them).

Example:
    >>> gates = measure_gates(model, tokenizer, sources, context=192)
    >>> gates["passed"], gates["answers"]["mdqa"]["exact"]
    (True, 0.81)
"""

from __future__ import annotations

import re

from tasks import get_task

from .checks import retrieval_accuracy, summary
from .corpus import TASK_OPTIONS, TASKS

COPY_MIN = 0.95
ANSWER_MIN = {"mdqa": 0.70, "musique": 0.50, "summhay": 0.70}
MIN_DOCUMENTS = {"mdqa": 3, "musique": 3, "summhay": 4}
MIN_QUERY_HEADS = 32
EXTENSION_MARGIN = 0.30  # F1(real-data fine-tune) - F1(base) at 4L, per task
_DOCUMENT = re.compile(r"Document \[\d+\]")


def held_out_examples(tokenizer, sources: dict, context: int, n: int, seed: int,
                      tasks: tuple[str, ...] = TASKS) -> dict[str, list]:
    """Per task, up to `n` evaluation-split examples of the real variant at `context` tokens."""
    out = {}
    for task in tasks:
        result = get_task(task).build("real", sources=sources[task], options=TASK_OPTIONS[task], tokenizer=tokenizer,
                                      target_tokens=context - 16, n=n, seed=seed, split="eval")
        out[task] = result.examples
    return out


def answer_scores(model, tokenizer, examples: list, task: str, batch_size: int = 16) -> dict:
    """Greedy answers to `examples` scored by the task: exact match, F1, documents per prompt."""
    import numpy as np

    from engine.decode import greedy_decode
    module = get_task(task)
    if not examples:
        return {"n": 0, "exact": 0.0, "f1": 0.0, "min_documents": 0, "mean_documents": 0.0}
    decoded = greedy_decode(model, tokenizer, [e.prompt for e in examples], max_new_tokens=module.MAX_NEW_TOKENS,
                            stop_strings=module.STOP_STRINGS, batch_size=batch_size)
    scores = [module.score(d.text, e) for d, e in zip(decoded, examples)]
    docs = [len(_DOCUMENT.findall(e.prompt)) for e in examples]
    return {"n": len(examples), "exact": float(np.mean([s["em"] for s in scores])),
            "f1": float(np.mean([s["f1"] for s in scores])), "min_documents": min(docs),
            "mean_documents": float(np.mean(docs))}


def measure_gates(model, tokenizer, sources: dict, context: int, n: int = 64, seed: int = 1,
                  copy_min: float = COPY_MIN) -> dict:
    """The gates at the pretraining length, each with its measurement and bar.

    Args:
        model: the pretrained base (its own RoPE base).
        tokenizer: the world's tokenizer (left padding for decoding).
        sources: the rendered world (`sources_of`).
        context: the pretraining length L.
        n: probes and held-out prompts per task.
        seed: probe and example seed (held-out: evaluation-split subjects only).
        copy_min: the copy bar (the recipe's `min_accuracy`; the shipped base's is COPY_MIN).
    """
    tokenizer.padding_side = "left"
    copy = summary(retrieval_accuracy(model, tokenizer, [context], n=n, seed=seed))[context]
    answers = {}
    for task, examples in held_out_examples(tokenizer, sources, context, n, seed).items():
        a = answer_scores(model, tokenizer, examples, task)
        a["passed"] = a["exact"] >= ANSWER_MIN[task] and a["min_documents"] >= MIN_DOCUMENTS[task]
        a["bar"] = ANSWER_MIN[task]
        answers[task] = a
    config = model.config
    heads = config.num_hidden_layers * config.num_attention_heads
    gates = {
        "context": context,
        "copy": {"accuracy": copy, "bar": copy_min, "passed": copy >= copy_min},
        "answers": answers,
        "query_heads": {"n": heads, "bar": MIN_QUERY_HEADS, "passed": heads >= MIN_QUERY_HEADS},
    }
    gates["passed"] = gates["copy"]["passed"] and gates["query_heads"]["passed"] and all(
        a["passed"] for a in answers.values())
    return gates


def format_gates(gates: dict) -> str:
    """A markdown table of the gates at L."""
    lines = ["| gate | measured | bar | passed |", "|---|---|---|---|",
             f"| copy at {gates['context']} tokens (random depths) | {gates['copy']['accuracy']:.2f} | "
             f">= {gates['copy']['bar']} | {gates['copy']['passed']} |"]
    for task, a in gates["answers"].items():
        lines.append(f"| {task} exact answers at {gates['context']} ({a['n']} held-out prompts, "
                     f"{a['min_documents']}-{a['mean_documents']:.1f} documents) | {a['exact']:.2f} | "
                     f">= {a['bar']} (>= {MIN_DOCUMENTS[task]} documents) | {a['passed']} |")
    q = gates["query_heads"]
    lines.append(f"| query heads | {q['n']} | >= {q['bar']} | {q['passed']} |")
    return "\n".join(lines)
