"""Benchmark of sharded evaluation: throughput with 2 actors over 1 actor on a 2-CPU Ray cluster.

Each actor reserves one CPU and runs one torch thread, so two actors should come close to
twice the examples per second of one (goal: `actors2_over_actors1` >= 1.7). The workload is
a scored greedy evaluation (retrieval and insight scores inline) of a random small Llama
(GQA) with a character tokenizer on key-value prompts.

Throughput is measured two ways: `steady` excludes pool startup (actor processes starting
and importing torch/transformers, reported as `startup_s`), `wall` includes it. Other
processes on the same cores lower the ratio, so the machine's load average and the 2-over-1
ratio of the same evaluation work in plain processes without Ray (`bare_two_over_one`, the
ceiling at that moment) are recorded with it.

Example:
    $ .venv/bin/python scripts/bench_eval.py --out runs/bench_eval.json
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from engine.store import write_json  # noqa: E402

MODEL = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=2048)


class CharF1:
    """Task-like scorer (F1 over characters) so the benchmark needs no task data."""

    MAX_NEW_TOKENS = 24
    STOP_STRINGS = ()

    def score(self, prediction, example):
        pred, gold = prediction.strip(), example.answers[0]
        common = sum((Counter(pred) & Counter(gold)).values())
        return {"f1": 0.0 if not common else 2 * common / (len(pred) + len(gold)), "em": float(pred == gold)}


def write_examples(path: Path, n: int, prompt_chars: int, seed: int = 0) -> str:
    import pyarrow.parquet as pq

    from tasks.example import Example, Span, to_table

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    examples = []
    for i in range(n):
        records, pairs = "", []
        while len(records) < prompt_chars:
            key, value = "".join(rng.choices(letters, k=4)), "".join(rng.choices(letters, k=6))
            pairs.append((key, value))
            records += f"{key}={value}; "
        key, value = pairs[rng.randrange(len(pairs))]
        prompt = f"records: {records}find {key}:"
        at = prompt.index(f"{key}={value}")
        examples.append(Example(
            id=f"b{i:04d}", task="bench", variant="real", prompt=prompt, target=value, answers=(value,),
            context_span=Span(9, 9 + len(records)), answer_spans=(Span(at + 5, at + 11),),
            needle_spans=(Span(at, at + 11),), needles=(f"{key}={value}",), n_tokens=len(prompt)))
    pq.write_table(to_table(examples), path)
    return str(path)


BARE = """
import sys, time
sys.path[:0] = sys.argv[4:]
import pyarrow.parquet as pq
from bench_eval import CharF1
from engine.config import EvaluateConfig, ModelConfig
from engine.evaluate import EvalJob, EvalWorker, ModelRef
ckpt, data, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
rows = pq.read_table(data).to_pylist()
job = EvalJob("bare", ModelRef(ModelConfig("bench", ckpt)), "bench", data, "unused", EvaluateConfig(batch_size=4))
worker = EvalWorker(torch_threads=1, scorer=CharF1())
worker.run(job, 0, rows[:4])  # load the model outside the timed part
t, n = time.perf_counter(), 0
while time.perf_counter() - t < seconds:
    start = (n * 4) % (len(rows) - 4)
    worker.run(job, start, rows[start : start + 4])
    n += 4
print(n / (time.perf_counter() - t))
"""


def bare_capacity(ckpt: str, data: str, seconds: float = 8.0) -> dict:
    """The same evaluation work in plain processes (no Ray): one alone, then two at once.

    `two_over_one` is what these cores gave a second process at that moment: the ceiling
    for the pool's ratio, whatever else runs on the machine.
    """
    import subprocess

    def run(n: int) -> float:
        command = [sys.executable, "-c", BARE, ckpt, data, str(seconds), str(ROOT), str(ROOT / "scripts")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
                 for _ in range(n)]
        return sum(float(p.communicate()[0].strip().splitlines()[-1]) for p in procs)

    one, two = run(1), run(2)
    return {"one": one, "two": two, "two_over_one": two / one}


def run_once(n_actors: int, ckpt: str, data: str, out: Path, args) -> dict:
    from engine.config import EvaluateConfig, ModelConfig
    from engine.evaluate import EvalJob, ModelRef, run_eval_pool

    shutil.rmtree(out, ignore_errors=True)
    pool = EvaluateConfig(num_actors=n_actors, cpus_per_actor=1, shard_size=args.shard_size, timeout_s=600,
                          batch_size=args.batch_size)
    job = EvalJob(f"bench-{n_actors}", ModelRef(ModelConfig("bench", ckpt)), "bench", data, str(out), pool)
    load_before = os.getloadavg()[0]
    summaries, stats = run_eval_pool([job], show_progress=True, scorer=CharF1())
    n = summaries[job.name]["n"]
    return {
        "actors": n_actors,
        "examples": n,
        "wall_s": stats.wall_s,
        "startup_s": stats.startup_s,
        "steady_examples_per_s": n / (stats.wall_s - stats.startup_s),
        "wall_examples_per_s": n / stats.wall_s,
        "retries": sum(stats.retries.values()),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg()[0],
        "predictions": str(out / "predictions.parquet"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--prompt-chars", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs per pool size; the best is kept")
    parser.add_argument("--worker-niceness", type=int, default=0, help="nice value of Ray workers (Ray's default: 15)")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import ray
    from rich.console import Console
    from rich.table import Table
    from tiny import save_tiny

    console = Console()
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        ckpt = str(save_tiny("llama", work / "model", **MODEL))
        data = write_examples(work / "eval.parquet", args.examples, args.prompt_chars)
        # Ray runs workers at nice 15 by default; on cores shared with other nice-0 work that
        # starves the actors and measures the OS scheduler, not the pool
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _system_config={"worker_niceness": args.worker_niceness})
        runs, capacity = {1: [], 2: []}, []
        for repeat in range(args.repeats):
            capacity.append(bare_capacity(ckpt, data))
            for n_actors in (1, 2):
                runs[n_actors].append(run_once(n_actors, ckpt, data, work / f"out{n_actors}-{repeat}", args))
        best = {a: max(r, key=lambda x: x["steady_examples_per_s"]) for a, r in runs.items()}
        same = pq.read_table(best[1]["predictions"]).equals(pq.read_table(best[2]["predictions"]))
        result = {
            "actors2_over_actors1": best[2]["steady_examples_per_s"] / best[1]["steady_examples_per_s"],
            "actors2_over_actors1_wall": best[2]["wall_examples_per_s"] / best[1]["wall_examples_per_s"],
            "goal": 1.7,
            # the same work in 2 plain processes over 1 (no Ray), measured before each repeat:
            # the most any pool could gain on these cores at that moment
            "bare_two_over_one": [c["two_over_one"] for c in capacity],
            "bare_examples_per_s": capacity,
            "same_predictions": same,
            "model": MODEL,
            "workload": {"examples": args.examples, "prompt_chars": args.prompt_chars, "batch_size": args.batch_size,
                         "shard_size": args.shard_size, "max_new_tokens": CharF1.MAX_NEW_TOKENS, "scored": True},
            "cpus": 2,
            "torch_threads_per_actor": 1,
            "worker_niceness": args.worker_niceness,
            "runs": {str(a): [{k: v for k, v in r.items() if k != "predictions"} for r in rs] for a, rs in runs.items()},
        }
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title="sharded evaluation throughput (2 CPUs, 1 torch thread per actor)")
    for column in ("actors", "examples", "startup s", "wall s", "steady ex/s", "wall ex/s", "load avg"):
        table.add_column(column, justify="right")
    for a in (1, 2):
        r = best[a]
        table.add_row(str(a), str(r["examples"]), f"{r['startup_s']:.1f}", f"{r['wall_s']:.1f}",
                      f"{r['steady_examples_per_s']:.2f}", f"{r['wall_examples_per_s']:.2f}",
                      f"{r['load_avg_before']:.1f} -> {r['load_avg_after']:.1f}")
    console.print(table)
    console.print(f"actors2_over_actors1 = {result['actors2_over_actors1']:.2f} (steady; goal >= 1.7), "
                  f"wall = {result['actors2_over_actors1_wall']:.2f}, same predictions: {same}; "
                  f"same work in 2 plain processes over 1: {', '.join(f'{c:.2f}' for c in result['bare_two_over_one'])}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from engine.provenance import provenance

    write_json({**result, "provenance": provenance()}, out)


if __name__ == "__main__":
    main()
