import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib import image as mpimg
from rich.console import Console

from analyses.intervals import run_intervals
from analyses.overlap import KIND_BY_TASK, run_overlap
from analyses.stability import run_stability
from analyses.steps import run_steps
from engine.report import compute_findings, print_summary, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_LAYERS, N_HEADS = 4, 8
HEADS = [(l, h) for l in range(N_LAYERS) for h in range(N_HEADS)]
F1 = {"real": 0.8, "hh": 0.6, "hl": 0.5, "lh": 0.4, "ll": 0.3, "symbolic": 0.2, "base": 0.1}
SECTIONS = (
    "## Table 1: F1 on the real task",
    "## Head recall and counts (Tables 5-10)",
    "## Spearman correlation with F1 (Table 4)",
    "## Cosine similarity across tasks (Table 2)",
    "## Patching (Tables 3, 11)",
    "## Knockout (Figure 3)",
    "## Score heatmaps (Figures 6-9)",
    "## Similarity vs F1 (Figure 4)",
    "## 95% bootstrap intervals",
    "## Head-set stability",
    "## Per-step head sets",
    "## Findings",
)


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


N_EXAMPLES = 20


def ones(f1: float, n: int = N_EXAMPLES) -> list[float]:
    """Per-example F1 of mean `f1` (a multiple of 1/n): the first round(f1 * n) examples right."""
    k = round(f1 * n)
    assert abs(k - f1 * n) < 1e-9, f"{f1} is not a multiple of 1/{n}"
    return [1.0] * k + [0.0] * (n - k)


def write_examples(path: Path, heads: dict, kind: str) -> None:
    """head_examples.parquet of four examples whose mean is each head's score: 1.5 s, 0.5 s, 1.5 s,
    0.5 s; a head with s > 0 has its event at step 0 of even examples and step 1 of odd ones."""
    grid = np.array([[heads.get((l, h), 0.0) for h in range(N_HEADS)] for l in range(N_LAYERS)])
    rows = []
    for i, factor in enumerate((1.5, 0.5, 1.5, 0.5)):
        hits = np.zeros((2, N_LAYERS, N_HEADS), dtype=bool)
        hits[i % 2] = grid > 0
        values = (grid * factor).ravel().tolist()
        rows.append({"index": i, "id": f"{i:03d}", "n_layers": N_LAYERS, "n_heads": N_HEADS,
                     "retrieval": values if kind == "retrieval" else None,
                     "insight": values if kind == "insight" else None, "n_steps": 2,
                     "retrieval_hits": np.flatnonzero(hits).tolist() if kind == "retrieval" else None,
                     "insight_hits": np.flatnonzero(hits).tolist() if kind == "insight" else None})
    write(path, rows)


def write_eval(run: Path, task: str, variant: str, f1: float, heads: dict, kind: str,
               per_example: list[float] | None = None) -> None:
    """Head scores (and the per-example scores behind them) and predictions; per-example F1
    `per_example`, or two examples f1 -/+ 0.05."""
    scores = [
        {"layer": l, "head": h, "kind": kind, "score": heads.get((l, h), 0.0), "n_examples": 4} for l, h in HEADS
    ]
    for split in ("own", "real"):
        write(run / "eval" / task / variant / split / "head_scores.parquet", scores)
    write_examples(run / "eval" / task / variant / "own" / "head_examples.parquet", heads, kind)
    values = per_example if per_example is not None else [f1 - 0.05, f1 + 0.05]
    preds = [{"id": f"{i:03d}", "prediction": "a", "f1": v, "em": 0.0, "n_tokens": 2} for i, v in enumerate(values)]
    write(run / "eval" / task / variant / "real" / "predictions.parquet", preds)


def write_knockout(run: Path, task: str, variant: str, unmasked: float, top: dict, random: dict) -> None:
    """F1 per run as given; each run's per-example F1 is `ones` of it."""
    def row(k, selection, seed, heads, f1):
        return {"k": k, "selection": selection, "seed": seed, "heads": heads, "f1": f1, "em": 0.0,
                "n": N_EXAMPLES, "example_f1": ones(f1)}

    rows = [row(0, "top", -1, [], unmasked)]
    for k, f1 in top.items():
        rows.append(row(k, "top", -1, ["0.0"] * k, f1))
        rows += [row(k, "random", seed, ["1.1"] * k, rf1) for seed, rf1 in enumerate(random[k])]
    write(run / "knockout" / task / variant / "knockout.parquet", rows)


def write_patching(run: Path, task: str, variant: str, none: float, gains: dict) -> None:
    """F1 of "none" and gains per set and seed; per-example F1 is `ones` of each F1."""
    sizes = {"em": 0.0, "size_inter": 5, "size_compl": 3}
    rows = [{"set": "none", "n_heads": 0, "seed": -1, "f1": none, "gain": 0.0, "example_f1": ones(none), **sizes}]
    for name, seed_gains in gains.items():
        for seed, g in enumerate(seed_gains):
            rows.append({"set": name, "n_heads": 3, "seed": seed, "f1": none + g, "gain": g,
                         "example_f1": ones(none + g), **sizes})
    write(run / "patching" / task / variant / "patching.parquet", rows)


def make_run(run: Path, knockout: bool = True, patching: bool = True) -> Path:
    rng = np.random.default_rng(0)
    real_heads = HEADS[:10]
    for task in ("mdqa", "summhay"):
        for variant, f1 in F1.items():
            # Synthetic models share more of the real model's heads the better they score.
            n_shared = 10 if variant == "real" else max(1, int(round(10 * f1)))
            heads = {h: float(rng.uniform(0.05, 1.0)) for h in real_heads[:n_shared] + HEADS[20 : 20 + (10 - n_shared)]}
            mean = round(f1 - (0.1 if task == "summhay" else 0.0), 2)
            write_eval(run, task, variant, mean, heads, KIND_BY_TASK[task], per_example=ones(mean))
    if knockout:
        write_knockout(run, "mdqa", "real", 0.8, {2: 0.5, 4: 0.2}, {2: [0.75, 0.75, 0.8], 4: [0.7, 0.75, 0.7]})
    if patching:
        write_patching(run, "mdqa", "hh", 0.6, {"inter": [0.0], "compl": [0.05], "random": [0.05]})
        write_patching(run, "mdqa", "ll", 0.3, {"inter": [0.15, 0.2], "compl": [0.05], "random": [0.05, 0.0, 0.05]})
        write_patching(run, "mdqa", "symbolic", 0.2, {"inter": [0.25], "compl": [0.1], "random": [0.05]})
    run_overlap(run, ["mdqa", "summhay"], list(F1), KIND_BY_TASK)
    variants = {t: list(F1) for t in ("mdqa", "summhay")}
    run_intervals(run, ["mdqa", "summhay"], variants, KIND_BY_TASK)
    run_stability(run, ["mdqa", "summhay"], variants, KIND_BY_TASK)
    run_steps(run, ["mdqa", "summhay"], variants, KIND_BY_TASK)
    return run


def test_report_renders_every_section_and_valid_figures(tmp_path):
    run = make_run(tmp_path / "exp")
    config = {"model": {"name": "tiny-llama", "rope_base": 80000}, "seeds": [0, 1], "tasks": {}}
    path = write_report(run, config)
    text = path.read_text()
    assert "| model.rope_base | 80000 |" in text and "| seeds | 0, 1 |" in text
    assert path == run / "report" / "report.md"
    for heading in SECTIONS + ("## Configuration", "### mdqa", "### summhay", "### mdqa / real"):
        assert heading in text, heading
    assert "not run" not in text
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", text)
    names = ("heatmap_mdqa", "heatmap_summhay", "knockout_mdqa_real", "similarity_mdqa", "similarity_summhay",
             "stability_mdqa", "stability_summhay", "steps_mdqa", "steps_summhay")
    expected = {f"figures/{n}.png" for n in names}
    assert set(links) == expected
    on_disk = {f"figures/{p.name}" for p in (run / "report" / "figures").iterdir()}
    assert on_disk == expected  # no stray temporary files either
    for link in links:
        png = run / "report" / link
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        pixels = mpimg.imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    # Table 1: the mdqa column holds each variant's mean F1 from its predictions.
    assert "| hh | 0.600 | 0.500 |" in text and "| base | 0.100 | 0.000 |" in text
    # Patching row of ll: mean over seeds of inter (0.175) and random (0.0333).
    assert "| mdqa | ll | 3 | 0.300 | 0.475 | 0.350 | 0.333 | 0.175 | 0.050 | 0.033 |" in text
    # Knockout at k=4: random mean and sample std of (0.70, 0.75, 0.70); the top-k run loses
    # examples 4-15 that the random runs keep (0.717 - 0.2 on average), p of the sign-flip test.
    row = next(line for line in text.splitlines() if line.startswith("| 4 | 0.200 |"))
    assert row.startswith(f"| 4 | 0.200 | 0.717 ± {np.std([0.7, 0.75, 0.7], ddof=1):.3f} | 3 | 0.517 [")
    findings = json.loads((run / "report" / "findings.json").read_text())
    provenance = findings.pop("provenance")
    assert [f["status"] for f in findings.values()] == ["reproduced"] * 4
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert provenance["git"]["commit"] == commit and provenance["seeds"] == {"bootstrap": 0, "bootstrap_resamples": 4000}
    assert f"| this report | {provenance['created']} | {commit[:12]}" in text
    assert "## Probe" not in text  # `needlework probe` was not run here


def test_absent_stages_render_not_run(tmp_path):
    run = make_run(tmp_path / "exp", knockout=False, patching=False)
    text = write_report(run).read_text()
    for heading in ("## Patching (Tables 3, 11)", "## Knockout (Figure 3)"):
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        assert section.strip() == "_not run_", section
    findings = compute_findings(run)
    assert findings["knockout_top_vs_random"]["status"] == "not run"
    assert findings["patching_helps_weakest"]["status"] == "not run"
    assert findings["real_beats_synthetic"]["status"] == "reproduced"
    assert not list((run / "report" / "figures").glob("knockout_*"))


def test_empty_run_renders_all_sections_as_not_run(tmp_path):
    text = write_report(tmp_path).read_text()
    for heading in SECTIONS[:-1]:
        assert text.split(heading, 1)[1].split("\n## ", 1)[0].strip() == "_not run_", heading
    assert all(f["status"] == "not run" for f in compute_findings(tmp_path).values())


@pytest.mark.parametrize("real, expected", [
    (ones(0.8), "reproduced"),  # right on 4 more examples than hh: +0.2, interval above 0
    (ones(0.4), "not reproduced"),  # 4 fewer: -0.2
    ([0.0] + ones(0.6)[:-1], "inconclusive"),  # one example lost, another won: 0, interval spans 0
])
def test_finding_real_beats_best_synthetic(tmp_path, real, expected):
    for variant, vec in {"real": real, "hh": ones(0.6), "ll": ones(0.2), "real_limited": ones(0.9),
                         "base": ones(0.95)}.items():
        write_eval(tmp_path, "musique", variant, float(np.mean(vec)), {(0, 0): 1.0}, "retrieval", per_example=vec)
    finding = compute_findings(tmp_path)["real_beats_synthetic"]
    (detail,) = finding["details"]
    assert detail["best_synthetic"] == "hh" and detail["best_synthetic_f1"] == pytest.approx(0.6)
    assert detail["estimate"] == pytest.approx(np.mean(real) - 0.6) and detail["n"] == N_EXAMPLES
    assert detail["status"] == expected and finding["status"] == expected
    assert ("95% CI spans 0" in detail["summary"]) == (expected == "inconclusive")


def test_tasks_the_real_model_does_not_do_decide_nothing(tmp_path):
    """Real beats synthetic on summhay (0.25 vs 0.05), but below the competence bar that is
    noise beating noise; musique, done at 0.65, decides the claim alone."""
    for task, real_f1 in (("summhay", 0.25), ("musique", 0.65)):
        for variant, f1 in {"real": real_f1, "hh": 0.05, "ll": 0.0}.items():
            write_eval(tmp_path, task, variant, f1, {(0, 0): 1.0}, "retrieval", per_example=ones(f1))
    finding = compute_findings(tmp_path)["real_beats_synthetic"]
    by_task = {d["task"]: d for d in finding["details"]}
    assert by_task["summhay"]["status"] == "inconclusive" and "below the bar" in by_task["summhay"]["summary"]
    assert by_task["musique"]["status"] == "reproduced" and finding["status"] == "reproduced"
    (tmp_path / "eval" / "musique").rename(tmp_path / "musique-away")
    assert compute_findings(tmp_path)["real_beats_synthetic"]["status"] == "inconclusive"


@pytest.mark.parametrize(
    "top_f1, random_f1, expected",
    [
        (0.5, [0.7, 0.7, 0.7], "reproduced"),  # top-k loses 4 more examples than random-k
        (0.8, [0.6, 0.65, 0.6], "not reproduced"),  # random-k hurts more
        (0.7, [0.7, 0.7, 0.7], "inconclusive"),  # the same examples: no difference
    ],
)
def test_finding_knockout(tmp_path, top_f1, random_f1, expected):
    # A large drop at a small k must not count: only the largest k with random heads decides
    # (k = 10 masks every head, leaving none to draw at random).
    write_knockout(tmp_path, "mdqa", "real", 0.8, {1: 0.1, 8: top_f1, 10: 0.0}, {1: [0.8] * 3, 8: random_f1, 10: []})
    finding = compute_findings(tmp_path)["knockout_top_vs_random"]
    (detail,) = finding["details"]
    assert detail["k"] == 8 and detail["top_f1"] == pytest.approx(top_f1)
    assert detail["random_f1_mean"] == pytest.approx(np.mean(random_f1))
    assert detail["estimate"] == pytest.approx(np.mean(random_f1) - top_f1)
    assert detail["status"] == expected and finding["status"] == expected


def test_knockout_tests_adjust_p_values_across_k(tmp_path):
    from engine.findings import knockout_tests
    from engine.stats import benjamini_hochberg, paired_p_value

    write_knockout(tmp_path, "mdqa", "real", 0.8, {1: 0.5, 2: 0.6, 4: 0.7}, {1: [0.8] * 3, 2: [0.75] * 3, 4: [0.8] * 3})
    rows = pq.read_table(tmp_path / "knockout" / "mdqa" / "real" / "knockout.parquet").to_pylist()
    tests = knockout_tests(rows)
    raw = [paired_p_value(ones(r), ones(t)) for t, r in ((0.5, 0.8), (0.6, 0.75), (0.7, 0.8))]
    assert [t["k"] for t in tests] == [1, 2, 4]
    assert [t["p_value"] for t in tests] == pytest.approx(raw)
    assert [t["p_adjusted"] for t in tests] == pytest.approx(benjamini_hochberg(raw))
    # 6, 3 and 2 examples lost: the exact sign-flip p-values are 2/2^6, 2/2^3 and 2/2^2.
    assert raw == pytest.approx([2 / 64, 2 / 8, 2 / 4])


@pytest.mark.parametrize("sign, expected", [(1, "reproduced"), (-1, "not reproduced")])
def test_finding_recall_correlates_with_f1(tmp_path, sign, expected):
    real_heads = HEADS[:8]
    write_eval(tmp_path, "mdqa", "real", 0.9, {h: 1.0 for h in real_heads}, "retrieval")
    for i, variant in enumerate(("hh", "hl", "lh", "ll", "symbolic")):
        n_shared = 2 + i if sign > 0 else 6 - i
        write_eval(tmp_path, "mdqa", variant, 0.1 + 0.1 * i, {h: 1.0 for h in real_heads[:n_shared]}, "retrieval")
    run_overlap(tmp_path, ["mdqa"], ["real", "hh", "hl", "lh", "ll", "symbolic"], KIND_BY_TASK)
    finding = compute_findings(tmp_path)["recall_correlates_with_f1"]
    (detail,) = finding["details"]
    # rho = +-1 over five points: two of the 5! pairings reach |rho| = 1.
    assert detail["n"] == 5 and detail["rho"] == pytest.approx(sign * 1.0)
    assert detail["p_value"] == pytest.approx(2 / 120)
    assert finding["status"] == expected


def test_finding_recall_inconclusive_with_two_variants(tmp_path):
    write_eval(tmp_path, "mdqa", "real", 0.9, {(0, 0): 1.0, (0, 1): 1.0}, "retrieval")
    write_eval(tmp_path, "mdqa", "hh", 0.5, {(0, 0): 1.0}, "retrieval")
    write_eval(tmp_path, "mdqa", "ll", 0.2, {(1, 1): 1.0}, "retrieval")
    run_overlap(tmp_path, ["mdqa"], ["real", "hh", "ll"], KIND_BY_TASK)
    finding = compute_findings(tmp_path)["recall_correlates_with_f1"]
    assert finding["status"] == "inconclusive" and finding["details"][0]["n"] == 2
    assert "3. **Recall of the real model's heads correlates with F1**: inconclusive." in write_report(
        tmp_path).read_text()
    # NaN rho and p are written as null: findings.json stays strict JSON.
    text = (tmp_path / "report" / "findings.json").read_text()
    stored = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert stored["recall_correlates_with_f1"]["details"][0]["rho"] is None


@pytest.mark.parametrize("weak_inter, expected", [(0.3, "reproduced"), (0.0, "not reproduced")])
def test_finding_patching_helps_weakest(tmp_path, weak_inter, expected):
    # The strongest variant hurts from patching in both cases; only the weaker half counts.
    write_patching(tmp_path, "musique", "hh", 0.7, {"inter": [-0.2], "random": [0.0]})
    write_patching(tmp_path, "musique", "hl", 0.6, {"inter": [-0.1], "random": [0.0]})
    write_patching(tmp_path, "musique", "ll", 0.2, {"inter": [weak_inter], "random": [0.1, 0.15]})
    write_patching(tmp_path, "musique", "symbolic", 0.1, {"inter": [0.4], "random": [0.0]})
    finding = compute_findings(tmp_path)["patching_helps_weakest"]
    assert sorted(d["variant"] for d in finding["details"]) == ["ll", "symbolic"]
    ll = next(d for d in finding["details"] if d["variant"] == "ll")
    # random seeds right on 6 and 7 examples, inter on 4 + 20 * weak_inter: per example means.
    assert ll["estimate"] == pytest.approx(weak_inter + 0.2 - 0.325)
    assert ll["status"] == expected
    assert finding["status"] == ("reproduced" if expected == "reproduced" else "partial")


def test_print_summary_shows_table_and_findings(tmp_path):
    run = make_run(tmp_path / "exp")  # no report written: findings are computed on the spot
    console = Console(record=True, width=200)
    print_summary(run, console)
    out = console.export_text()
    assert "Table 1" in out and "symbolic" in out and "0.200" in out
    statuses = [line.split("│")[2].strip() for line in out.splitlines()
                if line.startswith("│") and line.split("│")[2].strip() in ("reproduced", "not reproduced",
                                                                            "inconclusive", "partial", "not run")]
    assert statuses == ["reproduced"] * 4


def test_malformed_artifact_names_file_and_column(tmp_path):
    write(tmp_path / "knockout" / "mdqa" / "real" / "knockout.parquet", [{"k": 2, "f1": 0.5}])
    with pytest.raises(ValueError, match=r"knockout/mdqa/real/knockout.parquet: missing column\(s\) \['selection'\]"):
        write_report(tmp_path)


def test_base_model_section_reports_the_miniature_check(tmp_path):
    import json as _json

    rows = [{"length": 256, "depth": "0.00-0.50", "n": 3, "accuracy": 1.0},
            {"length": 256, "depth": "0.50-1.00", "n": 1, "accuracy": 0.0},
            {"length": 1024, "depth": "0.00-1.00", "n": 4, "accuracy": 0.25},
            {"length": 1024, "depth": "all", "n": 4, "accuracy": 0.25}]
    (tmp_path / "base_model.json").write_text(_json.dumps({"spec": {"context": 256}, "seconds": {"train": 12.0},
                                                            "retrieval": rows}))
    text = write_report(tmp_path).read_text()
    assert "## Base model" in text
    assert "| 256 | 0.75 | 1.00, 0.00 |" in text  # (3 x 1.0 + 1 x 0.0) / 4
    assert "| 1024 | 0.25 | 0.25 |" in text


def test_failed_base_model_check_is_flagged(tmp_path):
    import json as _json

    (tmp_path / "base_model.json").write_text(_json.dumps({
        "spec": {"context": 128}, "seconds": {"train": 1.0},
        "retrieval": [{"length": 128, "depth": "0-1", "n": 4, "accuracy": 0.5}],
        "check": {"length": 128, "accuracy": 0.5, "min_accuracy": 0.9, "passed": False}}))
    assert "FAILED its content-retrieval check** (accuracy 0.50 < 0.9 at 128 tokens)" in write_report(
        tmp_path).read_text()


def test_tasks_the_real_model_cannot_do_are_flagged(tmp_path):
    from engine.findings import COMPETENCE_F1, task_competence

    run = make_run(tmp_path / "run")
    competence = task_competence(run)
    assert competence["mdqa"] == {"real_f1": pytest.approx(0.8), "real_heads": 10, "competent": True}
    assert "do not do" not in write_report(run).read_text() and "does not do" not in write_report(run).read_text()
    # summhay: the real model falls below the bar; mdqa: it scores but no head retrieves.
    write_eval(run, "summhay", "real", COMPETENCE_F1 - 0.01, {HEADS[0]: 0.5}, KIND_BY_TASK["summhay"])
    write_eval(run, "mdqa", "real", 0.8, {}, KIND_BY_TASK["mdqa"])
    competence = task_competence(run)
    assert competence["summhay"]["competent"] is False and competence["summhay"]["real_heads"] == 1
    assert competence["mdqa"] == {"real_f1": pytest.approx(0.8), "real_heads": 0, "competent": False}
    text = write_report(run).read_text()
    warning = next(line for line in text.splitlines() if "does not do" in line)
    assert warning == (f"**The real-data model does not do mdqa, summhay: mdqa (F1 0.800, |H_real| 0), summhay (F1 "
                       f"{COMPETENCE_F1 - 0.01:.3f}, |H_real| 1), against F1 >= {COMPETENCE_F1} and at least one head. "
                       "The findings on these tasks compare noise and test nothing.**")
    assert text.index(warning) > text.index("## Findings")
    console = Console(record=True, width=200)
    print_summary(run, console)
    assert "does not do mdqa, summhay" in console.export_text()


def test_named_limited_subsets_sit_with_real_limited_in_every_table(tmp_path):
    run = tmp_path / "run"
    variants = {"real": 0.8, "hh": 0.6, "real_limited_l3": 0.3, "real_limited": 0.5, "real_limited_l1": 0.7,
                "base": 0.1}
    for variant, f1 in variants.items():
        write_eval(run, "mdqa", variant, f1, {h: 0.5 for h in HEADS[: int(10 * f1)]}, "retrieval")
    run_overlap(run, ["mdqa"], list(variants), KIND_BY_TASK)
    text = write_report(run).read_text()
    order = ["real", "real_limited", "real_limited_l1", "real_limited_l3", "hh", "base"]
    table1 = text.split("## Table 1")[1].split("##")[0]
    assert re.findall(r"^\| ([a-z_0-9]+) \|", table1, re.M)[1:] == order  # after the header
    recall = text.split("## Head recall")[1].split("## Spearman")[0]
    assert "| X \\ Y | " + " | ".join(order) + " |" in recall
    assert "| real_limited_l1 | 7 | 0.88 |" in recall  # its 7 heads are 7 of the real model's 8
