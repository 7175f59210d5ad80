"""engine/progress.py: where the output is a pipe (ray job logs, CI), long work prints plain
progress lines at a steady interval; on a terminal it prints none (rich draws the bars)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from engine.progress import heartbeat, progress_lines

ROOT = Path(__file__).parents[2]

POOL_SCRIPT = textwrap.dedent("""
    import sys, time
    import ray
    from engine.config import EvaluateConfig
    from engine.pool import WorkItem, run_pool

    class Slow:
        def ready(self):
            return True

        def run(self, x):
            time.sleep(0.4)
            return x

    ray.init(address=sys.argv[1], log_to_driver=False)
    items = [WorkItem(key=str(i), affinity="m", payload=(i,), size=1) for i in range(8)]
    run_pool(Slow, {}, items, EvaluateConfig(num_actors=1), lambda item, value: None, description="toy 8 item(s)")
    print("finished", flush=True)
""")


def run_piped(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NEEDLEWORK_PROGRESS_INTERVAL": "0.5"}
    done = subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, cwd=ROOT, timeout=900)  # a hang guard, not a timing target
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_an_actor_pool_prints_plain_lines_into_a_pipe(ray_cluster):
    done = run_piped(POOL_SCRIPT, ray_cluster.get_runtime_context().gcs_address)
    pattern = re.compile(r"^toy 8 item\(s\): (\d)/8, elapsed (\d+):(\d\d):(\d\d)(, about \d+:\d\d:\d\d left)?$")
    lines = [m for m in map(pattern.match, done.stdout.splitlines()) if m]
    # 8 items of 0.4 s on one actor take at least 3.2 s: lines every 0.5 s, however slow the machine
    assert len(lines) >= 4, done.stdout
    counts = [int(m[1]) for m in lines]
    elapsed = [int(m[2]) * 3600 + int(m[3]) * 60 + int(m[4]) for m in lines]
    assert counts == sorted(counts) and elapsed == sorted(elapsed) and elapsed[-1] >= 3
    assert all(m[5] for m, c in zip(lines, counts) if c > 0)  # an estimate once something is done
    assert done.stdout.rstrip().endswith("finished")


def test_a_heartbeat_prints_into_a_pipe_and_nothing_on_a_terminal():
    code = textwrap.dedent("""
        import time
        from rich.console import Console
        from engine.progress import heartbeat

        with heartbeat(Console(), "base_model"):
            time.sleep(2.2)
    """)
    lines = run_piped(code).stdout.splitlines()
    assert len(lines) >= 3 and all(re.fullmatch(r"base_model: running, elapsed 0:00:0\d", line) for line in lines)
    terminal = Console(file=io.StringIO(), force_terminal=True)
    with heartbeat(terminal, "base_model"):
        import time

        time.sleep(1.2)
    assert terminal.file.getvalue() == ""


def test_progress_lines_name_the_stage_counts_elapsed_and_estimate():
    clock = [0.0]
    progress = Progress(get_time=lambda: clock[0])
    hh = progress.add_task("mdqa/hh", total=50, loss="1.234")
    real = progress.add_task("mdqa/real", total=50, loss="-")
    waiting = progress.add_task("mdqa/ll", total=None, loss="-")
    clock[0] = 100.0
    progress.update(hh, completed=10)  # one sample: no rate yet, the estimate is from the elapsed time
    progress.update(real, completed=50)
    assert progress_lines(progress, "train", 100.0, fields=("loss",)) == [
        "train: 1/3 done, elapsed 0:01:40",
        "  mdqa/hh: 10/50, elapsed 0:01:40, about 0:06:40 left, loss 1.234",
        "  mdqa/ll: 0 so far, elapsed 0:01:40",
    ]
    clock[0] = 120.0
    progress.update(hh, completed=20)  # 10 steps in 20 s: 30 left take 60 s
    assert progress_lines(progress, "train", 120.0, fields=("loss",))[1] == (
        "  mdqa/hh: 20/50, elapsed 0:02:00, about 0:01:00 left, loss 1.234")
    del waiting
    single = Progress(get_time=lambda: clock[0])
    single.add_task("hf try 1", total=4)
    assert progress_lines(single, "synth", 5.0) == ["synth hf try 1: 0/4, elapsed 0:00:05, about ? left"]
