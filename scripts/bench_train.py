"""Benchmark of engine/train.py: Ray Train overhead per step, and concurrent variants.

(1) wrapper_over_bare: steady-state time per optimizer step of one variant run as a
    one-worker Ray Train TorchTrainer (through train_all), over the same HF Trainer training
    called in-process (engine.train_worker.train_loop_per_worker); medians of alternating
    repeats. Goal <= 1.10.
(2) concurrent_over_ideal: wall time of N variants through `train_all` on the cluster's
    slots, over the ideal: one variant's wall time x ceil(N / slots).

Step times come from the `time` column of each run's metrics.parquet (first to last step),
so model loading and worker start-up do not count in (1); they do count in (2).

Example:
    .venv/bin/python scripts/bench_train.py --out bench_train.json --steps 40 --variants 4 --hidden 256
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: offline tiny checkpoints

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from engine.store import write_json  # noqa: E402
from engine.config import ModelConfig, TrainConfig  # noqa: E402
from engine.train import concurrent_slots, train_all  # noqa: E402
from engine.train_spec import TrainSpec  # noqa: E402
from engine.train_worker import train_loop_per_worker  # noqa: E402
from tasks.example import Example, Span, to_table  # noqa: E402


def write_data(path: Path, n: int, context_chars: int) -> None:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        key = "".join(rng.choice("abcdefgh") for _ in range(6))
        filler = "".join(rng.choice("abcdefgh ") for _ in range(context_chars))
        prompt = f"{filler} key {key} value {key[::-1]}. {filler} key {key}? "
        rows.append(Example(str(i), "bench", "hh", prompt, key[::-1], (key[::-1],), Span(0, len(prompt)), (), (), ()))
    pq.write_table(to_table(rows), path)


def seconds_per_step(out_dir: str) -> float:
    times = pq.read_table(Path(out_dir) / "metrics.parquet").column("time").to_pylist()
    return (times[-1] - times[0]) / (len(times) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="bare/Ray pairs; medians are reported")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--context-chars", type=int, default=200)
    parser.add_argument("--num-cpus", type=int, default=None, help="local cluster size (default: all cores)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray
    from tiny import save_tiny

    console = Console()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    base = str(save_tiny("llama", work / "base", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         max_position_embeddings=2048))
    write_data(work / "train.parquet", 64, args.context_chars)
    spec = TrainSpec("bench/hh", ModelConfig("bench", base),
                     TrainConfig(max_length=1024, grad_accum=1, lr=1e-3, max_steps=args.steps, save_steps=10 ** 6),
                     str(work / "train.parquet"), None, "")

    def variant(name: str) -> TrainSpec:
        return dataclasses.replace(spec, name=f"bench/{name}", out_dir=str(work / name))

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    slots = concurrent_slots([spec] * args.variants, ray.available_resources())
    # Bare and Ray runs alternate, so the load other processes put on the machine hits both.
    bare_steps, ray_steps, bare_walls, one_walls = [], [], [], []
    for r in range(args.repeats):
        bare = variant(f"bare{r}")
        started = time.perf_counter()
        train_loop_per_worker({"spec": bare})
        bare_walls.append(time.perf_counter() - started)
        bare_steps.append(seconds_per_step(bare.out_dir))
        started = time.perf_counter()
        (one,) = train_all([variant(f"ray{r}")], show_progress=False)
        one_walls.append(time.perf_counter() - started)
        ray_steps.append(seconds_per_step(one.out_dir))
    bare_step, ray_step = statistics.median(bare_steps), statistics.median(ray_steps)
    bare_wall, one_wall = statistics.median(bare_walls), statistics.median(one_walls)
    many_specs = [variant(f"many{i}") for i in range(args.variants)]
    started = time.perf_counter()
    train_all(many_specs, show_progress=True)
    many_wall = time.perf_counter() - started
    ray.shutdown()

    ideal = one_wall * math.ceil(args.variants / slots)
    results = {
        "wrapper_over_bare": ray_step / bare_step,
        "concurrent_over_ideal": many_wall / ideal,
        "repeats": args.repeats,
        "bare_seconds_per_step": bare_step,
        "ray_seconds_per_step": ray_step,
        "bare_wall_seconds": bare_wall,
        "one_variant_wall_seconds": one_wall,
        "n_variants": args.variants,
        "slots": slots,
        "n_variants_wall_seconds": many_wall,
        "ideal_wall_seconds": ideal,
        "steps": args.steps,
        "hidden": args.hidden,
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
    }
    table = Table(title="engine/train.py benchmark")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    from engine.provenance import provenance

    write_json({**results, "provenance": provenance()}, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
