"""engine/config.py: YAML -> dataclasses, grid expansion, hashes, clear errors."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from engine.config import (
    ConfigError,
    data_hash,
    eval_hash,
    expand,
    load_experiment,
    task_options,
    train_config,
    train_hash,
    variant_kind,
)

YAML = """
name: grid
model: {name: tiny, path: /models/tiny, rope_base: 80000}
seeds: [0, 1]
tasks:
  mdqa:
    variants: [real, hh, base]
    n_train: 20
    target_tokens: 500
  musique:
    variants: [real, symbolic]
train: {lr: 1.0e-4, max_steps: 5}
sweep: {train.lora_rank: [4, 8]}
"""


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_grid_expands_to_expected_runs(tmp_path):
    exp = load_experiment(write(tmp_path, YAML))
    runs = expand(exp)
    labels = sorted((r.task, r.label) for r in runs)
    # 2 fine-tuned mdqa variants x 2 seeds x 2 ranks + base once; musique 2 x 2 x 2
    assert len(runs) == 2 * 2 * 2 + 1 + 2 * 2 * 2
    assert ("mdqa", "base") in labels
    assert ("mdqa", "hh-s1@lora_rank=8") in labels
    run = next(r for r in runs if r.label == "hh-s1@lora_rank=4")
    assert train_config(exp, run).lora_rank == 4 and train_config(exp, run).lr == 1e-4


def test_overrides_apply(tmp_path):
    exp = load_experiment(write(tmp_path, YAML), overrides=["train.lr=3e-5", "tasks.mdqa.n_train=7"])
    assert exp.train.lr == 3e-5 and exp.task("mdqa").n_train == 7


def _hashes(path):
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from engine.config import *;"
        f"e = load_experiment({str(path)!r}); r = expand(e)[0];"
        "print(data_hash(e, r), train_hash(e, r), eval_hash(e, r, 'real'))"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parents[2]).stdout.split()


def test_hashes_stable_across_processes_and_sensitive_to_inputs(tmp_path):
    path = write(tmp_path, YAML)
    first, second = _hashes(path), _hashes(path)
    assert first == second and len(set(first)) == 3
    exp = load_experiment(path)
    run = expand(exp)[0]
    changed = load_experiment(path, overrides=["train.lr=2e-4"])
    assert data_hash(exp, run) == data_hash(changed, run)  # training settings do not touch data
    assert train_hash(exp, run) != train_hash(changed, run)
    assert eval_hash(exp, run, "real") != eval_hash(changed, run, "real")
    more_data = load_experiment(path, overrides=["tasks.mdqa.n_train=21"])
    assert data_hash(exp, run) != data_hash(more_data, run)
    # other task untouched
    mus = next(r for r in expand(exp) if r.task == "musique")
    assert train_hash(exp, mus) == train_hash(more_data, mus)
    # where and how runs are scheduled does not change what they train
    scheduled = load_experiment(path, overrides=["train.max_concurrent=3"])
    raw = yaml.safe_load(path.read_text())
    raw.setdefault("train", {})["ray_env"] = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    env_path = tmp_path / "env.yaml"
    env_path.write_text(yaml.safe_dump(raw))
    with_env = load_experiment(env_path)
    assert with_env.train.ray_env == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    assert train_hash(exp, run) == train_hash(scheduled, run) == train_hash(with_env, run)


@pytest.mark.parametrize(
    "patch, message",
    [
        ("train: {lrr: 1}", r"exp.yaml: train: unknown key 'lrr' \(did you mean 'lr'\?\); valid keys: lora_rank"),
        ("train: {lr: fast}", r"exp.yaml: train.lr: expected a number, got 'fast'"),
        ("train: {max_steps: 1.5}", r"train.max_steps: expected an integer"),
        ("knockout: {enabled: 1}", r"knockout.enabled: expected true or false"),
        ("modle: {}", r"unknown key 'modle' \(did you mean 'model'\?\)"),
        ("sweep: {evaluate.batch_size: [1, 2]}", r"sweep key 'evaluate.batch_size'"),
    ],
)
def test_bad_yaml_gives_one_clear_error(tmp_path, patch, message):
    section = patch.split(":")[0] + ":"  # the patch replaces that section (a repeated key is an error)
    base = "\n".join(line for line in YAML.splitlines() if not line.startswith(section))
    path = write(tmp_path, base + "\n" + patch + "\n")
    with pytest.raises(ConfigError, match=message):
        load_experiment(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("tasks.mdqa.n_train=-3", r"exp.yaml: tasks.mdqa.n_train: -3 is out of range; valid: >= 1$"),
        ("tasks.mdqa.target_tokens=-5", r"exp.yaml: tasks.mdqa.target_tokens: -5 is out of range; valid: >= 1$"),
        ("tasks.mdqa.n_eval=0", r"tasks.mdqa.n_eval: 0 is out of range; valid: >= 1$"),
        ("train.lr=nan", r"exp.yaml: train.lr: nan is not a finite number$"),
        ("train.lr=-1", r"exp.yaml: train.lr: -1.0 is out of range; valid: > 0$"),
        ("train.batch_size=0", r"train.batch_size: 0 is out of range; valid: >= 1$"),
        ("train.epochs=-1", r"train.epochs: -1.0 is out of range; valid: >= 0$"),
        ("train.warmup_ratio=1", r"train.warmup_ratio: 1.0 is out of range; valid: >= 0 and < 1$"),
        ("train.lora_target=everything", r"train.lora_target: 'everything' is not a valid choice; valid: attention, all$"),
        ("model.dtype=float33", r"model.dtype: 'float33' is not a valid choice \(did you mean 'float32'\?\); "
                                r"valid: auto, float32, float16, bfloat16$"),
        ("tasks.mdqa.head_kind=nope", r"tasks.mdqa.head_kind: 'nope' is not a valid choice; valid: retrieval, insight$"),
        ("knockout.variants=[real, nope]", r"knockout.variants\[1\]: 'nope' is not a valid choice; valid: real, "
                                           r"real_limited, hh, hl, lh, ll, symbolic, base$"),
        ("knockout.ks=[0, -2]", r"knockout.ks\[1\]: -2 is out of range; valid: >= 0$"),
        ("patching.source=nope", r"patching.source: 'nope' is not a valid choice; valid: real, real_limited"),
        ("evaluate.shard_size=0", r"evaluate.shard_size: 0 is out of range; valid: >= 1$"),
        ("seeds=[]", r"exp.yaml: seeds: must not be empty$"),
        ("synth.backend=nope", r"exp.yaml: synth.backend 'nope' is not one of template, hf, http, vllm$"),
        ("synth.top_p=2", r"exp.yaml: synth: need max_retries >= 0, timeout_s > 0, temperature >= 0, 0 < top_p <= 1$"),
        ("miniature.on_failed_check=ignore", r"exp.yaml: miniature.on_failed_check: 'ignore'; choose 'raise' or 'warn'$"),
        ("train.max_steps=-1", r"exp.yaml: train: epochs and max_steps: set epochs > 0 or max_steps > 0$"),
        ("sweep={train.lr: [1.0e-4, .nan]}", r"exp.yaml: sweep.train.lr\[1\]: nan is not a finite number$"),
        ("sweep={train.lora_rank: [4, 0]}", r"exp.yaml: sweep.train.lora_rank\[1\]: 0 is out of range; valid: >= 1$"),
        ("tasks.mdqa.sources.trian=x.jsonl", r"tasks.mdqa.sources: unknown source 'trian' \(did you mean 'train'\?\); "
                                             r"valid: train, eval, pool$"),
    ],
)
def test_values_no_run_can_use_are_refused_at_load_time(tmp_path, override, message):
    text = YAML.replace("train: {lr: 1.0e-4, max_steps: 5}", "train: {lr: 1.0e-4, epochs: 0, max_steps: 5}")
    if override.startswith("miniature"):
        text = text.replace("path: /models/tiny", "path: miniature")
    with pytest.raises(ConfigError, match=message):
        load_experiment(write(tmp_path, text), overrides=[override])


def test_source_files_must_exist(tmp_path, monkeypatch):
    present = tmp_path / "nq.jsonl.gz"
    present.write_text("")
    path = write(tmp_path, YAML)
    exp = load_experiment(path, overrides=[f"tasks.mdqa.sources.train={present}"])
    assert exp.task("mdqa").sources == {"train": str(present)}
    with pytest.raises(ConfigError, match=rf"exp.yaml: tasks.mdqa.sources.eval: {tmp_path}/gone.jsonl does not exist$"):
        load_experiment(path, overrides=[f"tasks.mdqa.sources.eval={tmp_path}/gone.jsonl"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"tasks.mdqa.sources.pool: data/x.jsonl does not exist \(relative to {tmp_path}\)"):
        load_experiment(path, overrides=["tasks.mdqa.sources.pool=data/x.jsonl"])
    assert load_experiment(path, overrides=["tasks.mdqa.sources.pool=data/x.jsonl"], check_sources=False)


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    text = YAML + "tasks:\n  summhay: {n_train: 5}\n"
    first = next(i for i, line in enumerate(textwrap.dedent(YAML).splitlines(), 1) if line.startswith("tasks:"))
    second = len(textwrap.dedent(YAML).splitlines()) + 1
    with pytest.raises(ConfigError, match=rf"exp.yaml:{second}: duplicate key 'tasks' \(first at line {first}\)"):
        load_experiment(write(tmp_path, text))
    nested = YAML.replace("    n_train: 20\n", "    n_train: 20\n    n_train: 30\n")
    with pytest.raises(ConfigError, match=r"exp.yaml:9: duplicate key 'n_train' \(first at line 8\)"):
        load_experiment(write(tmp_path, nested))


def test_unreadable_experiment_files(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match=r"adir: is a directory; expected the experiment file$"):
        load_experiment(tmp_path / "adir")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"bin.yaml: not a UTF-8 text file \(byte 6: invalid start byte\)$"):
        load_experiment(binary)
    with pytest.raises(ConfigError, match=r"exp.yaml: not valid YAML: .* \(line 2, column 1\)$"):
        load_experiment(write(tmp_path, "a: [1, 2\n"))


def test_unknown_task_and_variant_list_valid_choices(tmp_path):
    bad_task = YAML.replace("musique:", "musiq:")
    with pytest.raises(ConfigError, match=r"tasks.musiq: .*mdqa.*musique.*summhay"):
        load_experiment(write(tmp_path, bad_task))
    bad_variant = YAML.replace("[real, hh, base]", "[real, hx]")
    with pytest.raises(ConfigError, match=r"unknown variant 'hx'; valid: real, .*hh"):
        load_experiment(write(tmp_path, bad_variant))
    bad_option = YAML.replace("n_train: 20", "n_train: 20\n    options: {colour: red}")
    with pytest.raises(ConfigError, match=r"tasks.mdqa.options: unknown option 'colour'; valid: "):
        load_experiment(write(tmp_path, bad_option))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(write(tmp_path, "a: [1, 2"))
    with pytest.raises(ConfigError, match="missing required key 'path'"):
        load_experiment(write(tmp_path, YAML.replace("path: /models/tiny, ", "")))


def test_every_shipped_experiment_validates(tmp_path, monkeypatch):
    root = Path(__file__).parents[2] / "experiments"
    # miniature*.yaml are the base model's recipes, not experiments (test_miniature loads them)
    files = sorted(p for p in root.rglob("*.yaml") if not p.name.startswith("miniature"))
    assert len(files) == 11, files
    for path in files:
        # the paper's experiments name their data relative to the working directory
        (tmp_path / path.stem).mkdir()
        monkeypatch.chdir(tmp_path / path.stem)
        sources = [(t, k, v) for t, body in yaml.safe_load(path.read_text())["tasks"].items()
                   for k, v in (body or {}).get("sources", {}).items()]
        if sources:
            task, key, value = sources[0]
            with pytest.raises(ConfigError, match=rf"tasks\.{task}\.sources\.{key}: {value} does not exist"):
                load_experiment(path)
        for _, _, value in sources:
            Path(value).parent.mkdir(parents=True, exist_ok=True)
            Path(value).touch()
        assert expand(load_experiment(path))


def test_variant_options_touch_only_that_variant(tmp_path):
    path = write(tmp_path, YAML)
    exp = load_experiment(path)
    changed = load_experiment(path, overrides=["tasks.mdqa.variant_options.hh.filler=Sky."])
    for run in expand(exp):
        same = data_hash(exp, run) == data_hash(changed, run)
        assert same == ((run.task, run.variant) != ("mdqa", "hh")), run
    with pytest.raises(ConfigError, match=r"variant_options: 'xx' must be a variant of mdqa"):
        load_experiment(path, overrides=["tasks.mdqa.variant_options.xx.filler=a"])
    with pytest.raises(ConfigError, match=r"tasks.mdqa.variant_options.hh: unknown option 'nope'"):
        load_experiment(path, overrides=["tasks.mdqa.variant_options.hh.nope=1"])


def test_context_longer_than_the_model_takes_is_an_error(tmp_path):
    text = YAML.replace("rope_base: 80000}", "rope_base: 80000, max_context: 400}")
    with pytest.raises(ConfigError, match=r"tasks.mdqa.target_tokens \(500\) .* model.max_context \(400\)"):
        load_experiment(write(tmp_path, text))


def test_run_dir_is_absolute_for_workers_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = load_experiment(write(tmp_path, YAML + "run_dir: runs/x\n"))
    assert exp.resolved_run_dir() == tmp_path / "runs" / "x"


LIMITED_YAML = """
name: limited
model: {name: tiny, path: /models/tiny}
tasks:
  mdqa:
    variants: [real, real_limited, real_limited_l1, real_limited_l3, hh, base]
    options: {gold_position: 0}
    limited_options: {question_types: [what]}
    limited_variants:
      real_limited_l1: {question_types: [who, when, where]}
      real_limited_l3: {question_types: [who]}
"""


def test_named_limited_variants_each_take_their_own_options(tmp_path):
    exp = load_experiment(write(tmp_path, LIMITED_YAML))
    task = exp.task("mdqa")
    assert [r.label for r in expand(exp)] == ["real", "real_limited", "real_limited_l1", "real_limited_l3", "hh",
                                             "base"]
    assert task_options(task, "real_limited") == {"gold_position": 0, "question_types": ["what"]}
    assert task_options(task, "real_limited_l1") == {"gold_position": 0, "question_types": ["who", "when", "where"]}
    assert task_options(task, "real_limited_l3") == {"gold_position": 0, "question_types": ["who"]}
    assert task_options(task, "real") == task_options(task, "hh") == {"gold_position": 0}
    assert variant_kind("real_limited_l1") == "real_limited" and variant_kind("real_limited") == "real_limited"
    assert variant_kind("real") == "real" and variant_kind("real_limitedx") == "real_limitedx"


def test_a_limited_subset_hashes_only_its_own_options(tmp_path):
    path = write(tmp_path, LIMITED_YAML)
    exp = load_experiment(path)
    changed = load_experiment(path, overrides=["tasks.mdqa.limited_variants.real_limited_l3.question_types=[when]"])
    for run in expand(exp):
        same = data_hash(exp, run) == data_hash(changed, run)
        assert same == (run.variant != "real_limited_l3"), run
    # declaring one more subset leaves every existing dataset done
    more = load_experiment(path, overrides=["tasks.mdqa.limited_variants.real_limited_l2.question_types=[when]"])
    assert all(data_hash(exp, run) == data_hash(more, run) for run in expand(exp))
    # two subsets with the same options are still two datasets (two directories, two fine-tunes)
    twin = load_experiment(path, overrides=["tasks.mdqa.limited_variants.real_limited_l3.question_types=[who, when, "
                                            "where]"])
    by_label = {r.label: r for r in expand(twin)}
    assert data_hash(twin, by_label["real_limited_l1"]) != data_hash(twin, by_label["real_limited_l3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("tasks.mdqa.variants=[real, real_limited_l2]",
         r"tasks.mdqa.variants: 'real_limited_l2' is not declared in tasks.mdqa.limited_variants "
         r"\(declared: real_limited_l1, real_limited_l3\)"),
        ("tasks.mdqa.limited_variants.limited_l2.question_types=[who]",
         r"tasks.mdqa.limited_variants: 'limited_l2' must be named real_limited_<name>"),
        ("tasks.mdqa.limited_variants.real_limited_L2.question_types=[who]",
         r"tasks.mdqa.limited_variants: 'real_limited_L2' must be named real_limited_<name>"),
        ("tasks.mdqa.limited_variants.real_limited_a-b.question_types=[who]",
         r"tasks.mdqa.limited_variants: 'real_limited_a-b' must be named"),
        ("tasks.mdqa.limited_variants.real_limited_l1.question_kinds=[who]",
         r"tasks.mdqa.limited_variants.real_limited_l1: unknown option 'question_kinds'"),
    ],
)
def test_bad_limited_variants_give_one_clear_error(tmp_path, override, message):
    path = write(tmp_path, LIMITED_YAML)
    with pytest.raises(ConfigError, match=message) as err:
        load_experiment(path, overrides=[override])
    assert str(path) in str(err.value)


def test_scoring_readings_default_to_the_papers_and_key_the_evaluation(tmp_path):
    path = write(tmp_path, YAML)
    exp = load_experiment(path)
    assert (exp.scoring.argmax_over, exp.scoring.count) == ("all", "unique")
    run = expand(exp)[0]
    prompt_only = load_experiment(path, overrides=["scoring.argmax_over=prompt"])
    repeats = load_experiment(path, overrides=["scoring.count=repeats"])
    hashes = {eval_hash(e, run, "own") for e in (exp, prompt_only, repeats)}
    assert len(hashes) == 3  # each reading is its own evaluation
    assert train_hash(exp, run) == train_hash(repeats, run)  # and trains nothing anew
    with pytest.raises(ConfigError, match=r"exp.yaml: scoring.argmax_over: 'keys' is not one of all, prompt"):
        load_experiment(path, overrides=["scoring.argmax_over=keys"])
    with pytest.raises(ConfigError, match=r"exp.yaml: scoring.count: 'twice' is not one of unique, repeats"):
        load_experiment(path, overrides=["scoring.count=twice"])
    with pytest.raises(ConfigError, match=r"scoring: unknown key 'argmax'"):
        load_experiment(path, overrides=["scoring.argmax=all"])
    heads = load_experiment(path, overrides=["knockout.heads_from=theirs.json", "patching.heads_from=q.yaml"])
    assert (heads.knockout.heads_from, heads.patching.heads_from) == ("theirs.json", "q.yaml")


def test_run_labels_format_and_parse_back():
    from engine.config import label_variant, run_label
    from tasks import head_kind

    assert run_label("hh") == "hh"
    assert run_label("hh", 1, (("train.lr", 0.0001), ("train.epochs", 2))) == "hh-s1@lr=0.0001@epochs=2"
    assert run_label("real_limited_l1", 0) == "real_limited_l1-s0"
    for label in ("hh", "hh-s1@lr=0.0001@epochs=2", "hh@lr=0.0001"):
        assert label_variant(label) == "hh"
    assert label_variant("real_limited_l1-s0") == "real_limited_l1"
    # the head kind a task defines H_X by comes from the task module
    assert [head_kind(t) for t in ("mdqa", "musique", "summhay", "needle", "other")] == \
        ["retrieval", "retrieval", "insight", "retrieval", "retrieval"]
