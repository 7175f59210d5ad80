"""Task registry: MDQA, MuSiQue and SummHay citation, each one module with loader, variants,
prompt and score (Zhao et al. 2025, Section 2), and the pass-key needle in a haystack on which
retrieval heads are detected (Wu et al. 2024).

Example:
    >>> from tasks import get_task
    >>> get_task("mdqa").VARIANTS
    ('real', 'real_limited', 'hh', 'hl', 'lh', 'll', 'symbolic')
"""

from __future__ import annotations

from types import ModuleType

from tasks import mdqa, musique, needle, summhay

TASKS: dict[str, ModuleType] = {m.NAME: m for m in (mdqa, musique, summhay, needle)}
VARIANTS = ("real", "real_limited", "hh", "hl", "lh", "ll", "symbolic")  # + "base": the non-fine-tuned model


def get_task(name: str) -> ModuleType:
    """The task module registered as `name`; unknown names list the valid ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}") from None
