"""`needlework heads ...` and `needlework probe`: head scores across tools, how sure and how stable
they are, and the data-quality probe.

Example:
    $ needlework heads compare runs/demo/eval/summhay/real/own theirs/Meta-Llama-3-8B-Instruct.json
    $ needlework heads export runs/demo/eval/mdqa/real/own mdqa_real.json
    $ needlework heads show runs/demo/eval/summhay/real/own --top 10
    $ needlework heads stability runs/demo --task summhay
    $ needlework heads steps runs/demo
    $ needlework probe experiments/demo.yaml --steps 4,16
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from analyses.head_examples import ExamplesError
from analyses.stability import ENOUGH, enough_examples, run_stability
from analyses.steps import run_steps
from engine import artifacts as a
from engine import layout
from engine.config import load_experiment
from engine.provenance import provenance
from engine.store import write_json

console = Console()


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        from engine.config import ConfigError

        raise ConfigError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def cmd_compare(args) -> int:
    from analyses.interop import compare, read_head_scores
    a = read_head_scores(args.a, kind=args.kind)
    b = read_head_scores(args.b, kind=args.kind_b or args.kind)
    result = compare(a, b, top_k=_ints(args.top, "--top"))
    table = Table(title=f"A = {args.a}\nB = {args.b}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [("model shape (layers x heads)", f"{result['shape'][0]} x {result['shape'][1]}"),
            ("|H_A|, |H_B|, |H_A ∩ H_B|", f"{result['n_a']}, {result['n_b']}, {result['n_intersection']}"),
            ("recall of B's heads in A: |H_A ∩ H_B| / |H_B|", _fmt(result["recall_b_in_a"])),
            ("recall of A's heads in B: |H_A ∩ H_B| / |H_A|", _fmt(result["recall_a_in_b"])),
            ("Jaccard", _fmt(result["jaccard"])),
            ("cosine of score grids", "– (a ranked list has no scores)" if result["cosine"] is None
             else _fmt(result["cosine"])),
            (f"Spearman rho over {result['spearman_n']} heads (permutation p)",
             f"{_fmt(result['spearman_rho'])} (p {_fmt(result['spearman_p'], 4)})")]
    rows += [(f"top-{k} overlap", _fmt(v)) for k, v in result["top_k"].items()]
    for measure, value in rows:
        table.add_row(measure, value)
    console.print(table)
    if args.json:
        clean = json.loads(json.dumps(result), parse_constant=lambda c: None)  # NaN -> null: strict JSON
        write_json({**clean, "provenance": provenance()}, args.json)
        console.print(f"written: {args.json}")
    return 0


def cmd_export(args) -> int:
    from analyses.interop import read_head_scores, write_head_scores

    scores = read_head_scores(args.source, kind=args.kind)
    path = write_head_scores(scores, args.out, top=args.top, kind=args.kind or "retrieval")
    n_layers, n_heads = scores.shape
    console.print(f"[green]written[/] {path}: {n_layers} x {n_heads} heads, |H| = {len(scores.head_set())}"
                  + ("" if scores.per_example else " (no per-example scores: one value per head)"))
    return 0


def cmd_show(args) -> int:
    """A model's best heads, with 95% bootstrap intervals when per-example scores exist."""
    from analyses.interop import read_head_scores

    scores = read_head_scores(args.source, kind=args.kind)
    best = [h for h in scores.ranking() if scores.scores[h] > 0][: args.top]
    table = Table(title=f"{args.source}: {len(scores.head_set())} heads with score > 0")
    for col in ("head", "score", "95% CI", "examples"):
        table.add_column(col, justify="right")
    intervals = {}
    if scores.per_example:
        import numpy as np

        from engine.stats import column_intervals

        values = np.array([scores.per_example[h] for h in best], dtype=float).T  # [examples, heads]
        intervals = dict(zip(best, column_intervals(values))) if values.size else {}
    for head in best:
        iv = intervals.get(head)
        table.add_row(f"{head[0]}-{head[1]}", _fmt(scores.scores[head]),
                      f"[{_fmt(iv.low)}, {_fmt(iv.high)}]" if iv else "–", str(iv.n) if iv else "–")
    console.print(table)
    return 0


def _run_heads(run_dir: Path, task: str | None) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """Tasks, scored variants and head kinds of a run directory (kinds as the overlap stage wrote them)."""
    tasks = [t for t in a.tasks(run_dir) if task is None or t == task]
    if not tasks:
        raise ExamplesError(f"{run_dir}: no evaluated task{' ' + task if task else ''}")
    variants = {t: [v for v in a.variants(run_dir, [t]) if layout.head_examples(run_dir, t, v).is_file()] for t in tasks}
    kinds = {t: a.task_grids(run_dir, t)[0] for t in tasks}
    for t in tasks:
        if not variants[t]:
            raise ExamplesError(f"{run_dir}/eval/{t}: no head_examples.parquet (re-run the evaluate stage)")
    return tasks, variants, kinds


def cmd_stability(args) -> int:
    from engine.report_stats import stability_md

    run_dir = Path(args.run_dir)
    tasks, variants, kinds = _run_heads(run_dir, args.task)
    run_stability(run_dir, tasks, variants, kinds, draws=args.draws, threshold=args.threshold)
    stability_md(run_dir, tasks, layout.report(run_dir) / "figures")
    for task in tasks:
        rows = a.read(layout.overlap(run_dir, task) / "stability.parquet") or []
        table = Table(title=f"{task}: Jaccard of H_X(n) with H_X(all), {args.draws} random subsets per n "
                            f"(figure: {run_dir / 'report' / 'figures' / f'stability_{task}.png'})")
        for col in ("variant", "n", "mean Jaccard", "2.5-97.5%", "mean |H_X(n)|", "|H_X(all)|"):
            table.add_column(col, justify="right")
        for v in variants[task]:
            rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["n_examples"])
            for r in rs:
                table.add_row(v, str(r["n_examples"]), _fmt(r["jaccard_mean"], 2),
                              f"{_fmt(r['jaccard_low'], 2)}-{_fmt(r['jaccard_high'], 2)}", _fmt(r["heads_mean"], 1),
                              str(r["heads_all"]))
            enough = enough_examples(rs)
            table.add_row(v, "", f"n >= {enough} for {ENOUGH}" if enough else f"never {ENOUGH}", "", "", "")
            table.add_section()
        console.print(table)
    return 0


def cmd_steps(args) -> int:
    from engine.report_stats import steps_md

    run_dir = Path(args.run_dir)
    tasks, variants, kinds = _run_heads(run_dir, args.task)
    run_steps(run_dir, tasks, variants, kinds)
    steps_md(run_dir, tasks, layout.report(run_dir) / "figures")
    for task in tasks:
        rows = a.read(layout.overlap(run_dir, task) / "steps.parquet") or []
        table = Table(title=f"{task}: heads active at each decoding step ({kinds[task]} events)")
        for col in ("variant", "step", "examples", "|H(t)|", "|H_X|", "coverage of H_X", "one example's step"):
            table.add_column(col, justify="right")
        for v in variants[task]:
            for r in sorted((r for r in rows if r["variant"] == v), key=lambda r: r["step"]):
                table.add_row(v, str(r["step"]), str(r["n_examples"]), str(r["n_heads"]), str(r["heads_all"]),
                              _fmt(r["coverage"], 2), _fmt(r["example_coverage"], 2))
            table.add_section()
        console.print(table)
    return 0


def cmd_probe(args) -> int:
    from analyses.probe import run_probe
    experiment = load_experiment(args.experiment, overrides=args.overrides)
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    path = run_probe(experiment, _ints(args.steps, "--steps"), variants=variants, tasks=tasks)
    rows = a.read(path) or []
    table = Table(title="probe: candidates ranked by recall of the real model's heads")
    for col in ("task", "steps", "candidate", "recall", "cosine", "probe F1", "full F1"):
        table.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: (r["task"], r["steps"], -r["recall"] if not math.isnan(r["recall"]) else 1)):
        table.add_row(r["task"], str(r["steps"]), r["variant"], _fmt(r["recall"], 2), _fmt(r["cosine"], 2),
                      _fmt(r["probe_f1"]), _fmt(r["full_f1"]))
    console.print(table)
    corr = Table(title="Spearman rho with the full fine-tunes' F1 across candidates")
    for col in ("task", "steps", "predictor", "rho", "95% CI", "p", "n", "note"):
        corr.add_column(col)
    for r in a.read(path.parent / "correlation.parquet") or []:
        corr.add_row(r["task"], str(r["steps"]), r["predictor"], _fmt(r["rho"], 2),
                     f"[{_fmt(r['ci_low'], 2)}, {_fmt(r['ci_high'], 2)}]", _fmt(r["p_value"], 3), str(r["n"]),
                     r["note"])
    console.print(corr)
    console.print(f"[bold green]probe:[/] {path}")
    return 0


def add_commands(sub) -> None:
    """Registers `heads` (compare, export, show, stability, steps) and `probe` on the CLI's subparsers."""
    heads = sub.add_parser("heads", help="head scores: compare with other tools, export, intervals, stability, "
                                         "per-step sets")
    verbs = heads.add_subparsers(dest="heads_command", required=True)
    kind_help = "retrieval | insight, for tables holding both (default: the only kind present)"

    c = verbs.add_parser("compare", help="recall both ways, cosine, Spearman and top-k overlap of two score files")
    c.add_argument("a", help="head-score file or evaluation directory (Retrieval_Head/HeadKV JSON, QRHead YAML or "
                             "JSON, Parquet, CSV)")
    c.add_argument("b", help="the other one")
    c.add_argument("--kind", help=kind_help)
    c.add_argument("--kind-b", help="kind of B when it differs from --kind")
    c.add_argument("--top", default="5,10,20,50", help="k of the top-k overlaps (default 5,10,20,50)")
    c.add_argument("--json", help="also write the comparison (with provenance) to this JSON file")
    c.set_defaults(func=cmd_compare)

    e = verbs.add_parser("export", help="write head scores in another tool's format (by the output's suffix)")
    e.add_argument("source", help="head-score file or evaluation directory")
    e.add_argument("out", help=".json (Retrieval_Head/HeadKV), .yaml (QRHead attn_head_set), .parquet or .csv")
    e.add_argument("--kind", help=kind_help)
    e.add_argument("--top", type=int, help="QRHead list: only the best N heads")
    e.set_defaults(func=cmd_export)

    s = verbs.add_parser("show", help="a model's best heads with 95%% bootstrap intervals over examples")
    s.add_argument("source", help="head-score file or evaluation directory")
    s.add_argument("--kind", help=kind_help)
    s.add_argument("--top", type=int, default=20)
    s.set_defaults(func=cmd_show)

    st = verbs.add_parser("stability", help="Jaccard of the head set at n scored examples against all (+ figure)")
    st.add_argument("run_dir")
    st.add_argument("--task")
    st.add_argument("--draws", type=int, default=200, help="random subsets per n (default 200)")
    st.add_argument("--threshold", type=float, default=0.0, help="H = heads with score above this (paper: 0)")
    st.set_defaults(func=cmd_stability)

    sp = verbs.add_parser("steps", help="per-step head sets and how much of H_X one step covers (+ figure)")
    sp.add_argument("run_dir")
    sp.add_argument("--task")
    sp.set_defaults(func=cmd_steps)

    p = sub.add_parser("probe", help="rank candidate synthetic datasets by short tunes' head recall")
    p.add_argument("experiment", help="experiment YAML (its run directory holds or gets the real-data model)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--steps", default="4,16", help="step budgets of the short tunes (default 4,16)")
    p.add_argument("--variants", help="candidate variants (default: every fine-tuned variant but real)")
    p.add_argument("--tasks", help="tasks (default: all)")
    p.set_defaults(func=cmd_probe)
