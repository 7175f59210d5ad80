"""Measures an experiment's per-token costs on the hardware it runs on, for `needlework plan --cost`.

Runs `engine.calibrate.calibrate`: a few LoRA fine-tune steps and a scored greedy evaluation of
the experiment's model at its context length, in one Ray task holding a fine-tune worker's GPUs,
and writes `<run_dir>/calibration.json`. Every later `needlework plan EXP --cost` of that run
directory prices the grid with these measured seconds per token instead of throughput.yaml's
stated ones. Prints the figures (and the stated ones beside them, where throughput.yaml has the
model) and writes the same JSON to `--out` when given.

Example (on the cluster, so the task lands on a GPU node):
    $ ray job submit --working-dir . -- python scripts/bench_cost.py experiments/paper/llama3_8b_mdqa.yaml
    $ .venv/bin/python scripts/bench_cost.py experiments/demo.yaml --steps 3    # the CPU miniature
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from engine.calibrate import calibrate  # noqa: E402
from engine.config import load_experiment  # noqa: E402
from engine.cost_inputs import RATE_FIELDS, CostError, load_throughput, stated_rates  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiment")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=runs/x")
    parser.add_argument("--steps", type=int, default=4, help="fine-tune steps measured after a warm-up step")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per prompt")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", help="also write the measured figures here (JSON)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    exp = load_experiment(args.experiment, overrides=args.overrides)
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    path = calibrate(exp, steps=args.steps, new_tokens=args.new_tokens, timeout_s=args.timeout)
    ray.shutdown()
    measured = json.loads(path.read_text())
    stated = None
    try:
        stated = stated_rates(load_throughput(), exp.model.path, "H100-80GB", measured["context_tokens"],
                              exp.model.sliding_window, exp.evaluate.batch_size, exp.train.gradient_checkpointing)
    except CostError:
        pass  # throughput.yaml does not describe this model: nothing to compare with
    table = Table(title=f"{exp.name}: measured on {measured['device']} at {measured['context_tokens']} tokens")
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_column("stated (H100, throughput.yaml)", justify="right")
    for key in RATE_FIELDS:
        table.add_row(key, f"{measured[key]:.4g}", f"{getattr(stated, key):.4g}" if stated else "-")
    Console().print(table)
    Console().print(f"wrote {path}")
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(measured, indent=2))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
