"""Backend + prompts + validation + cache: one validated text per request, in order.

Each request is generated, validated by its kind's check, and regenerated with a new seed
while invalid, up to `max_retries` times (at temperature 0 a new seed changes nothing, so
there is one try). An item still invalid after that is never dropped
or silently replaced: with `on_invalid: fallback` it gets its request's `template` text and
is counted under `fallback` in the report (with the reasons it failed); with
`on_invalid: raise` synthesis stops with a `SynthError` naming the counts and reasons.
Every raw output is cached by content (`engine/synth/cache.py`), so a re-run calls no
backend and reproduces the same texts and the same report counts.

Example:
    >>> synth = make_synthesizer(SynthConfig(backend="template"), cache_dir=None)
    >>> synth.generate([make_request("simplify_insight", template="Cats nap.", insight="...")])
    ['Cats nap.']
    >>> report = run_synth("runs/exp/synth_requests.parquet", config, "runs/exp/synth_cache")
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from engine.progress import plain_lines
from engine.store import write_parquet
from engine.synth.backend import Backend, make_backend
from engine.synth.cache import GenerationCache, generation_key
from engine.synth.config import SynthConfig
from engine.synth.errors import SynthError
from engine.synth.prompts import build_chat
from engine.synth.request import SynthRequest, read_requests
from engine.synth.validate import check

SEED_STRIDE = 1_000_003  # a prime, so retry seeds of neighbouring requests do not collide


def attempt_seed(seed: int, attempt: int) -> int:
    """Seed of retry `attempt` (0 = first try, which uses the request's own seed)."""
    return (seed + attempt * SEED_STRIDE) % (2**31 - 1)


class RateColumn(ProgressColumn):
    """Finished items per second."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} it/s" if speed else "- it/s", style="progress.data.speed")


class Synthesizer:
    """Generates validated texts for requests; `report` holds cumulative counts.

    Args:
        config: backend, model, sampling and retry policy.
        cache_dir: directory of the generation cache; None keeps generations in memory only.
        backend: a ready backend (any object with `complete`); by default built from config.
        show_progress: draw a rich progress bar with throughput.
    """

    def __init__(
        self,
        config: SynthConfig,
        cache_dir: Path | str | None = None,
        backend: Backend | None = None,
        show_progress: bool = True,
    ):
        self.config = config
        self.backend = backend if backend is not None else make_backend(config)
        self.cache = GenerationCache(Path(cache_dir)) if cache_dir is not None else None
        self.show_progress = show_progress
        self._memory: dict[str, str] = {}
        self._counts: Counter = Counter()
        self._reasons: dict[str, Counter] = defaultdict(Counter)
        self._seconds = 0.0

    @property
    def report(self) -> dict:
        """Counts so far: requests, template, cache_hits, generated, valid_first_try,
        recovered, invalid_outputs, retried, fallback; reasons per kind; backend throughput."""
        counts = {
            k: self._counts.get(k, 0)
            for k in ("requests", "template", "cache_hits", "generated", "valid_first_try", "recovered",
                      "invalid_outputs", "retried", "fallback")
        }
        counts["reasons"] = {kind: dict(c) for kind, c in self._reasons.items()}
        counts["backend_seconds"] = round(self._seconds, 3)
        counts["generated_per_s"] = round(counts["generated"] / self._seconds, 3) if self._seconds else 0.0
        counts["backend"] = self.config.backend
        counts["model"] = self.config.model
        return counts

    def _lookup(self, key: str) -> str | None:
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        return self._memory.get(key)

    def _complete(self, chats: list[list[dict]], seeds: list[int], keys: list[str]) -> dict[str, str]:
        """Generates each distinct key once and stores it in the cache."""
        todo: dict[str, tuple[list[dict], int]] = {}
        for chat, seed, key in zip(chats, seeds, keys):
            todo.setdefault(key, (chat, seed))
        if not todo:
            return {}
        start = time.perf_counter()
        texts = self.backend.complete([c for c, _ in todo.values()], [s for _, s in todo.values()])
        self._seconds += time.perf_counter() - start
        if len(texts) != len(todo):
            raise SynthError(f"{self.config.backend} backend returned {len(texts)} texts for {len(todo)} chats")
        fresh = dict(zip(todo, texts))
        self._counts["generated"] += len(fresh)
        if self.cache is not None:
            self.cache.put(fresh, model=self.config.model or "")
        self._memory.update(fresh)
        return fresh

    def _chunk_size(self, n: int) -> int:
        # HTTP has no start-up cost per call, so smaller calls give live progress; Ray Data
        # backends start actors (and load the model) per call, so they get one call per round.
        if self.config.backend == "http":
            return max(1, 4 * self.config.concurrency)
        return max(1, n)

    def _tries(self) -> int:
        # Greedy decoding (temperature 0) ignores the seed, so a retry would only reproduce
        # the same invalid text: one try, then the explicit fallback (or raise).
        return 1 + (self.config.max_retries if self.config.temperature > 0 else 0)

    def generate(self, requests: list[SynthRequest]) -> list[str]:
        """One validated text per request, in order (see the module docstring for failures)."""
        requests = list(requests)
        self._counts["requests"] += len(requests)
        if self.backend is None:
            self._counts["template"] += len(requests)
            return [r.template for r in requests]
        identity = self.config.identity()
        chats = [build_chat(r) for r in requests]
        texts: list[str | None] = [None] * len(requests)
        failures: dict[int, list[str]] = defaultdict(list)
        pending = list(range(len(requests)))
        with Progress(
            TextColumn("[bold]synth[/] {task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
            TimeElapsedColumn(), disable=not self.show_progress, transient=False,
        ) as progress, plain_lines(progress, "synth"):
            bar = progress.add_task(f"{self.config.backend} try 1", total=len(requests))
            for attempt in range(self._tries()):
                if not pending:
                    break
                progress.update(bar, description=f"{self.config.backend} try {attempt + 1}")
                if attempt:
                    self._counts["retried"] += len(pending)
                still_invalid = []
                step = self._chunk_size(len(pending))
                for lo in range(0, len(pending), step):
                    chunk = pending[lo : lo + step]
                    seeds = [attempt_seed(requests[i].seed, attempt) for i in chunk]
                    keys = [generation_key(chats[i], s, identity) for i, s in zip(chunk, seeds)]
                    raw = {k: self._lookup(k) for k in keys}
                    self._counts["cache_hits"] += sum(raw[k] is not None for k in keys)
                    if any(v is None for v in raw.values()):
                        miss = [j for j, k in enumerate(keys) if raw[k] is None]
                        raw.update(self._complete([chats[chunk[j]] for j in miss], [seeds[j] for j in miss],
                                                  [keys[j] for j in miss]))
                    for i, key in zip(chunk, keys):
                        verdict = check(requests[i], raw[key])
                        if verdict.ok:
                            texts[i] = verdict.text
                            self._counts["valid_first_try" if attempt == 0 else "recovered"] += 1
                            progress.advance(bar)
                        else:
                            self._counts["invalid_outputs"] += 1
                            self._reasons[requests[i].kind][verdict.reason] += 1
                            failures[i].append(verdict.reason)
                            still_invalid.append(i)
                pending = still_invalid
            if pending:
                self._give_up(requests, pending, failures)
                for i in pending:
                    texts[i] = requests[i].template
                    progress.advance(bar)
        return texts  # type: ignore[return-value]

    def _give_up(self, requests: list[SynthRequest], pending: list[int], failures: dict[int, list[str]]) -> None:
        kinds = Counter(requests[i].kind for i in pending)
        if self.config.on_invalid == "raise":
            first = pending[0]
            raise SynthError(
                f"{len(pending)} of {len(requests)} requests still invalid after "
                f"{self._tries() - 1} retries (by kind: {dict(kinds)}); e.g. request {first} "
                f"({requests[first].kind}) failed with {failures[first]}. Set synth.on_invalid: fallback "
                "to use their templates instead."
            )
        self._counts["fallback"] += len(pending)
        for kind, n in kinds.items():
            self._reasons[kind]["fallback"] += n


def make_synthesizer(config: SynthConfig, cache_dir: Path | str | None = None) -> Synthesizer:
    """The synthesizer tasks use: `make_synthesizer(cfg, run_dir / "synth_cache").generate(reqs)`."""
    return Synthesizer(config, cache_dir)


def run_synth(
    requests: str | Path | list[SynthRequest],
    config: SynthConfig,
    cache_dir: Path | str | None,
    out_path: Path | str | None = None,
    show_progress: bool = True,
) -> dict:
    """Generates (or replays from cache) a batch of requests; returns the report.

    Args:
        requests: a list, or a Parquet file written by `engine.synth.request.write_requests`.
        config: synthesis settings.
        cache_dir: generation cache; later `generate` calls with the same config hit it.
        out_path: optional Parquet file receiving {kind, seed, text} per request, atomically.
        show_progress: draw the rich progress bar.
    """
    if not isinstance(requests, list):
        requests = read_requests(requests)
    synth = Synthesizer(config, cache_dir, show_progress=show_progress)
    texts = synth.generate(requests)
    if out_path is not None:
        _write_texts(Path(out_path), requests, texts)
    return synth.report


def _write_texts(path: Path, requests: list[SynthRequest], texts: list[str]) -> None:
    table = pa.table({"kind": [r.kind for r in requests], "seed": [r.seed for r in requests], "text": texts})
    write_parquet(table, path)
