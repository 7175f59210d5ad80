"""engine/cli.py: every bad input is one line naming the file, flag or key, exit code 2, and
leaves nothing behind; a failed run is one line and exit code 1."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.cli import main

ROOT = Path(__file__).parents[2]
NQ = ROOT / "data" / "nq-open-oracle.jsonl.gz"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(capsys, *argv: str, code: int = 2, label: str = "error") -> str:
    """Runs the CLI, checks it failed with `code` and one stderr line; returns the message."""
    got, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and lines[0].startswith(f"{label}: "), (got, err)
    return lines[0][len(label) + 2:]


EXPERIMENT = """
name: cli
run_dir: {run_dir}
model: {{name: tiny, path: {model}, rope_base: 40000, max_context: 400}}
tasks:
  mdqa:
    variants: [real, base]
    n_train: 6
    n_eval: 2
    target_tokens: 300
    sources: {{train: {nq}, eval: {nq}, pool: {nq}}}
"""


@pytest.fixture
def experiment(tmp_path, tiny_checkpoints):
    path = tmp_path / "cli.yaml"
    path.write_text(textwrap.dedent(EXPERIMENT.format(run_dir=tmp_path / "run", model=tiny_checkpoints["llama"],
                                                      nq=NQ)))
    return path


def test_report_and_status_refuse_what_is_no_run_directory(capsys, tmp_path):
    missing = tmp_path / "nonexistent"
    assert one_error(capsys, "report", missing) == f"{missing}: no such run directory"
    assert not missing.exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    assert one_error(capsys, "report", plain) == f"{plain}: not a run directory (no config.yaml)"
    assert list(plain.iterdir()) == []
    (plain / "config.yaml").write_text("name: [x\n")
    message = one_error(capsys, "status", plain)
    assert message.startswith(f"{plain / 'config.yaml'}: corrupt run config: ") and "(line 2, column 1)" in message
    (plain / "config.yaml").write_text("just a string\n")
    assert one_error(capsys, "report", plain) == (f"{plain / 'config.yaml'}: corrupt run config: expected a mapping, "
                                                  "got str")
    assert sorted(p.name for p in plain.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("stages", ["", " ", "data,,train", "data, "])
def test_an_empty_or_blank_stage_list_is_an_error(capsys, experiment, stages):
    assert one_error(capsys, "run", experiment, "--stages", stages) == (
        f"--stages {stages!r}: expected a comma-separated subset of: data, train, evaluate, knockout, patching, report")
    assert not (experiment.parent / "run").exists()


def test_unknown_stage_is_bad_input(capsys, experiment):
    assert one_error(capsys, "run", experiment, "--stages", "data,trian") == (
        "--stages: unknown stage 'trian'; valid: data, train, evaluate, knockout, patching, report")


def test_validate_and_plan_refuse_values_no_run_can_use(capsys, experiment):
    assert one_error(capsys, "validate", experiment, "tasks.mdqa.n_train=-1") == (
        f"{experiment}: tasks.mdqa.n_train: -1 is out of range; valid: >= 1")
    assert one_error(capsys, "plan", experiment, "train.lora_target=everything") == (
        f"{experiment}: train.lora_target: 'everything' is not a valid choice; valid: attention, all")
    assert one_error(capsys, "validate", experiment, "synth.backend=nope") == (
        f"{experiment}: synth.backend 'nope' is not one of template, hf, http, vllm")
    # a negative n_train used to be caught only after Ray had started, with files written
    assert one_error(capsys, "run", experiment, "tasks.mdqa.n_train=-1").endswith("valid: >= 1")
    assert not (experiment.parent / "run").exists()


def test_run_refuses_a_context_the_model_cannot_position(capsys, experiment, tiny_checkpoints):
    # the tiny Llama has 512 positions at RoPE base 10,000; raised to 40,000 it reaches at most 2,048
    model = tiny_checkpoints["llama"]
    assert one_error(capsys, "run", experiment, "model.max_context=100000", "tasks.mdqa.target_tokens=99000") == (
        f"{experiment}: model.max_context (100000) exceeds the 2048 positions the model can reach "
        f"(max_position_embeddings 512 of {model} x 4 for the RoPE base raised 10000 -> 40000); valid: up to 2048")
    assert not (experiment.parent / "run").exists()


def test_validate_names_unreadable_experiment_files(capsys, tmp_path):
    assert one_error(capsys, "validate", tmp_path) == f"{tmp_path}: is a directory; expected the experiment file"
    binary = tmp_path / "x.yaml"
    binary.write_bytes(b"\x89PNG\r\n")
    assert one_error(capsys, "validate", binary) == f"{binary}: not a UTF-8 text file (byte 0: invalid start byte)"


def test_plan_refuses_another_experiments_run_directory(capsys, experiment, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: other\nmodel: {path: elsewhere}\n")
    assert one_error(capsys, "plan", experiment).startswith(
        f"{run_dir}: holds experiment 'other' with model 'elsewhere'; this config is 'cli'")
    (run_dir / "config.yaml").unlink()
    (run_dir / "manifest.json").write_text(json.dumps({"data/mdqa/real": {"hash": "x", "path": str(run_dir)}}))
    assert one_error(capsys, "plan", experiment) == (
        f"{run_dir}: holds a manifest.json but no config.yaml, so what it records cannot be checked against this "
        "experiment. Use another run_dir.")
    assert one_error(capsys, "run", experiment, "--stages", "data").startswith(f"{run_dir}: holds a manifest.json")
    assert sorted(p.name for p in run_dir.iterdir()) == ["manifest.json"]


def test_a_stage_refuses_inputs_its_upstream_stage_did_not_build(capsys, experiment, ray_cluster):
    run_dir = experiment.parent / "run"
    assert one_error(capsys, "evaluate", experiment) == (
        f"evaluate: {run_dir} has no train/mdqa/real for this configuration; run the train stage first "
        "(--stages train,evaluate)")
    assert one_error(capsys, "train", experiment) == (
        f"train: {run_dir} has no data/mdqa/real for this configuration; run the data stage first "
        "(--stages data,train)")


# ----------------------------------------------------------------------------- data build


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> str:
    """A tiny Llama with 4096 positions and the character tokenizer: NQ passages fit in 1500 tokens."""
    from tiny import save_tiny

    return str(save_tiny("llama", tmp_path_factory.mktemp("tok") / "model", max_position_embeddings=4096))


def build_args(tokenizer: str, out: Path, *extra: str) -> list[str]:
    return ["data", "build", "--task", "mdqa", "--variant", "real", "--source", f"train={NQ}", "--source",
            f"eval={NQ}", "--source", f"pool={NQ}", "--tokenizer", tokenizer, "--target-tokens", "1500", "--n", "6",
            "--n-eval", "2", "--out", str(out), *extra]


def replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def swap(args: list[str], old: str, new: str) -> list[str]:
    return [new if a == old else a for a in args]


def test_data_build_bad_flags_are_one_line_each_and_leave_no_out(capsys, tmp_path, tokenizer_model):
    tok, out = tokenizer_model, tmp_path / "out"
    good = build_args(tok, out)
    cases = [
        (replace_flag(good, "--task", "mdqaa"),
         "data build: --task: unknown task 'mdqaa'; valid tasks: ['mdqa', 'musique', 'needle', 'summhay']"),
        (replace_flag(good, "--variant", "hx"),
         "data build: --variant: unknown variant 'hx'; valid: real, real_limited, hh, hl, lh, ll, symbolic, base"),
        (swap(good, f"train={NQ}", str(NQ)),
         f"--source '{NQ}': expected KEY=VALUE, e.g. --source train=nq.jsonl.gz"),
        (good + ["--option", "gold_position"], "--option 'gold_position': expected KEY=VALUE, e.g. --option gold_position=0"),
        (good + ["--option", "colour=red"],
         "data build: --option: unknown option 'colour'; valid: "),
        (swap(good, f"train={NQ}", f"trian={NQ}"),
         "data build: --source: unknown source 'trian' (did you mean 'train'?); valid: train, eval, pool"),
        (swap(good, f"eval={NQ}", f"eval={tmp_path}/gone.jsonl"),
         f"data build: --source eval: {tmp_path}/gone.jsonl does not exist"),
        (replace_flag(good, "--tokenizer", str(tmp_path / "no-tokenizer")),
         f"{tmp_path / 'no-tokenizer'}: cannot load a tokenizer (no such directory, and no hub model of that name "
         "available): "),
        (replace_flag(good, "--n", "-3"), "data build: --n: -3 is out of range; valid: >= 1"),
        (replace_flag(good, "--target-tokens", "-5"), "data build: --target-tokens: -5 is out of range; valid: >= 1"),
        (replace_flag(good, "--target-tokens", "100000"),
         f"data build: --target-tokens (100000) leaves no room for the answer within the model's 4096 positions "
         f"(max_position_embeddings of {tok}); valid: 1 to 4095, or pass --max-context N for a context extended "
         "beyond them"),
        (replace_flag(good, "--target-tokens", "100000") + ["--max-context", "4096"],
         "data build: --target-tokens (100000) leaves no room for the answer within --max-context (4096); valid: 1 "
         "to 4095"),
        (replace_flag(good, "--variant", "base"),
         "data build: --variant 'base' is the non-fine-tuned model and has no dataset of its own"),
    ]
    for args, message in cases:
        got = one_error(capsys, *args)
        assert got.startswith(message), (args, got)
    symbolic = ["data", "build", "--task", "mdqa", "--variant", "symbolic", "--tokenizer", tok, "--target-tokens",
                "-5", "--out", str(out)]  # an IndexError deep in tasks/mdqa.py before
    assert one_error(capsys, *symbolic) == "data build: --target-tokens: -5 is out of range; valid: >= 1"
    assert not out.exists()


def test_data_build_out_must_be_a_fresh_or_previous_dataset_directory(capsys, tmp_path, tokenizer_model):
    tok = tokenizer_model
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert one_error(capsys, *build_args(tok, afile)) == f"--out {afile}: exists and is not a directory"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert one_error(capsys, *build_args(tok, other), "--force") == (
        f"--out {other}: not empty and not a dataset directory; choose another --out")
    assert afile.read_text() == "mine" and [p.name for p in other.iterdir()] == ["notes.txt"]


def test_data_build_replaces_a_previous_build_whole(capsys, tmp_path, tokenizer_model):
    tok, out = tokenizer_model, tmp_path / "out"
    code, _, err = run_cli(capsys, *build_args(tok, out))
    assert code == 0, err
    assert (out / "eval.parquet").exists()
    symbolic = ["data", "build", "--task", "mdqa", "--variant", "symbolic", "--tokenizer", tok, "--target-tokens",
                "1500", "--n", "5", "--out", str(out)]
    assert one_error(capsys, *symbolic) == f"--out {out}: holds a previous build; pass --force to replace it whole"
    code, _, err = run_cli(capsys, *symbolic, "--force")
    assert code == 0, err
    # the previous build's eval split is gone: what is there is exactly the new build
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "stats.json", "train.parquet", "val.parquet"]
    assert json.loads((out / "stats.json").read_text())["variant"] == "symbolic"
    assert set(pq.read_table(out / "train.parquet").column("variant").to_pylist()) == {"symbolic"}


def test_a_truncated_gzip_source_names_the_file(capsys, tmp_path, tokenizer_model):
    truncated = tmp_path / "cut.jsonl.gz"
    data = NQ.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with gzip.open(truncated, "rt") as f:  # the lines a reader gets before the cut
        lines = 0
        try:
            for lines, _ in enumerate(f, 1):
                pass
        except EOFError:
            pass
    args = build_args(tokenizer_model, tmp_path / "out")
    for key in ("train", "eval", "pool"):
        args = swap(args, f"{key}={NQ}", f"{key}={truncated}")
    assert one_error(capsys, *args) == (
        f"{truncated}: truncated or not a readable JSON-lines file after line {lines} (EOFError: Compressed file "
        "ended before the end-of-stream marker was reached); expected MDQA question records")
    assert not (tmp_path / "out").exists()


def test_data_stats_refuses_what_no_build_wrote(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert one_error(capsys, "data", "stats", empty) == (
        f"{empty}: not a dataset directory (no train.parquet, val.parquet, eval.parquet)")
    (empty / "train.parquet").write_bytes(b"not parquet at all")
    assert one_error(capsys, "data", "stats", empty).startswith(f"{empty / 'train.parquet'}: not a dataset split (")
    assert one_error(capsys, "data", "stats", tmp_path / "nope") == f"{tmp_path / 'nope'}: no such dataset directory"


def test_a_failed_run_is_one_line_and_exit_code_1(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NEEDLEWORK_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "strict.yaml"
    path.write_text(textwrap.dedent(f"""
        name: strict
        run_dir: {tmp_path / 'run'}
        model: {{name: mini, path: miniature, rope_base: 40000, max_context: 512}}
        miniature: {{n_layers: 1, n_heads: 2, n_kv_heads: 1, hidden: 32, intermediate: 64, context: 64, steps: 3,
                    phase1_steps: 2, batch_size: 4, warmup_steps: 1, qa_per_task: 3, min_accuracy: 0.99,
                    check_probes: 4, threads: 1}}
        tasks:
          mdqa: {{variants: [real], n_train: 4, n_eval: 2, target_tokens: 160}}
    """))
    code, _, err = run_cli(capsys, "run", path)
    assert code == 1 and "Traceback" not in err, err
    first, *table = err[err.index("failed: "):].splitlines()  # after the pretraining's progress lines
    assert first == "failed: the miniature pretrained from this recipe (3 steps) misses its competence gates at " \
                    "its own length 64:"
    copy = next(row for row in table if row.startswith("| copy at 64 tokens"))
    assert re.fullmatch(r"\| copy at 64 tokens \(random depths\) \| 0\.\d\d \| >= 0\.99 \| False \|", copy), copy
    assert table[-1] == "| query heads | 2 | >= 32 | False |"
    assert not (tmp_path / "run").exists()  # nothing is written before the base model is there


def test_exit_codes_reach_the_shell(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "engine.cli", "validate", str(tmp_path)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path}: is a directory; expected the experiment file"]
