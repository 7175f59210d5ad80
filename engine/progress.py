"""Progress in logs: plain lines at a steady interval where the output is not a terminal.

rich's live bars redraw in place on a terminal; under `ray job submit`, in CI logs or with
the output redirected they print nothing until they stop, and a run that pretrains or trains
for minutes looks hung. Where the console is not a terminal, `plain_lines` prints what a
rich `Progress` holds (stage, done/total, elapsed, an estimate of the time left) every
`interval()` seconds, from a background thread, so a line appears even while one long step
runs; `heartbeat` does the same for work that has no progress bar of its own.

Example:
    >>> progress = Progress(TextColumn("{task.description}"), BarColumn())
    >>> with progress, plain_lines(progress, "evaluate"):
    ...     bar = progress.add_task("evaluate 4 job(s)", total=64)
    ...     progress.advance(bar, 16)
    # in a log, every 30 s: "evaluate 4 job(s): 16/64, elapsed 0:01:05, about 0:03:15 left"
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence

from rich.console import Console
from rich.progress import Progress

INTERVAL_ENV = "NEEDLEWORK_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def interval() -> float:
    """Seconds between plain progress lines: $NEEDLEWORK_PROGRESS_INTERVAL, default 30."""
    try:
        seconds = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return seconds if seconds > 0 else DEFAULT_INTERVAL


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_lines(progress: Progress, label: str, elapsed: float, fields: Sequence[str] = ()) -> list[str]:
    """What `progress` holds, as plain lines: a count of finished tasks when there are several,
    then one line per unfinished task."""
    tasks = [t for t in progress.tasks if t.visible]
    lines = []
    if len(tasks) > 1:
        lines.append(f"{label}: {sum(t.finished for t in tasks)}/{len(tasks)} done, elapsed {duration(elapsed)}")
    for task in tasks:
        if task.finished and len(tasks) > 1:
            continue
        done = f"{task.completed:g}/{task.total:g}" if task.total else f"{task.completed:g} so far"
        left = task.time_remaining
        if left is None and task.total and task.completed:
            left = elapsed * (task.total - task.completed) / task.completed
        extra = "".join(f", {name} {task.fields[name]}" for name in fields if task.fields.get(name) not in (None, "", "-"))
        when = f"elapsed {duration(elapsed)}" + (f", about {duration(left)} left" if task.total else "")
        name = task.description
        if len(tasks) > 1:
            name = "  " + name
        elif not name.startswith(label):
            name = f"{label} {name}"
        lines.append(f"{name}: {done}, {when}{extra}")
    return lines


@contextlib.contextmanager
def _ticker(console: Console, lines, enabled: bool) -> Iterator[None]:
    if not enabled or console.is_terminal:
        yield
        return
    stop = threading.Event()
    started = time.monotonic()

    def tick() -> None:
        while not stop.wait(interval()):
            for line in lines(time.monotonic() - started):
                console.print(line, markup=False, highlight=False, soft_wrap=True)
            console.file.flush()

    thread = threading.Thread(target=tick, name="needlework-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def plain_lines(progress: Progress, label: str, fields: Sequence[str] = ()):
    """While the body runs, prints `progress` as plain lines if its console is not a terminal.

    Args:
        progress: a rich Progress (nothing is printed when it is disabled).
        label: names the stage in the summary line of several tasks.
        fields: task fields shown after the counts (e.g. "loss").
    """
    return _ticker(progress.console, lambda elapsed: progress_lines(progress, label, elapsed, fields),
                   enabled=not progress.disable)


def heartbeat(console: Console, label: str, enabled: bool = True):
    """While the body runs, prints "<label>: running, elapsed ..." if `console` is not a terminal."""
    return _ticker(console, lambda elapsed: [f"{label}: running, elapsed {duration(elapsed)}"], enabled)
