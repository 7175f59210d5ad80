"""What every task shares: the build result, bad-input errors, source readers, options.

Example:
    >>> opts = resolve_options({"gold_position": "random"}, {"gold_position": 0}, "mdqa")
    >>> opts["gold_position"]
    0
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.synth.request import SynthRequest
from tasks.example import Example, Span
from tasks.fitting import TokenCounter


class DataError(ValueError):
    """Bad task input: names the file, line or key, and what was expected."""


@dataclass
class BuildResult:
    """Examples built for one task x variant x split, and why others were dropped."""

    examples: list[Example]
    dropped: dict[str, int] = field(default_factory=dict)


def resolve_options(defaults: dict, given: dict | None, task: str) -> dict:
    """Defaults overridden by `given`; an unknown key names itself and the valid keys."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise DataError(f"{task}: unknown option(s) {unknown}; valid options: {sorted(defaults)}")
    return {**defaults, **given}


def build_variant(task, variant: str, *, sources: dict, options: dict, tokenizer, target_tokens: int, n: int,
                  seed: int, split: str, synth=None) -> BuildResult:
    """The build the three paper tasks share: the options resolved against the task's OPTIONS
    (its `check_options`, if any, validates them), the variant checked, and the task's real,
    symbolic or synthetic builder called. `task` is the task module (`tasks.Task`); the
    arguments are those of `tasks.Task.build`."""
    opts = resolve_options(task.OPTIONS, options, task.NAME)
    if variant not in task.VARIANTS:
        raise DataError(f"{task.NAME}: unknown variant {variant!r}; valid: {list(task.VARIANTS)}")
    if hasattr(task, "check_options"):
        task.check_options(opts)
    counter = tokenizer if isinstance(tokenizer, TokenCounter) else TokenCounter(tokenizer)
    if variant in ("real", "real_limited"):
        return task.build_real(variant, sources, opts, counter, target_tokens, n, seed, split)
    if variant == "symbolic":
        return task.build_symbolic(opts, counter, target_tokens, n, seed, split)
    return task.build_synthetic(variant, opts, counter, target_tokens, n, seed, split, synth)


def source_path(sources: dict, key: str, task: str, valid: Sequence[str], allow_dir: bool = False) -> Path:
    """The local file (or directory, if allowed) for source `key`; a missing one says which."""
    if key not in (sources or {}):
        raise DataError(f"{task}: source {key!r} is required (sources accepted: {list(valid)})")
    path = Path(sources[key]).expanduser()
    if allow_dir and path.is_dir():
        return path
    if not path.is_file():
        raise DataError(f"{task}: source {key!r} file {path} does not exist")
    return path


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


# What a truncated or corrupt file raises while it is read: gzip's EOFError (a cut download)
# and zlib.error (damaged data) name no file, so they are turned into a DataError that does.
_UNREADABLE = (gzip.BadGzipFile, zlib.error, EOFError, UnicodeDecodeError)


def read_jsonl(path: Path, required: Sequence[str], what: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a JSON-lines file, optionally gzipped; checks required keys."""
    lineno = 0
    try:
        with _open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}); expected one {what} per line") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object ({what}), got {type(rec).__name__}")
                missing = [k for k in required if k not in rec]
                if missing:
                    raise DataError(f"{path}:{lineno}: {what} lacks key(s) {missing}; expected keys {list(required)}")
                yield lineno, rec
    except _UNREADABLE as e:
        where = f" after line {lineno}" if lineno else ""
        raise DataError(f"{path}: truncated or not a readable JSON-lines file{where} "
                        f"({type(e).__name__}: {e}); expected {what} records") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; expected a JSON-lines file of {what} records") from None


def read_json(path: Path, what: str):
    try:
        with _open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); expected {what}") from None
    except _UNREADABLE as e:
        raise DataError(f"{path}: truncated or not a readable JSON file ({type(e).__name__}: {e}); "
                        f"expected {what}") from None


def in_eval_partition(key: str, seed: int = 0) -> bool:
    """Stable 1-in-5 partition used when one file serves as both training and eval source."""
    return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest(), 16) % 5 == 0


def same_file(sources: dict, a: str, b: str) -> bool:
    return a in sources and b in sources and Path(sources[a]).resolve() == Path(sources[b]).resolve()


def generate(synth, requests: list[SynthRequest]) -> list[str]:
    """Texts for `requests`: from the synthesizer in one batch, or their templates."""
    if not requests:
        return []
    if synth is None:
        return [r.template for r in requests]
    texts = list(synth.generate(requests))
    if len(texts) != len(requests):
        raise DataError(f"synthesizer returned {len(texts)} texts for {len(requests)} requests")
    return texts


def request(kind: str, template: str, seed: int = 0, **fields: object) -> SynthRequest:
    return SynthRequest(kind=kind, fields=tuple(sorted((k, str(v)) for k, v in fields.items())),
                        template=template, seed=int(seed))


def make_example(*, task: str, variant: str, split: str, index: int, seed: int, fitted, target: str,
                 answers: Sequence[str], meta: dict | None = None) -> Example:
    """An Example from a fitted prompt whose marks are `needle` and `answer` spans."""
    needles = [Span(s, e) for s, e in fitted.spans.get("needle", [])]
    return Example(
        id=f"{task}-{variant}-{split}-{seed}-{index}",
        task=task,
        variant=variant,
        prompt=fitted.prompt + "",
        target=target,
        answers=tuple(answers),
        context_span=Span(*fitted.context),
        answer_spans=tuple(Span(s, e) for s, e in fitted.spans.get("answer", [])),
        needle_spans=tuple(needles),
        needles=tuple(fitted.prompt[s.start : s.end] for s in needles),
        n_tokens=fitted.n_tokens,
        meta={**(meta or {}), "n_units": fitted.n_units, "n_filler_words": fitted.n_filler_words,
              "needle_depths": [round((s.start - fitted.context[0]) / max(1, fitted.context[1] - fitted.context[0]), 4)
                                for s in needles]},
    )


def count(dropped: Counter | dict, reason: str) -> None:
    dropped[reason] = dropped.get(reason, 0) + 1
