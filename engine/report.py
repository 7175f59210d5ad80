"""The run report: the paper's tables, figures and a verdict on each of its four findings.

Source: Zhao, Yin, Durrett (ICML 2025): Table 1 (F1 grid), Tables 5-10 (head recall with
counts), Table 4 (Spearman of recall with F1), Table 2 (cosine across tasks), Tables 3 and 11
(patching), Figure 3 (knockout), Figures 6-9 (score heatmaps), Figure 4 (similarity vs F1).
Reads only run-directory artifacts (layout in the design notes); every section says "not
run" when its inputs are absent. Findings are computed from the artifacts with fixed
criteria stated in the report.

Example:
    >>> path = write_report("runs/demo")          # runs/demo/report/report.md
    >>> print_summary("runs/demo", rich.console.Console())
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from engine import figures
from engine.store import write_text

TASK_ORDER = ("mdqa", "musique", "summhay")
VARIANT_ORDER = ("real", "real_limited", "hh", "hl", "lh", "ll", "symbolic", "base")
SYNTHETIC = ("hh", "hl", "lh", "ll", "symbolic")
PATCH_SETS = ("none", "inter", "compl", "random")
# Finding 2: masking the top-k heads must cost at least this multiple of the random heads'
# drop and at least this much F1 in absolute terms to count as "far more".
KNOCKOUT_RATIO, KNOCKOUT_MIN_DROP = 2.0, 0.05
# Finding 3: a positive rank correlation with a one-in-ten chance level.
SPEARMAN_P = 0.1
NOT_RUN = "_not run_"
REQUIRED_COLUMNS = {
    "predictions.parquet": ("f1",),
    "head_scores.parquet": ("layer", "head", "kind", "score"),
    "knockout.parquet": ("k", "selection", "f1"),
    "patching.parquet": ("set", "n_heads", "f1", "gain"),
    "counts.parquet": ("variant", "kind", "n_heads", "recall_vs_real", "cosine_vs_real", "f1"),
    "recall.parquet": ("row", "column", "recall"),
    "spearman.parquet": ("metric", "rho", "p_value", "n", "reason", "variants"),
    "cross_task_cosine.parquet": ("task_a", "task_b", "variant", "cosine"),
}


class ReportError(ValueError):
    """An artifact the report cannot read."""


def write_report(run_dir: str | Path, config_summary: Mapping | None = None) -> Path:
    """Writes `report/report.md`, `report/findings.json` and `report/figures/*.png`.

    Args:
        run_dir: the run directory.
        config_summary: key/value pairs shown at the top of the report.

    Returns:
        The path of `report.md`.
    """
    run = Path(run_dir)
    fig_dir = run / "report" / "figures"
    tasks = _tasks(run)
    findings = compute_findings(run)
    lines = [f"# needlework report: {run.name}", ""]
    if config_summary:
        lines += ["## Configuration", "", *_md_table(["key", "value"], _flatten(config_summary))]
    lines += ["## Table 1: F1 on the real task", "", *_f1_grid_md(run, tasks)]
    lines += ["## Head recall and counts (Tables 5-10)", ""]
    lines += [line for task in tasks for line in _recall_md(run, task)] or [NOT_RUN, ""]
    lines += ["## Spearman correlation with F1 (Table 4)", "", *_spearman_md(run, tasks)]
    lines += ["## Cosine similarity across tasks (Table 2)", "", *_cross_task_md(run)]
    lines += ["## Patching (Tables 3, 11)", "", *_patching_md(run, tasks)]
    lines += ["## Knockout (Figure 3)", "", *_knockout_md(run, tasks, fig_dir)]
    lines += ["## Score heatmaps (Figures 6-9)", "", *_heatmaps_md(run, tasks, fig_dir)]
    lines += ["## Similarity vs F1 (Figure 4)", "", *_scatter_md(run, tasks, fig_dir)]
    lines += ["## Findings", "", *_findings_md(findings)]
    write_text(json.dumps(_json_safe(findings), indent=2), run / "report" / "findings.json")
    return write_text("\n".join(lines) + "\n", run / "report" / "report.md")


def print_summary(run_dir: str | Path, console: Console) -> None:
    """Prints Table 1 and the findings as rich tables."""
    run = Path(run_dir)
    tasks = _tasks(run)
    grid = Table(title="Table 1: F1 on the real task")
    grid.add_column("variant")
    for task in tasks:
        grid.add_column(task, justify="right")
    for variant in _variants(run, tasks):
        grid.add_row(variant, *[_fmt(_f1(run, t, variant)) for t in tasks])
    console.print(grid)
    path = run / "report" / "findings.json"
    findings = json.loads(path.read_text()) if path.is_file() else compute_findings(run)
    table = Table(title="Findings")
    for column in ("finding", "status", "evidence"):
        table.add_column(column)
    for f in findings.values():
        table.add_row(f["claim"], f["status"], "\n".join(d["summary"] for d in f["details"]) or "-")
    console.print(table)


def compute_findings(run_dir: str | Path) -> dict:
    """The paper's four findings, each with a status and the numbers behind it.

    Status is "reproduced", "not reproduced", "partial" (some tasks or models only),
    "inconclusive" (inputs present but too few to decide) or "not run".
    """
    run = Path(run_dir)
    tasks = _tasks(run)
    return {
        "real_beats_synthetic": _finding_real_best(run, tasks),
        "knockout_top_vs_random": _finding_knockout(run, tasks),
        "recall_correlates_with_f1": _finding_spearman(run, tasks),
        "patching_helps_weakest": _finding_patching(run, tasks),
    }


# ---- findings ---------------------------------------------------------------------------


def _finding_real_best(run: Path, tasks: list[str]) -> dict:
    details = []
    for task in tasks:
        variants = _variants(run, [task])
        # With several seeds there is no plain "real" label; their mean stands for real data.
        reals = [v for v in variants if v == "real"] or [v for v in variants if _base(v) == "real"]
        real = float(np.mean([_f1(run, task, v) for v in reals])) if reals else math.nan
        synth = {v: _f1(run, task, v) for v in variants if _base(v) in SYNTHETIC}
        synth = {v: f for v, f in synth.items() if not math.isnan(f)}
        if math.isnan(real) or not synth:
            continue
        best = max(synth, key=synth.get)
        ok = real > synth[best]
        details.append(
            {
                "task": task,
                "real_f1": real,
                "best_synthetic": best,
                "best_synthetic_f1": synth[best],
                "status": _status(ok),
                "summary": f"{task}: real {real:.3f} vs best synthetic {best} {synth[best]:.3f}",
            }
        )
    return _finding("Real data beats the best synthetic variant", "F1(real) > max F1(synthetic), per task", details)


def _finding_knockout(run: Path, tasks: list[str]) -> dict:
    details = []
    for task in tasks:
        for variant in _subdirs(run / "knockout" / task):
            rows = _read(run / "knockout" / task / variant / "knockout.parquet")
            # Random heads are drawn outside the top k, so the largest k may have no random rows.
            paired = [s for s in _knockout_summary(rows or []) if not math.isnan(s["random_mean"])]
            if not paired:
                continue
            last = paired[-1]
            unmasked = _unmasked_f1(run, task, variant, rows)
            drop_top = unmasked - last["top"]
            drop_random = unmasked - last["random_mean"]
            ok = drop_top >= KNOCKOUT_RATIO * drop_random and drop_top >= KNOCKOUT_MIN_DROP
            details.append(
                {
                    "task": task,
                    "variant": variant,
                    "k": last["k"],
                    "unmasked_f1": unmasked,
                    "top_f1": last["top"],
                    "random_f1_mean": last["random_mean"],
                    "drop_top": drop_top,
                    "drop_random": drop_random,
                    "status": "inconclusive" if math.isnan(drop_top - drop_random) else _status(ok),
                    "summary": f"{task}/{variant} k={last['k']}: top-k drop {drop_top:.3f} "
                    f"vs random drop {drop_random:.3f} (unmasked {unmasked:.3f})",
                }
            )
    criterion = (
        f"at the largest k: drop(top-k) >= {KNOCKOUT_RATIO:g} x mean drop(random k) "
        f"and drop(top-k) >= {KNOCKOUT_MIN_DROP:g} F1"
    )
    return _finding("Masking top-k heads hurts far more than k random heads", criterion, details)


def _finding_spearman(run: Path, tasks: list[str]) -> dict:
    details = []
    for task in tasks:
        rows = {r["metric"]: r for r in _read(run / "overlap" / task / "spearman.parquet") or []}
        r = rows.get("recall_vs_real")
        if r is None:
            continue
        rho, p = _float(r["rho"]), _float(r["p_value"])
        decided = not (math.isnan(rho) or math.isnan(p))
        status = _status(rho > 0 and p < SPEARMAN_P) if decided else "inconclusive"
        why = f" ({r['reason']})" if r["reason"] else ""
        details.append(
            {
                "task": task,
                "rho": rho,
                "p_value": p,
                "n": int(r["n"]),
                "status": status,
                "summary": f"{task}: rho {_fmt(rho, 2)}, p {_fmt(p, 3)}, n {r['n']}{why}",
            }
        )
    criterion = f"Spearman rho(recall vs real, F1) > 0 and p < {SPEARMAN_P:g} across variants, per task"
    return _finding("Recall of the real model's heads correlates with F1", criterion, details)


def _finding_patching(run: Path, tasks: list[str]) -> dict:
    details = []
    for task in tasks:
        by_variant = {}
        for v in _subdirs(run / "patching" / task):
            s = _patching_summary(_read(run / "patching" / task / v / "patching.parquet") or [])
            if _base(v) in SYNTHETIC and "none" in s:
                by_variant[v] = s
        ranked = sorted(by_variant, key=lambda v: by_variant[v]["none"]["f1"])
        for v in ranked[: math.ceil(len(ranked) / 2)]:
            s = by_variant[v]
            inter, rand = s.get("inter", {}).get("gain", math.nan), s.get("random", {}).get("gain", math.nan)
            decided = not (math.isnan(inter) or math.isnan(rand))
            details.append(
                {
                    "task": task,
                    "variant": v,
                    "f1_none": s["none"]["f1"],
                    "gain_inter": inter,
                    "gain_random": rand,
                    "status": _status(inter > 0 and inter > rand) if decided else "inconclusive",
                    "summary": f"{task}/{v} (F1 {s['none']['f1']:.3f}): "
                    f"gain inter {_fmt(inter)} vs random {_fmt(rand)}",
                }
            )
    criterion = (
        "for the lower-F1 half of the patched synthetic variants: "
        "gain(inter) > 0 and gain(inter) > gain(random)"
    )
    return _finding("Patching intersection heads helps the weakest synthetic variants", criterion, details)


def _finding(claim: str, criterion: str, details: list[dict]) -> dict:
    statuses = [d["status"] for d in details]
    decided = [s for s in statuses if s in ("reproduced", "not reproduced")]
    if not details:
        status = "not run"
    elif not decided:
        status = "inconclusive"
    elif all(s == "reproduced" for s in decided):
        status = "reproduced"
    elif all(s == "not reproduced" for s in decided):
        status = "not reproduced"
    else:
        status = "partial"
    return {"claim": claim, "criterion": criterion, "status": status, "details": details}


def _status(ok: bool) -> str:
    return "reproduced" if ok else "not reproduced"


# ---- sections ---------------------------------------------------------------------------


def _f1_grid_md(run: Path, tasks: list[str]) -> list[str]:
    variants = _variants(run, tasks)
    if not variants:
        return [NOT_RUN, ""]
    return _md_table(["variant", *tasks], [[v, *[_fmt(_f1(run, t, v)) for t in tasks]] for v in variants])


def _recall_md(run: Path, task: str) -> list[str]:
    lines = [f"### {task}", ""]
    counts = _read(run / "overlap" / task / "counts.parquet")
    if counts is None:
        return lines + [NOT_RUN, ""]
    counts = _ordered(counts, "variant")
    kind = counts[0]["kind"] if counts else "?"
    header = ["variant", "|H_X|", "recall vs real", "cosine vs real", "F1"]
    rows = [
        [c["variant"], c["n_heads"], _fmt(c["recall_vs_real"], 2), _fmt(c["cosine_vs_real"], 2), _fmt(c["f1"])]
        for c in counts
    ]
    lines += [f"H_X: heads with {kind} score > 0 on the model's own validation data.", "", *_md_table(header, rows)]
    recall = _read(run / "overlap" / task / "recall.parquet") or []
    cells = {(r["row"], r["column"]): r["recall"] for r in recall}
    labels = [c["variant"] for c in counts]
    lines += ["Pairwise recall, cell(row X, column Y) = |H_X ∩ H_Y| / |H_Y|:", ""]
    matrix = [[x, *[_fmt(cells.get((x, y), math.nan), 2) for y in labels]] for x in labels]
    lines += _md_table(["X \\ Y", *labels], matrix)
    return lines


def _spearman_md(run: Path, tasks: list[str]) -> list[str]:
    rows = []
    for task in tasks:
        for r in _read(run / "overlap" / task / "spearman.parquet") or []:
            rows.append([task, r["metric"], _fmt(r["rho"], 2), _fmt(r["p_value"], 3), r["n"], r["reason"] or "-"])
    return _md_table(["task", "similarity", "rho", "p", "n", "note"], rows) if rows else [NOT_RUN, ""]


def _cross_task_md(run: Path) -> list[str]:
    rows = _read(run / "overlap" / "cross_task_cosine.parquet")
    if not rows:
        return [NOT_RUN, ""]
    rows = _ordered(rows, "variant")
    body = [[r["task_a"], r["task_b"], r["variant"], _fmt(r["cosine"], 2)] for r in rows]
    return _md_table(["task A", "task B", "variant", "cosine"], body)


def _patching_md(run: Path, tasks: list[str]) -> list[str]:
    rows = []
    for task in tasks:
        for v in _ordered_names(_subdirs(run / "patching" / task)):
            s = _patching_summary(_read(run / "patching" / task / v / "patching.parquet") or [])
            n_heads = s.get("inter", {}).get("n_heads", math.nan)
            f1s = [_fmt(s.get(name, {}).get("f1", math.nan)) for name in PATCH_SETS]
            gains = [_fmt(s.get(name, {}).get("gain", math.nan)) for name in PATCH_SETS[1:]]
            rows.append([task, v, "–" if math.isnan(n_heads) else int(n_heads), *f1s, *gains])
    header = ["task", "variant", "n", "F1 none", "F1 inter", "F1 compl", "F1 random"]
    header += ["gain inter", "gain compl", "gain random"]
    return _md_table(header, rows) if rows else [NOT_RUN, ""]


def _knockout_md(run: Path, tasks: list[str], fig_dir: Path) -> list[str]:
    lines = []
    for task in tasks:
        for v in _ordered_names(_subdirs(run / "knockout" / task)):
            rows = _read(run / "knockout" / task / v / "knockout.parquet") or []
            summary = _knockout_summary(rows)
            if not summary:
                continue
            unmasked = _unmasked_f1(run, task, v, rows)
            lines += [f"### {task} / {v} (unmasked F1 {_fmt(unmasked)})", ""]
            body = [
                [s["k"], _fmt(s["top"]), f"{_fmt(s['random_mean'])} ± {_fmt(s['random_std'])}", s["n_seeds"]]
                for s in summary
            ]
            lines += _md_table(["k", "F1 top-k masked", "F1 random k masked (mean ± std)", "seeds"], body)
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
        kind, grids = _task_grids(run, task)
        if grids:
            title = f"{task}: {kind} score by layer and head (blank: 0, not in H_X)"
            path = figures.score_heatmaps(grids, title, fig_dir / f"heatmap_{task}.png")
            lines += [_img(path, fig_dir, f"{kind} scores {task}"), ""]
    return lines or [NOT_RUN, ""]


def _scatter_md(run: Path, tasks: list[str], fig_dir: Path) -> list[str]:
    lines = []
    for task in tasks:
        counts = {c["variant"]: c for c in _read(run / "overlap" / task / "counts.parquet") or []}
        panels = []
        for r in _read(run / "overlap" / task / "spearman.parquet") or []:
            pts = [counts[v] for v in r["variants"] if v in counts]
            pts = [c for c in pts if not (math.isnan(_float(c[r["metric"]])) or math.isnan(_float(c["f1"])))]
            xlabel = {"recall_vs_real": "recall of the real model's heads"}.get(
                r["metric"], "cosine with the real model's scores"
            )
            panels.append(
                {
                    "xlabel": xlabel,
                    "labels": [c["variant"] for c in pts],
                    "x": [c[r["metric"]] for c in pts],
                    "y": [c["f1"] for c in pts],
                    "rho": _float(r["rho"]),
                    "p_value": _float(r["p_value"]),
                    "n": r["n"],
                }
            )
        if panels:
            title = f"{task}: similarity to the real model vs F1"
            path = figures.similarity_scatter(panels, title, fig_dir / f"similarity_{task}.png")
            lines += [_img(path, fig_dir, f"similarity vs F1 {task}"), ""]
    return lines or [NOT_RUN, ""]


def _findings_md(findings: dict) -> list[str]:
    lines = []
    for i, f in enumerate(findings.values(), 1):
        lines += [f"{i}. **{f['claim']}**: {f['status']}.", f"   Criterion: {f['criterion']}."]
        lines += [f"   - {d['summary']}: {d['status']}" for d in f["details"]]
    return lines + [""]


# ---- artifacts --------------------------------------------------------------------------


def _knockout_summary(rows: list[dict]) -> list[dict]:
    """Per k > 0 with a top-k row: top-k F1 and the random seeds' mean and std (NaN if none)."""
    out = []
    for k in sorted({int(r["k"]) for r in rows if int(r["k"]) > 0}):
        top = [r["f1"] for r in rows if int(r["k"]) == k and r["selection"] == "top"]
        rand = [r["f1"] for r in rows if int(r["k"]) == k and r["selection"] == "random"]
        if top:
            std = float(np.std(rand, ddof=1)) if len(rand) > 1 else 0.0 if rand else math.nan
            out.append(
                {
                    "k": k,
                    "top": float(np.mean(top)),
                    "random_mean": float(np.mean(rand)) if rand else math.nan,
                    "random_std": std,
                    "n_seeds": len(rand),
                }
            )
    return out


def _unmasked_f1(run: Path, task: str, variant: str, rows: list[dict] | None) -> float:
    # A k = 0 row is the same evaluation pass as the masked ones; the stage-level F1 is the fallback.
    zero = [r["f1"] for r in rows or [] if int(r["k"]) == 0]
    return float(np.mean(zero)) if zero else _f1(run, task, variant)


def _patching_summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{set: {"f1", "gain", "n_heads"}} averaged over seeds."""
    out = {}
    for name in PATCH_SETS:
        sel = [r for r in rows if r["set"] == name]
        if sel:
            out[name] = {key: float(np.mean([_float(r[key]) for r in sel])) for key in ("f1", "gain", "n_heads")}
    return out


def _task_grids(run: Path, task: str) -> tuple[str, dict[str, np.ndarray]]:
    counts = _read(run / "overlap" / task / "counts.parquet") or []
    kind = counts[0]["kind"] if counts else ("insight" if task.startswith("summhay") else "retrieval")
    tables = {v: _read(run / "eval" / task / v / "own" / "head_scores.parquet") for v in _variants(run, [task])}
    tables = {v: [r for r in t if r["kind"] == kind] for v, t in tables.items() if t}
    tables = {v: t for v, t in tables.items() if t}
    if not tables:
        return kind, {}
    rows = [r for t in tables.values() for r in t]
    shape = (1 + max(r["layer"] for r in rows), 1 + max(r["head"] for r in rows))
    grids = {}
    for v, t in tables.items():
        grids[v] = np.zeros(shape)
        for r in t:
            grids[v][r["layer"], r["head"]] = r["score"]
    return kind, grids


def _f1(run: Path, task: str, variant: str) -> float:
    rows = _read(run / "eval" / task / variant / "real" / "predictions.parquet")
    return float(np.mean([r["f1"] for r in rows])) if rows else math.nan


def _tasks(run: Path) -> list[str]:
    found = set()
    for stage in ("eval", "knockout", "patching", "overlap"):
        found |= set(_subdirs(run / stage))
    return sorted(found, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))


def _variants(run: Path, tasks: list[str]) -> list[str]:
    return _ordered_names({v for t in tasks for v in _subdirs(run / "eval" / t)})


def _base(label: str) -> str:
    """The variant a label names: "hh-s1" and "hh@lr=0.0001" are both "hh"."""
    return re.split(r"[-@]", label, maxsplit=1)[0]


def _ordered_names(names) -> list[str]:
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    return sorted(names, key=lambda v: (rank.get(_base(v), len(rank)), v))


def _ordered(rows: list[dict], key: str) -> list[dict]:
    order = {v: i for i, v in enumerate(_ordered_names({r[key] for r in rows}))}
    return sorted(rows, key=lambda r: order[r[key]])


def _subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def _read(path: Path) -> list[dict] | None:
    """The rows of an artifact, None when it does not exist."""
    if not path.is_file():
        return None
    table = pq.read_table(path)
    missing = [c for c in REQUIRED_COLUMNS.get(path.name, ()) if c not in table.column_names]
    if missing:
        raise ReportError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    return table.to_pylist()


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


def _float(x) -> float:
    return math.nan if x is None else float(x)


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _md_table(header: list, rows: list[list]) -> list[str]:
    def line(cells: list) -> str:
        # A bare "|" inside a cell (as in |H_X|) would split it into two columns.
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *[line(row) for row in rows], ""]


def _img(path: Path, fig_dir: Path, alt: str) -> str:
    return f"![{alt}](figures/{path.relative_to(fig_dir).as_posix()})"
