"""Task registry: MDQA, MuSiQue and SummHay citation, each one module with loader, variants,
prompt and score (Zhao et al. 2025, Section 2), and the pass-key needle in a haystack on which
retrieval heads are detected (Wu et al. 2024).

Example:
    >>> from tasks import get_task
    >>> get_task("mdqa").VARIANTS
    ('real', 'real_limited', 'hh', 'hl', 'lh', 'll', 'symbolic')
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from tasks import mdqa, musique, needle, summhay
from tasks.build import BuildResult
from tasks.example import Example


@runtime_checkable
class Task(Protocol):
    """What a task module provides; the registry, the data stage, evaluation and the report read
    a task through these names alone.

    Attributes:
        NAME: registry name, the `tasks:` key of an experiment.
        VARIANTS: the data variants it builds (`real` first; `base` is added by the grid).
        SOURCES: the source keys it reads (`sources:` in the YAML).
        OPTIONS: option defaults (`options:`); unknown keys are refused.
        HEAD_KIND: the head score that defines H_X (Eq. 1 "retrieval" or Eq. 2 "insight").
        MAX_NEW_TOKENS / STOP_STRINGS: decoding settings of its answers.
    """

    NAME: str
    VARIANTS: tuple[str, ...]
    SOURCES: tuple[str, ...]
    OPTIONS: dict
    HEAD_KIND: str
    MAX_NEW_TOKENS: int
    STOP_STRINGS: tuple[str, ...]

    def build(self, variant: str, *, sources: dict, options: dict, tokenizer, target_tokens: int, n: int,
              seed: int, split: str, synth=None) -> BuildResult:
        """`n` examples of `variant` for `split` ("train" or "eval"), each prompt within
        `target_tokens`; shortfalls counted in the result's `dropped`."""

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        """The task's metrics of one prediction (F1 first)."""


TASKS: dict[str, Task] = {m.NAME: m for m in (mdqa, musique, summhay, needle)}
PAPER_TASKS = ("mdqa", "musique", "summhay")  # the study's three tasks, in the paper's order
VARIANTS = ("real", "real_limited", "hh", "hl", "lh", "ll", "symbolic")  # + "base": the non-fine-tuned model
VARIANT_ORDER = (*VARIANTS, "base")  # the paper's order of variants in every table


def get_task(name: str) -> Task:
    """The task module registered as `name`; unknown names list the valid ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}") from None


def head_kind(name: str) -> str:
    """The head score that defines a task's H_X, as its module states it ("retrieval" for a
    task the registry does not know: the report may read a run of a task no longer registered)."""
    return TASKS[name].HEAD_KIND if name in TASKS else "retrieval"
