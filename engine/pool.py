"""A pool of Ray actors that works through a queue of items, with model affinity and retries.

The evaluation, knockout and patching stages all decode many examples with a few models.
Loading a model is the expensive part, so each actor keeps the model it last used and the
scheduler hands it more items of the same model (`WorkItem.affinity`) before moving it to
another. An item that fails (its actor died or was killed, the call raised, it ran past the
timeout) goes back to the front of its queue and runs on a fresh actor, up to
`max_retries` times; its result is reported exactly once, when it succeeds.

The worker is a plain class (tests call it in-process); `ray.remote` wraps it here only.

Example:
    >>> import ray
    >>> ray.init(num_cpus=2)
    >>> class Square:
    ...     def ready(self): return True
    ...     def run(self, x): return x * x
    >>> items = [WorkItem(key=str(i), affinity="m", payload=(i,), size=1) for i in range(8)]
    >>> results = {}
    >>> stats = run_pool(Square, {}, items, EvaluateConfig(), lambda item, value: results.update({item.key: value}))
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from engine.progress import plain_lines

ACTOR_PREFIX = "needlework-pool"


class PoolError(RuntimeError):
    """An item failed more often than the pool retries it."""


class PoolSettings(Protocol):
    """What the pool reads from its settings (the experiment's `evaluate` section).

    Attributes:
        num_actors: actors to start; None sizes the pool from `ray.available_resources()`.
        cpus_per_actor: CPUs reserved per actor; the actor runs one torch thread per CPU.
        gpus_per_actor: GPUs reserved per actor.
        max_retries: how often a failed item is retried before the stage fails.
        timeout_s: an item running longer than this on one actor is treated as failed.
    """

    num_actors: int | None
    cpus_per_actor: float
    gpus_per_actor: float
    max_retries: int
    timeout_s: float | None


@dataclass(frozen=True)
class WorkItem:
    """One call `worker.run(*payload)`; `size` counts examples for the progress rate."""

    key: str
    affinity: Hashable
    payload: tuple
    size: int = 1


@dataclass
class PoolStats:
    """What happened in one pool run (for logs and benchmarks)."""

    n_actors: int = 0
    startup_s: float = 0.0  # until every initial actor answered `ready`
    wall_s: float = 0.0
    calls: int = 0  # run() calls submitted, retries included
    retries: dict[str, int] = field(default_factory=dict)  # item key -> failed attempts
    failures: list[str] = field(default_factory=list)  # one line per failed attempt


class ExamplesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- ex/s" if speed is None else f"{speed:.2f} ex/s", style="progress.data.speed")


def pool_size(config: PoolSettings, n_items: int, available: dict[str, float]) -> int:
    """Actors to start: as many as the free resources hold (at least one), never more than items.

    An explicit `num_actors` wins, so an autoscaling cluster can be asked for more than is
    free right now; without it, asking for more than is free would leave actors pending
    while idle ones hold the CPUs (a trap on small machines).
    """
    if config.num_actors is not None:
        return max(1, min(config.num_actors, n_items))
    fits = math.inf
    for resource, need in (("CPU", config.cpus_per_actor), ("GPU", config.gpus_per_actor)):
        if need > 0:
            fits = min(fits, math.floor(available.get(resource, 0.0) / need + 1e-9))
    if fits == math.inf:
        fits = n_items
    return max(1, min(int(fits), n_items))


@dataclass
class _Slot:
    """One actor and what it is doing."""

    name: str
    handle: Any
    affinity: Hashable = None
    ref: Any = None  # in-flight ObjectRef (ready() or run())
    item: WorkItem | None = None
    started: float = 0.0
    ready: bool = False


class _Queue:
    """Items grouped by affinity, each group in submission order."""

    def __init__(self, items: Sequence[WorkItem]):
        self.groups: dict[Hashable, deque[WorkItem]] = {}
        for item in items:
            self.groups.setdefault(item.affinity, deque()).append(item)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def push_front(self, item: WorkItem) -> None:
        self.groups.setdefault(item.affinity, deque()).appendleft(item)

    def next_for(self, affinity: Hashable, busy: set[Hashable]) -> WorkItem | None:
        """Same model first; else a model no other actor works on; else the largest queue."""
        if self.groups.get(affinity):
            return self.groups[affinity].popleft()
        nonempty = [(len(g), a) for a, g in self.groups.items() if g]
        if not nonempty:
            return None
        unclaimed = [(n, a) for n, a in nonempty if a not in busy]
        pool = unclaimed or nonempty
        _, chosen = max(pool, key=lambda t: t[0])  # max() keeps the first of equal sizes
        return self.groups[chosen].popleft()


def _kill(handle) -> None:
    import ray

    # the actor may be dead already, or its node gone; either way it holds nothing any more
    with contextlib.suppress(Exception):
        ray.kill(handle, no_restart=True)


def run_pool(
    worker_cls: type,
    worker_kwargs: dict,
    items: Sequence[WorkItem],
    config: PoolSettings,
    on_result: Callable[[WorkItem, Any], None],
    *,
    fatal: tuple[type[BaseException], ...] = (),
    description: str = "items",
    show_progress: bool = True,
) -> PoolStats:
    """Runs every item on a pool of `worker_cls` actors and kills the actors afterwards.

    Args:
        worker_cls: plain class with `ready()` and `run(*payload)`.
        worker_kwargs: constructor arguments of each actor.
        items: the work; keys must be unique.
        config: actors, resources, retries, timeout (`PoolSettings`).
        on_result: called in the driver once per item with its result, as items finish.
        fatal: exception types that are not retried (bad input fails the same way twice).
        description: label of the progress bar.
        show_progress: draw a rich progress bar with examples per second.

    Raises:
        PoolError: an item failed `max_retries + 1` times.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    if len({item.key for item in items}) != len(items):
        raise ValueError("work item keys must be unique")
    stats = PoolStats()
    if not items:
        return stats
    if not ray.is_initialized():
        ray.init()
    remote_cls = ray.remote(worker_cls)
    run_id = uuid.uuid4().hex[:8]
    counter = iter(range(1_000_000))

    def start_actor() -> _Slot:
        name = f"{ACTOR_PREFIX}-{run_id}-{next(counter)}"
        handle = remote_cls.options(
            name=name,
            num_cpus=config.cpus_per_actor,
            num_gpus=config.gpus_per_actor,
            max_restarts=0,
            max_task_retries=0,
        ).remote(**worker_kwargs)
        slot = _Slot(name=name, handle=handle, started=time.monotonic())
        slot.ref = handle.ready.remote()
        return slot

    t0 = time.monotonic()
    queue = _Queue(items)
    n_actors = pool_size(config, len(items), ray.available_resources())
    slots = [start_actor() for _ in range(n_actors)]
    stats.n_actors = n_actors
    pending_ready = {s.name for s in slots}
    total = sum(item.size for item in items)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        ExamplesPerSecond(),
        TimeElapsedColumn(),
        disable=not show_progress,
        transient=False,
    )

    def dispatch(slot: _Slot) -> None:
        busy = {s.affinity for s in slots if s.item is not None}
        item = queue.next_for(slot.affinity, busy)
        slot.item = item
        if item is not None:
            slot.affinity = item.affinity
            slot.ref = slot.handle.run.remote(*item.payload)
            stats.calls += 1
            slot.started = time.monotonic()
        else:
            slot.ref = None

    def fail(slot: _Slot, reason: str, err: BaseException | None) -> _Slot:
        item = slot.item
        _kill(slot.handle)
        pending_ready.discard(slot.name)
        if item is None:  # the actor died before it took work: replace it, a bounded number of times
            stats.failures.append(f"{slot.name}: {reason}")
            if sum(1 for f in stats.failures if f.startswith(ACTOR_PREFIX)) > config.max_retries + n_actors:
                raise PoolError(f"{description}: actors keep dying at startup; last: {reason}") from err
            return start_actor()
        attempts = stats.retries.get(item.key, 0) + 1
        stats.retries[item.key] = attempts
        stats.failures.append(f"{item.key} on {slot.name} (attempt {attempts}): {reason}")
        cause = getattr(err, "cause", err)
        if isinstance(cause, fatal):  # bad input fails the same way on every actor: say so once
            raise cause
        if attempts > config.max_retries:
            raise PoolError(f"{description}: {item.key} failed {attempts} time(s); last: {reason}") from err
        queue.push_front(item)
        return start_actor()

    try:
        with progress, plain_lines(progress, description):
            bar = progress.add_task(description, total=total)
            while any(s.ref is not None for s in slots):
                refs = [s.ref for s in slots if s.ref is not None]
                done, _ = ray.wait(refs, num_returns=1, timeout=1.0)
                for ref in done:
                    i = next(i for i, s in enumerate(slots) if s.ref == ref)
                    slot = slots[i]
                    try:
                        value = ray.get(ref, timeout=60)
                    except (RayActorError, RayTaskError, GetTimeoutError) as err:
                        slots[i] = fail(slot, f"{type(err).__name__}: {str(err).splitlines()[0][:300]}", err)
                        continue
                    if not slot.ready:
                        slot.ready = True
                        pending_ready.discard(slot.name)
                        if not pending_ready and not stats.startup_s:
                            stats.startup_s = time.monotonic() - t0
                    else:
                        on_result(slot.item, value)
                        progress.advance(bar, slot.item.size)
                    dispatch(slot)
                if config.timeout_s is not None:
                    now = time.monotonic()
                    for i, slot in enumerate(slots):
                        if slot.item is not None and now - slot.started > config.timeout_s:
                            slots[i] = fail(slot, f"timed out after {config.timeout_s:.0f}s", None)
                # A replaced actor has no work yet; give idle actors anything left in the queue.
                for slot in slots:
                    if slot.ref is None and slot.ready and len(queue):
                        dispatch(slot)
    finally:
        for slot in slots:
            _kill(slot.handle)
    stats.wall_s = time.monotonic() - t0
    return stats
