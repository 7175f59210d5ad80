"""Report sections on how sure the results are: bootstrap intervals, head-set stability,
per-step head sets, the data-quality probe and the provenance of the run.

Each section reads the Parquet written by its analysis (analyses/intervals.py, stability.py,
steps.py, probe.py) and says "not run" when it is absent, like the paper's sections in
`engine.report`.

Example:
    >>> lines = intervals_md(Path("runs/demo"), ["summhay"])
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from engine import artifacts as a
from engine import figures
from engine import layout

NOT_RUN = "_not run_"
TOP_HEADS = 10
ENOUGH = 0.9  # as analyses.stability.ENOUGH


def md_table(header: list, rows: list[list]) -> list[str]:
    def line(cells: list) -> str:
        # A bare "|" inside a cell (as in |H_X|) would split it into two columns.
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *[line(row) for row in rows], ""]


def ci(estimate, low, high, digits: int = 3) -> str:
    """"0.250 [0.125, 0.500]", "–" when undefined."""
    if estimate is None or (isinstance(estimate, float) and math.isnan(estimate)):
        return "–"
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return a.fmt(estimate, digits)
    return f"{a.fmt(estimate, digits)} [{a.fmt(low, digits)}, {a.fmt(high, digits)}]"


def img(path: Path, fig_dir: Path, alt: str) -> str:
    return f"![{alt}](figures/{path.relative_to(fig_dir).as_posix()})"


def intervals_md(run: Path, tasks: list[str]) -> list[str]:
    """Per task: F1 and recall vs real with 95% intervals, and the real model's best heads."""
    lines = []
    for task in tasks:
        metrics = a.read(layout.overlap(run, task) / "intervals.parquet")
        if not metrics:
            continue
        by = {(r["variant"], r["metric"]): r for r in metrics}
        counts = {c["variant"]: c for c in a.read(layout.overlap(run, task) / "counts.parquet") or []}
        labels = a.ordered_names({r["variant"] for r in metrics})
        rows = []
        for v in labels:
            cells = [by.get((v, m)) for m in ("f1", "recall_vs_real")]
            rows.append([v, *[ci(c["estimate"], c["ci_low"], c["ci_high"], 3 if m == "f1" else 2) if c else "–"
                              for c, m in zip(cells, ("f1", "recall_vs_real"))],
                         counts.get(v, {}).get("n_heads", "–")])
        lines += [f"### {task}", "", "F1: bootstrap over the real task's evaluation examples. Recall |H_X ∩ H_real| / "
                  "|H_real|: Wilson interval of the proportion (a head set is the support of a union over "
                  "examples, which the bootstrap does not estimate; see the stability section for how H "
                  "depends on the examples).", ""]
        lines += md_table(["variant", "F1 [95% CI]", "recall vs real [95% Wilson CI]", "|H_X|"], rows)
        heads = a.read(layout.overlap(run, task) / "head_intervals.parquet") or []
        reference = next((v for v in a.ordered_names({h["variant"] for h in heads}) if a.base(v) == "real"), None)
        if reference:
            best = sorted((h for h in heads if h["variant"] == reference and h["score"] > 0),
                          key=lambda h: (-h["score"], h["layer"], h["head"]))[:TOP_HEADS]
            lines += [f"The {len(best)} best heads of {reference} ({best[0]['kind'] if best else ''} score over "
                      f"{best[0]['n'] if best else 0} examples; every head of every model in "
                      f"`overlap/{task}/head_intervals.parquet`):", ""]
            lines += md_table(["head", "score [95% CI]"],
                              [[f"{h['layer']}-{h['head']}", ci(h["score"], h["ci_low"], h["ci_high"])] for h in best])
    return lines or [NOT_RUN, ""]


def stability_md(run: Path, tasks: list[str], fig_dir: Path) -> list[str]:
    """Per task: Jaccard of H_X(n) against H_X(all) by subset size, a figure and the n that suffices."""
    lines = []
    for task in tasks:
        rows = a.read(layout.overlap(run, task) / "stability.parquet")
        if not rows:
            continue
        labels = a.ordered_names({r["variant"] for r in rows})
        curves, table = {}, []
        for v in labels:
            rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["n_examples"])
            curves[v] = {"x": [r["n_examples"] for r in rs], "y": [r["jaccard_mean"] for r in rs],
                         "low": [r["jaccard_low"] for r in rs], "high": [r["jaccard_high"] for r in rs]}
            enough = next((r["n_examples"] for r in rs if r["jaccard_mean"] >= ENOUGH), None)
            by_n = ", ".join(f"{r['n_examples']}: {a.fmt(r['jaccard_mean'], 2)}" for r in rs)
            table.append([v, rs[-1]["n_total"], rs[-1]["heads_all"], enough if enough is not None else "–", by_n])
        threshold = rows[0]["threshold"]
        path = figures.line_bands(curves, "scored examples n (random subsets)",
                                  "Jaccard of H_X(n) with H_X(all)", f"{task}: head-set stability",
                                  fig_dir / f"stability_{task}.png", log_x=True, reference=ENOUGH)
        lines += [f"### {task}", "",
                  f"H_X(n): heads with score > {threshold:g} over n random examples of the model's own validation "
                  f"data ({rows[0]['draws']} draws per n; band: 2.5-97.5 percentiles).", "",
                  img(path, fig_dir, f"stability {task}"), ""]
        lines += md_table(["variant", "N", "|H_X(all)|", f"n for mean Jaccard >= {ENOUGH}", "mean Jaccard by n"],
                          table)
    return lines or [NOT_RUN, ""]


def steps_md(run: Path, tasks: list[str], fig_dir: Path) -> list[str]:
    """Per task: how much of H_X the heads of a single decoding step cover."""
    lines = []
    for task in tasks:
        rows = a.read(layout.overlap(run, task) / "steps.parquet")
        if not rows:
            continue
        labels = a.ordered_names({r["variant"] for r in rows})
        curves, table = {}, []
        for v in labels:
            rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["step"])
            curves[v] = {"x": [r["step"] for r in rs], "y": [r["coverage"] for r in rs]}
            best = max(rs, key=lambda r: (a.as_float(r["coverage"]) if not math.isnan(a.as_float(r["coverage"]))
                                          else -1.0, -r["step"]))
            weighted = sum(a.as_float(r["example_coverage"]) * r["n_examples"] for r in rs
                           if not math.isnan(a.as_float(r["example_coverage"])))
            per_example = weighted / sum(r["n_examples"] for r in rs) if rs[0]["heads_all"] else math.nan
            table.append([v, rs[0]["heads_all"], len(rs), a.fmt(rs[0]["coverage"], 2),
                          f"{best['step']}: {a.fmt(best['coverage'], 2)}", a.fmt(per_example, 2)])
        path = figures.line_bands(curves, "decoding step t", "|H(t) ∩ H_X| / |H_X|",
                                  f"{task}: share of H_X active at each step", fig_dir / f"steps_{task}.png")
        lines += [f"### {task}", "",
                  "H(t): heads whose event (Eq. 1 retrieval, Eq. 2 needle attention) happens at step t in some "
                  "example; one example's step covers less (last column: mean over examples and steps).", "",
                  img(path, fig_dir, f"per-step head sets {task}"), ""]
        lines += md_table(["variant", "|H_X|", "steps", "coverage at step 0", "best step: coverage",
                           "one example's step: mean coverage"], table)
    return lines or [NOT_RUN, ""]


def probe_md(run: Path) -> list[str]:
    """The probe's ranking of candidate datasets and its rank correlation with full fine-tunes' F1."""
    rows = a.read(layout.probe(run) / "probe.parquet")
    corr = a.read(layout.probe(run) / "correlation.parquet")
    if not rows:
        return [NOT_RUN, ""]
    lines = ["Short tunes of each candidate, heads scored on the real task's validation data, compared with "
             "the fully fine-tuned real-data model's heads on the same data (`needlework probe`).", ""]
    body = [[r["task"], r["steps"], r["variant"], a.fmt(r["recall"], 2), a.fmt(r["cosine"], 2), a.fmt(r["probe_f1"]),
             a.fmt(r["full_f1"])] for r in sorted(rows, key=lambda r: (r["task"], r["steps"], -a.as_float(r["recall"])))]
    lines += md_table(["task", "probe steps", "candidate", "recall vs real", "cosine vs real", "probe F1",
                       "full fine-tune F1"], body)
    if corr:
        lines += ["Spearman's rho between the probe's predictor and the full fine-tunes' F1 across candidates "
                  "(permutation p; 95% bootstrap interval over candidates):", ""]
        lines += md_table(["task", "probe steps", "predictor", "rho [95% CI]", "p", "n"],
                          [[c["task"], c["steps"], c["predictor"], ci(c["rho"], c["ci_low"], c["ci_high"], 2),
                            a.fmt(c["p_value"], 3), c["n"]] for c in corr])
    return lines


def provenance_md(run: Path, current: dict) -> list[str]:
    """What produced the run (its provenance.json) and this report, and every commit the
    evaluation results were computed at."""
    lines = []
    recorded = run / "provenance.json"
    sources = [("run (last invocation)", json.loads(recorded.read_text()))] if recorded.is_file() else []
    sources.append(("this report", current))
    rows = []
    for label, p in sources:
        git = p.get("git", {})
        commit = (git.get("commit") or "–")[:12] + (" (dirty)" if git.get("dirty") else "")
        packages = ", ".join(f"{k} {v}" for k, v in p.get("packages", {}).items() if v and k != "needlework")
        hw = p.get("hardware", {})
        gpus = ", ".join(hw.get("gpus") or []) or "no GPU"
        rows.append([label, p.get("created", "–"), commit, p.get("torch_threads"), json.dumps(p.get("seeds", {})),
                     f"{hw.get('cpu', '?')} x {hw.get('cpu_count', '?')}, {gpus}", f"Python {p.get('python')}; {packages}"])
    lines += md_table(["record", "created", "git commit", "torch threads", "seeds", "hardware", "packages"], rows)
    experiment = sources[0][1].get("experiment") if recorded.is_file() else None
    if experiment:
        lines += [f"The run: experiment `{experiment['name']}` from `{experiment['file']}`, model "
                  f"`{experiment['model']}` (`{experiment['model_path']}`).", ""]
    commits, placements = {}, {}
    for path in sorted(run.glob("eval/*/*/*/summary.json")):
        summary = json.loads(path.read_text())
        git = summary.get("provenance", {}).get("git", {})
        key = (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
        commits[key] = commits.get(key, 0) + 1
        for where in summary.get("placement", []):
            held = f"{where['device']} {where['dtype']} {where['attn_implementation']}"
            placements[held] = placements.get(held, 0) + 1
    if commits:
        said = ", ".join(f"{c} ({n} job(s))" for c, n in sorted(commits.items()))
        lines += [f"Evaluation results were computed at: {said}.", ""]
    if placements:
        said = ", ".join(f"{p} ({n} job(s))" for p, n in sorted(placements.items()))
        lines += [f"Evaluation models were held as (device, dtype, attention): {said}.", ""]
    return lines
