"""The run report: the paper's tables, figures and a verdict on each of its four findings.

Source: Zhao, Yin, Durrett (ICML 2025): Table 1 (F1 grid), Tables 5-10 (head recall with
counts), Table 4 (Spearman of recall with F1), Table 2 (cosine across tasks), Tables 3 and 11
(patching), Figure 3 (knockout), Figures 6-9 (score heatmaps), Figure 4 (similarity vs F1).
Reads only run-directory artifacts (their layout: engine/layout.py); every section says "not
run" when its inputs are absent. Findings are computed from the artifacts with fixed
criteria stated in the report.

Example:
    >>> path = write_report("runs/demo")          # runs/demo/report/report.md
    >>> print_summary("runs/demo", rich.console.Console())
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.table import Table

from engine import artifacts as a
from engine import figures
from engine import layout
from engine.artifacts import ReportError  # noqa: F401  (re-exported)
from engine.findings import COMPETENCE_F1, compute_findings, knockout_tests, task_competence
from engine.provenance import provenance
from engine.report_stats import img as _img
from engine.report_stats import intervals_md, md_table as _md_table, probe_md, provenance_md, stability_md, steps_md
from engine.stats import RESAMPLES, SEED
from engine.store import atomic_dir, write_text

NOT_RUN = "_not run_"
PROVENANCE = "provenance"  # the entry of findings.json that is not a finding


def write_report(run_dir: str | Path, config_summary: Mapping | None = None) -> Path:
    """Writes `report/report.md`, `report/findings.json` and `report/figures/*.png`.

    Args:
        run_dir: the run directory.
        config_summary: key/value pairs shown at the end of the report.

    Returns:
        The path of `report.md`.
    """
    run = Path(run_dir)
    with atomic_dir(layout.report(run)) as out:  # report.md, findings.json and figures, all or none
        _write_report(run, out, config_summary)
    return layout.report(run) / "report.md"


def _write_report(run: Path, out: Path, config_summary: Mapping | None) -> None:
    fig_dir = out / "figures"
    tasks = a.tasks(run)
    findings = compute_findings(run)
    lines = [f"# needlework report: {run.name}", ""]
    lines += _base_model_md(run)
    lines += ["## Table 1: F1 on the real task", "", *_f1_grid_md(run, tasks)]
    lines += ["## Head recall and counts (Tables 5-10)", ""]
    lines += [line for task in tasks for line in _recall_md(run, task)] or [NOT_RUN, ""]
    lines += ["## Spearman correlation with F1 (Table 4)", "", *_spearman_md(run, tasks)]
    lines += ["## Cosine similarity across tasks (Table 2)", "", *_cross_task_md(run)]
    lines += ["## Patching (Tables 3, 11)", "", *_patching_md(run, tasks)]
    lines += ["## Knockout (Figure 3)", "", *_knockout_md(run, tasks, fig_dir)]
    lines += ["## Score heatmaps (Figures 6-9)", "", *_heatmaps_md(run, tasks, fig_dir)]
    lines += ["## Similarity vs F1 (Figure 4)", "", *_scatter_md(run, tasks, fig_dir)]
    lines += ["## 95% bootstrap intervals", "", *intervals_md(run, tasks)]
    lines += ["## Head-set stability", "", *stability_md(run, tasks, fig_dir)]
    lines += ["## Per-step head sets", "", *steps_md(run, tasks, fig_dir)]
    probe = probe_md(run)
    if probe != [NOT_RUN, ""]:  # `needlework probe` is run on its own, not a stage of every run
        lines += ["## Probe: ranking candidate datasets", "", *probe]
    lines += ["## Findings", "", *_competence_md(task_competence(run)), *_findings_md(findings)]
    if config_summary:
        lines += ["## Configuration", "", *_md_table(["key", "value"], _flatten(config_summary))]
    current = provenance(seeds={"bootstrap": SEED, "bootstrap_resamples": RESAMPLES})
    lines += ["## Provenance", "", *provenance_md(run, current)]
    write_text(json.dumps(_json_safe({**findings, PROVENANCE: current}), indent=2), out / "findings.json")
    write_text("\n".join(lines) + "\n", out / "report.md")


def print_summary(run_dir: str | Path, console: Console) -> None:
    """Prints Table 1 and the findings as rich tables."""
    run = Path(run_dir)
    tasks = a.tasks(run)
    grid = Table(title="Table 1: F1 on the real task")
    grid.add_column("variant")
    for task in tasks:
        grid.add_column(task, justify="right")
    for variant in a.variants(run, tasks):
        grid.add_row(variant, *[a.fmt(a.f1(run, t, variant)) for t in tasks])
    console.print(grid)
    path = layout.report(run) / "findings.json"
    findings = json.loads(path.read_text()) if path.is_file() else compute_findings(run)
    warning = competence_warning(task_competence(run))
    if warning:
        console.print(f"[bold red]{warning}[/]")
    table = Table(title="Findings")
    for column in ("finding", "status", "evidence"):
        table.add_column(column)
    for key, f in findings.items():
        if key != PROVENANCE:
            table.add_row(f["claim"], f["status"], "\n".join(d["summary"] for d in f["details"]) or "-")
    console.print(table)


# ---- findings ---------------------------------------------------------------------------


# ---- sections ---------------------------------------------------------------------------


def _f1_grid_md(run: Path, tasks: list[str]) -> list[str]:
    variants = a.variants(run, tasks)
    if not variants:
        return [NOT_RUN, ""]
    return _md_table(["variant", *tasks], [[v, *[a.fmt(a.f1(run, t, v)) for t in tasks]] for v in variants])


def _recall_md(run: Path, task: str) -> list[str]:
    lines = [f"### {task}", ""]
    counts = a.read(layout.overlap(run, task) / "counts.parquet")
    if counts is None:
        return lines + [NOT_RUN, ""]
    counts = a.ordered(counts, "variant")
    kind = counts[0]["kind"] if counts else "?"
    header = ["variant", "|H_X|", "recall vs real", "cosine vs real", "F1"]
    rows = [
        [c["variant"], c["n_heads"], a.fmt(c["recall_vs_real"], 2), a.fmt(c["cosine_vs_real"], 2), a.fmt(c["f1"])]
        for c in counts
    ]
    lines += [f"H_X: heads with {kind} score > 0 on the model's own validation data.", "", *_md_table(header, rows)]
    recall = a.read(layout.overlap(run, task) / "recall.parquet") or []
    cells = {(r["row"], r["column"]): r["recall"] for r in recall}
    labels = [c["variant"] for c in counts]
    lines += ["Pairwise recall, cell(row X, column Y) = |H_X ∩ H_Y| / |H_Y|:", ""]
    matrix = [[x, *[a.fmt(cells.get((x, y), math.nan), 2) for y in labels]] for x in labels]
    lines += _md_table(["X \\ Y", *labels], matrix)
    return lines


def _spearman_md(run: Path, tasks: list[str]) -> list[str]:
    rows = []
    for task in tasks:
        for r in a.read(layout.overlap(run, task) / "spearman.parquet") or []:
            rows.append([task, r["metric"], a.fmt(r["rho"], 2), a.fmt(r["p_value"], 3), r["n"], r["reason"] or "-"])
    return _md_table(["task", "similarity", "rho", "p", "n", "note"], rows) if rows else [NOT_RUN, ""]


def _cross_task_md(run: Path) -> list[str]:
    rows = a.read(layout.overlap(run) / "cross_task_cosine.parquet")
    if not rows:
        return [NOT_RUN, ""]
    rows = a.ordered(rows, "variant")
    body = [[r["task_a"], r["task_b"], r["variant"], a.fmt(r["cosine"], 2)] for r in rows]
    return _md_table(["task A", "task B", "variant", "cosine"], body)


def _patching_md(run: Path, tasks: list[str]) -> list[str]:
    rows = []
    for task in tasks:
        for v in a.ordered_names(a.subdirs(layout.patching(run, task))):
            s = a.patching_summary(a.read(layout.patching(run, task, v) / "patching.parquet") or [])
            n_heads = s.get("inter", {}).get("n_heads", math.nan)
            f1s = [a.fmt(s.get(name, {}).get("f1", math.nan)) for name in a.PATCH_SETS]
            gains = [a.fmt(s.get(name, {}).get("gain", math.nan)) for name in a.PATCH_SETS[1:]]
            rows.append([task, v, "–" if math.isnan(n_heads) else int(n_heads), *f1s, *gains])
    header = ["task", "variant", "n", "F1 none", "F1 inter", "F1 compl", "F1 random"]
    header += ["gain inter", "gain compl", "gain random"]
    return _md_table(header, rows) if rows else [NOT_RUN, ""]


def _knockout_md(run: Path, tasks: list[str], fig_dir: Path) -> list[str]:
    lines = []
    for task in tasks:
        for v in a.ordered_names(a.subdirs(layout.knockout(run, task))):
            rows = a.read(layout.knockout(run, task, v) / "knockout.parquet") or []
            summary = a.knockout_summary(rows)
            if not summary:
                continue
            unmasked = a.unmasked_f1(run, task, v, rows)
            lines += [f"### {task} / {v} (unmasked F1 {a.fmt(unmasked)})", ""]
            tests = {t["k"]: t for t in knockout_tests(rows)}
            body = [
                [s["k"], a.fmt(s["top"]), f"{a.fmt(s['random_mean'])} ± {a.fmt(s['random_std'])}", s["n_seeds"],
                 tests[s["k"]]["extra_drop"].text() if s["k"] in tests else "–",
                 a.fmt(tests.get(s["k"], {}).get("p_value", math.nan), 4),
                 a.fmt(tests.get(s["k"], {}).get("p_adjusted", math.nan), 4)]
                for s in summary
            ]
            header = ["k", "F1 top-k masked", "F1 random k masked (mean ± std)", "seeds",
                      "extra drop of top-k [95% CI]", "p (paired)", "p (BH)"]
            lines += _md_table(header, body)
            curve = {key: [s[key] for s in summary] for key in ("k", "top", "random_mean", "random_std")}
            path = figures.knockout_curve(
                curve["k"],
                curve["top"],
                curve["random_mean"],
                curve["random_std"],
                unmasked,
                f"{task} / {v}: F1 with heads masked",
                fig_dir / f"knockout_{task}_{v}.png",
            )
            lines += [_img(path, fig_dir, f"knockout {task} {v}"), ""]
    return lines or [NOT_RUN, ""]


def _heatmaps_md(run: Path, tasks: list[str], fig_dir: Path) -> list[str]:
    lines = []
    for task in tasks:
        kind, grids = a.task_grids(run, task)
        if grids:
            title = f"{task}: {kind} score by layer and head (blank: 0, not in H_X)"
            path = figures.score_heatmaps(grids, title, fig_dir / f"heatmap_{task}.png")
            lines += [_img(path, fig_dir, f"{kind} scores {task}"), ""]
    return lines or [NOT_RUN, ""]


def _scatter_md(run: Path, tasks: list[str], fig_dir: Path) -> list[str]:
    lines = []
    for task in tasks:
        counts = {c["variant"]: c for c in a.read(layout.overlap(run, task) / "counts.parquet") or []}
        panels = []
        for r in a.read(layout.overlap(run, task) / "spearman.parquet") or []:
            pts = [counts[v] for v in r["variants"] if v in counts]
            pts = [c for c in pts if not (math.isnan(a.as_float(c[r["metric"]])) or math.isnan(a.as_float(c["f1"])))]
            xlabel = {"recall_vs_real": "recall of the real model's heads"}.get(
                r["metric"], "cosine with the real model's scores"
            )
            panels.append(
                {
                    "xlabel": xlabel,
                    "labels": [c["variant"] for c in pts],
                    "x": [c[r["metric"]] for c in pts],
                    "y": [c["f1"] for c in pts],
                    "rho": a.as_float(r["rho"]),
                    "p_value": a.as_float(r["p_value"]),
                    "n": r["n"],
                }
            )
        if panels:
            title = f"{task}: similarity to the real model vs F1"
            path = figures.similarity_scatter(panels, title, fig_dir / f"similarity_{task}.png")
            lines += [_img(path, fig_dir, f"similarity vs F1 {task}"), ""]
    return lines or [NOT_RUN, ""]


def _base_model_md(run: Path) -> list[str]:
    """The bundled base model's own retrieval check, when the run used the miniature."""
    path = run / "base_model.json"
    if not path.is_file():
        return []
    meta = json.loads(path.read_text())
    rows = meta.get("retrieval", [])
    lines = ["## Base model", "",
             f"Pretrained by the engine at {meta['spec']['context']} tokens in "
             f"{meta.get('seconds', {}).get('train', float('nan')):.0f} s. Copy accuracy of needles at random depths "
             "(content-based retrieval; the base must pass this before its heads mean anything):", ""]
    by_length: dict[int, list[dict]] = {}
    for r in rows:
        if r["depth"] != "all":  # the per-length total is recomputed below from the depth bins
            by_length.setdefault(int(r["length"]), []).append(r)
    table = [[length, a.fmt(sum(r["accuracy"] * r["n"] for r in rs) / max(1, sum(r["n"] for r in rs)), 2),
              ", ".join(a.fmt(r["accuracy"], 2) for r in sorted(rs, key=lambda r: r["depth"]))]
             for length, rs in sorted(by_length.items())]
    lines += _md_table(["tokens", "accuracy", "by depth (shallow -> deep)"], table)
    check = meta.get("check")
    if check and not check["passed"]:
        lines += [f"**The base model FAILED its content-retrieval check** (accuracy {check['accuracy']:.2f} < "
                  f"{check['min_accuracy']} at {check['length']} tokens): it does not retrieve by content at its "
                  "own length, so the head analyses and findings below do not test the paper's claims.", ""]
    return lines


def competence_warning(competence: dict) -> str | None:
    """One sentence naming the tasks whose real-data model does not do the task, or None."""
    weak = {t: c for t, c in competence.items() if not c["competent"]}
    if not weak:
        return None
    said = ", ".join(f"{t} (F1 {a.fmt(c['real_f1'])}, |H_real| {c['real_heads'] if c['real_heads'] is not None else '-'})"
                     for t, c in weak.items())
    return (f"The real-data model does not do {', '.join(weak)}: {said}, against F1 >= {COMPETENCE_F1} and at "
            "least one head. The findings on these tasks compare noise and test nothing.")


def _competence_md(competence: dict) -> list[str]:
    warning = competence_warning(competence)
    return [f"**{warning}**", ""] if warning else []


def _findings_md(findings: dict) -> list[str]:
    lines = []
    for i, f in enumerate(findings.values(), 1):
        lines += [f"{i}. **{f['claim']}**: {f['status']}.", f"   Criterion: {f['criterion']}."]
        lines += [f"   - {d['summary']}: {d['status']}" for d in f["details"]]
    return lines + [""]


# ---- artifacts --------------------------------------------------------------------------


def _flatten(data: Mapping, prefix: str = "") -> list[list[str]]:
    """Nested config as [dotted key, value] rows."""
    rows = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            rows.append([f"{prefix}{key}", shown.replace("\n", " ")])
    return rows


def _json_safe(x):
    # Strict JSON has no NaN; a missing number is null.
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x
