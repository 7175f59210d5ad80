"""Measured per-token costs of an experiment's model where it runs: `<run_dir>/calibration.json`.

`needlework plan --cost` prices a grid from seconds per token. This measures them with the
engine's own code paths on a short workload of the experiment's shape (prompts of
target_tokens tokens: filler with one needle at a random depth, and its question), so later
plans of the same run directory use measured figures instead of throughput.yaml's stated ones:

- train_s_per_token: steps of the experiment's LoRA fine-tune (`engine.train_worker`, in the
  process, with its rank, targets, batch size and checkpointing; DeepSpeed left out), from the
  tokens/s of metrics.parquet after a first warm-up step;
- train_startup_s: that fine-tune's wall time outside its steps (model load, tokenizing, set-up;
  not Ray Train's process start);
- prefill_s_per_token, decode_s_per_token: a scored greedy evaluation (`engine.evaluate`) of
  evaluate.batch_size prompts, once with 1 and once with `new_tokens` new tokens: prefill =
  t(1) / prompt tokens, decode = (t(N) - t(1)) / tokens generated after the first (medians of
  repeated passes after a warm-up pass);
- load_s: loading the model for evaluation.

`calibrate` runs the measurement in one Ray task holding the GPUs (and CPUs) a fine-tune worker
of the experiment asks for, so `ray job submit` on a cluster measures a GPU node's figures.

Example:
    >>> path = calibrate(load_experiment("experiments/paper/llama3_8b_mdqa.yaml"), steps=4)
    >>> json.loads(path.read_text())["train_s_per_token"]
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import tempfile
import time
from pathlib import Path

from engine.config import Experiment
from engine.cost_inputs import CALIBRATION, RATE_FIELDS
from engine.evaluate import EvalJob, ModelRef, evaluate_shard, load_models
from engine.pipeline import base_model_path, resolved_model
from engine.provenance import provenance
from engine.store import write_json
from engine.train_spec import TrainSpec
from tasks.example import Example, Span, to_table

FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ", "There and back again. ")
QUESTION = "\nWhat is the secret code? Answer:"


def workload(tokenizer, target_tokens: int, n: int, seed: int = 0) -> list:
    """`n` examples of at most `target_tokens` tokens: filler sentences with one needle at a random
    depth, then its question; the answer span marked as the scorer needs it."""
    def count(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    rng = random.Random(seed)
    out = []
    for i in range(n):
        code = f"{rng.randrange(10_000):04d}"
        needle = f"The secret code is {code}. "
        units = [FILLER[j % len(FILLER)] for j in range(max(1, target_tokens))]
        # the most filler sentences that fit: token counts grow with the sentences, so bisect
        lo, hi = 0, len(units)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count("".join(units[:mid]) + needle + QUESTION) <= target_tokens:
                lo = mid
            else:
                hi = mid - 1
        at = rng.randrange(lo + 1)
        before, after = "".join(units[:at]), "".join(units[at:lo])
        context = before + needle + after
        prompt = context + QUESTION
        start = len(before) + needle.index(code)
        out.append(Example(f"calibration-{i}", "calibration", "real", prompt, " " + code, (code,),
                           Span(0, len(context)), (Span(start, start + len(code)),),
                           (Span(len(before), len(before) + len(needle)),), (needle,), count(prompt)))
    return out


class _Scorer:
    """A task-like scorer for the workload: every prompt decodes exactly `MAX_NEW_TOKENS` (no stop)."""

    STOP_STRINGS = ()

    def __init__(self, max_new_tokens: int):
        self.MAX_NEW_TOKENS = max_new_tokens

    def score(self, prediction: str, example) -> dict:
        hit = float(prediction.strip() == example.answers[0])
        return {"f1": hit, "em": hit}


def measure(experiment: Experiment, base_model: str, steps: int = 4, new_tokens: int = 16, repeats: int = 3) -> dict:
    """The rates of RATE_FIELDS on this process's hardware, with what they were measured on.

    Decode timings are medians of `repeats` passes after a warm-up pass.
    """
    import pyarrow.parquet as pq
    import torch

    from engine.models import load_tokenizer
    from engine.train_worker import train_loop_per_worker
    m, t, e = resolved_model(experiment, base_model), experiment.train, experiment.evaluate
    context = max(task.target_tokens for task in experiment.tasks)
    tokenizer = load_tokenizer(base_model, trust_remote_code=m.trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="needlework-calibrate-") as tmp:
        tmp = Path(tmp)
        examples = workload(tokenizer, context, max(e.batch_size, t.batch_size * (steps + 1)))
        pq.write_table(to_table(examples), tmp / "train.parquet")
        # the experiment's own fine-tune, a few single-batch steps long, on one worker
        measured_train = dataclasses.replace(t, grad_accum=1, max_steps=steps + 1, save_steps=10 ** 6, num_workers=1,
                                             max_length=max(t.max_length, context + 64), deepspeed=None)
        spec = TrainSpec("calibration/real", m, measured_train, str(tmp / "train.parquet"), None, str(tmp / "model"))
        started = time.perf_counter()
        train_loop_per_worker({"spec": spec})
        train_wall = time.perf_counter() - started
        metrics = pq.read_table(tmp / "model" / "metrics.parquet").to_pylist()
        steady = [r for r in metrics[1:] if r["tokens_per_second"] > 0] or metrics
        train_s_per_token = 1.0 / statistics.median(r["tokens_per_second"] for r in steady)
        tokens = sum(ex.n_tokens for ex in examples[: t.batch_size * (steps + 1)])

        job = EvalJob("calibration", ModelRef(m), "calibration", str(tmp / "train.parquet"), str(tmp / "eval"),
                      evaluate=dataclasses.replace(e, gpus_per_actor=t.gpus_per_worker), scoring=experiment.scoring)
        started = time.perf_counter()
        loaded = load_models(job)
        load_s = time.perf_counter() - started
        rows = pq.read_table(tmp / "train.parquet").to_pylist()[: e.batch_size]

        def timed(n_new: int) -> tuple[float, int]:
            started = time.perf_counter()
            settings = dataclasses.replace(job.evaluate, max_new_tokens=n_new)
            table = evaluate_shard(loaded, dataclasses.replace(job, evaluate=settings), rows, scorer=_Scorer(n_new))
            return time.perf_counter() - started, sum(table.column("n_tokens").to_pylist())

        timed(1)  # the first pass pays one-off set-up (kernels, the scoring attention's registration)
        # Interleaved, and the fastest of each: load from other processes only ever adds time, so
        # the minimum is the estimate least moved by it (a median of a busy machine's runs can put
        # 16 new tokens below one).
        runs: dict[int, list] = {1: [], new_tokens: []}
        for _ in range(repeats):
            for n_new in runs:
                runs[n_new].append(timed(n_new))
        seconds = {n: min(r[0] for r in rs) for n, rs in runs.items()}
        generated = {n: rs[0][1] for n, rs in runs.items()}
    prompt_tokens = sum(ex.n_tokens for ex in examples[: e.batch_size])
    decoded_after_first = max(1, generated[new_tokens] - generated[1])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "model": m.path,
        "device": device,
        "measured_at": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "context_tokens": context,
        "eval_batch_size": e.batch_size,
        "train_steps": steps,
        "train_s_per_token": train_s_per_token,
        "train_startup_s": max(0.0, train_wall - train_s_per_token * tokens),
        "prefill_s_per_token": seconds[1] / prompt_tokens,
        "decode_s_per_token": max(0.0, seconds[new_tokens] - seconds[1]) / decoded_after_first,
        "generated_tokens": generated[new_tokens],
        "load_s": load_s,
        "provenance": provenance(),  # of the process that measured: the worker's hardware and threads
    }


def write_calibration(experiment: Experiment, measured: dict) -> Path:
    """Writes `measured` to `<run_dir>/calibration.json` atomically."""
    missing = [k for k in RATE_FIELDS if k not in measured]
    if missing:
        raise ValueError(f"calibration lacks {missing}")
    return write_json(measured, experiment.resolved_run_dir() / CALIBRATION)


def calibrate(experiment: Experiment, steps: int = 4, new_tokens: int = 16, timeout_s: float | None = None) -> Path:
    """Measures in one Ray task with a fine-tune worker's resources; writes calibration.json."""
    import ray

    t = experiment.train
    task = ray.remote(num_cpus=t.cpus_per_worker, num_gpus=t.gpus_per_worker)(measure)
    base_model = base_model_path(experiment, show_progress=False)
    measured = ray.get(task.remote(experiment, base_model, steps, new_tokens), timeout=timeout_s)
    return write_calibration(experiment, measured)
