"""Experiment YAML -> frozen dataclasses, grid expansion and content hashes per stage.

One YAML file describes one experiment grid: a model, the tasks with their variants, and
the settings of every stage. Keys map one-to-one onto the dataclasses below; an unknown,
mistyped, duplicated or out-of-range key, a value outside its choices and a source file that
does not exist are each an error naming the file, the key and what is valid, raised here at
load time, before any stage runs. `needlework data build` validates its flags through the
same functions (`parse_task`, `check_target_tokens`).

Example:
    >>> exp = load_experiment("experiments/demo.yaml", overrides=["train.lr=1e-4"])
    >>> [run.label for run in expand(exp) if run.task == "mdqa"]
    ['real', 'hh', 'hl', 'lh', 'll', 'symbolic', 'base']
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks import get_task

VARIANTS = ("real", "real_limited", "hh", "hl", "lh", "ll", "symbolic", "base")
SYNTHETIC_VARIANTS = ("hh", "hl", "lh", "ll", "symbolic")
LIMITED = "real_limited"
# A named limited variant, `real_limited_<name>`: one more `real_limited` subset with its own
# options (the paper's MDQA L1-L3). The name may not hold "-" or "@": labels append "-s<seed>"
# and "@<key>=<value>" to it (`run_label`), and `label_variant` splits them off there.
NAMED_LIMITED = re.compile(rf"{LIMITED}_[a-z0-9_]+")
STAGES = ("data", "train", "evaluate", "knockout", "patching", "report")


DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2")  # the backends inline scoring runs on
HEAD_KINDS = ("retrieval", "insight")
LORA_TARGETS = ("attention", "all")


class ConfigError(ValueError):
    """A bad experiment file: names the file and the key."""


# The valid values of a field live in its metadata; `build` checks them for every section.
def at_least(low: float) -> dict:
    return {"min": low}


def above(low: float) -> dict:
    return {"gt": low}


def in_range(low: float, below: float) -> dict:
    """[low, below)."""
    return {"min": low, "lt": below}


def one_of(*choices: str) -> dict:
    return {"choices": choices}


def each(limits: dict) -> dict:
    """Limits on every item of a tuple."""
    return {"each": limits}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    # local dir, hub id, "miniature" (the engine pretrains the bundled base model), or a model that
    # `needlework models fetch` knows (engine.model_sources.SOURCES, e.g. smollm2-135m-instruct)
    path: str
    rope_base: float | None = field(default=None, metadata=above(0))  # the raised base of every fine-tune and evaluation
    sliding_window: int | None = field(default=None, metadata=at_least(1))
    max_context: int = field(default=32768, metadata=at_least(2))
    # "auto": bfloat16 on GPU, float32 on CPU (engine.placement.resolve_placement)
    dtype: str = field(default="auto", metadata=one_of(*DTYPES))
    trust_remote_code: bool = False
    # None: FlashAttention-2 wherever it can run (GPU, flash-attn, 16-bit dtype), else SDPA;
    # "flash_attention_2" where it cannot run is an error when the model loads
    attn_implementation: str | None = field(default=None, metadata=one_of(*ATTN_IMPLEMENTATIONS))
    # prompt (and train) through the tokenizer's chat template; None: when the tokenizer has one
    chat_template: bool | None = None


@dataclass(frozen=True)
class TaskConfig:
    name: str
    variants: tuple[str, ...] = ("real", "hh", "hl", "lh", "ll", "symbolic", "base")
    sources: dict = field(default_factory=dict)  # source key -> local path
    options: dict = field(default_factory=dict)  # task options, validated by the task
    limited_options: dict = field(default_factory=dict)  # extra options of real_limited
    # named limited variants: `real_limited_<name>` -> its options (instead of limited_options)
    limited_variants: dict = field(default_factory=dict)
    variant_options: dict = field(default_factory=dict)  # variant -> options for that variant only
    n_train: int = field(default=400, metadata=at_least(1))  # train + validation examples
    n_eval: int = field(default=100, metadata=at_least(1))  # every experiment evaluates on the real task
    target_tokens: int = field(default=32000, metadata=at_least(1))
    head_kind: str | None = field(default=None, metadata=one_of(*HEAD_KINDS))  # None: the task's default


@dataclass(frozen=True)
class TrainConfig:
    lora_rank: int = field(default=8, metadata=at_least(1))
    lora_alpha: int = field(default=8, metadata=at_least(1))
    lora_dropout: float = field(default=0.0, metadata=in_range(0, 1))
    lora_target: str = field(default="attention", metadata=one_of(*LORA_TARGETS))
    batch_size: int = field(default=1, metadata=at_least(1))
    grad_accum: int = field(default=4, metadata=at_least(1))
    lr: float = field(default=5e-5, metadata=above(0))
    epochs: float = field(default=1.0, metadata=at_least(0))
    max_steps: int = field(default=-1, metadata=at_least(-1))  # -1: from epochs
    warmup_ratio: float = field(default=0.0, metadata=in_range(0, 1))
    weight_decay: float = field(default=0.0, metadata=at_least(0))
    max_length: int = field(default=32768, metadata=at_least(2))
    gradient_checkpointing: bool = False  # recompute activations in backward: 32K contexts on 7-8B models
    num_workers: int = field(default=1, metadata=at_least(1))
    cpus_per_worker: float = field(default=1, metadata=above(0))
    gpus_per_worker: float = field(default=0, metadata=at_least(0))
    deepspeed: dict | None = None
    storage_path: str | None = None
    save_steps: int = field(default=50, metadata=at_least(1))
    max_failures: int = field(default=2, metadata=at_least(-1))  # -1: retry forever (Ray Train)
    max_concurrent: int | None = field(default=None, metadata=at_least(1))  # None: from cluster resources
    ray_env: dict | None = None  # env of each run's Ray Train controller and workers (not hashed)

    def __post_init__(self):
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("epochs and max_steps: set epochs > 0 or max_steps > 0")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = field(default=4, metadata=at_least(1))
    max_new_tokens: int | None = field(default=None, metadata=at_least(1))  # None: the task's default
    num_actors: int | None = field(default=None, metadata=at_least(1))  # None: as many as the cluster fits
    cpus_per_actor: float = field(default=1, metadata=above(0))
    gpus_per_actor: float = field(default=0, metadata=at_least(0))
    shard_size: int = field(default=16, metadata=at_least(1))
    max_retries: int = field(default=3, metadata=at_least(0))
    timeout_s: float | None = field(default=None, metadata=above(0))  # a shard running longer is retried
    keep_shards: bool = False  # keep each job's shard files beside its merged outputs
    insight_strict: bool = False
    limit: int | None = field(default=None, metadata=at_least(1))  # evaluate only the first N examples


# How the evaluation pool runs, not what it computes: left out of every evaluation hash.
EVALUATE_RUNTIME = ("num_actors", "cpus_per_actor", "max_retries", "timeout_s", "keep_shards")


@dataclass(frozen=True)
class ScoringConfig:
    """Which reading of the retrieval score (Eq. 1) the inline scorer computes (engine/head_scores.py)."""

    argmax_over: str = "all"  # all: every visible key (the paper, Wu et al.) | prompt: prompt keys only
    count: str = "unique"  # unique: each answer position once (Eq. 1) | repeats: every step (Wu et al.'s code)


SCORING_CHOICES = {"argmax_over": ("all", "prompt"), "count": ("unique", "repeats")}


@dataclass(frozen=True)
class KnockoutConfig:
    enabled: bool = True
    ks: tuple[int, ...] = field(default=(0, 10, 20, 50, 100), metadata=each(at_least(0)))
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = field(default=("real",), metadata=each(one_of(*VARIANTS)))
    # rank heads by this file (Retrieval_Head/HeadKV JSON, QRHead YAML or JSON, Parquet, CSV:
    # analyses/interop.py) instead of each model's own scores
    heads_from: str | None = None


@dataclass(frozen=True)
class PatchingConfig:
    enabled: bool = True
    source: str = field(default="real", metadata=one_of(*VARIANTS))
    variants: tuple[str, ...] | None = field(default=None, metadata=each(one_of(*VARIANTS)))  # None: every synthetic variant trained
    seeds: tuple[int, ...] = (0,)
    heads_from: str | None = None  # H_real read from this head-score file instead of the source model's


@dataclass(frozen=True)
class Experiment:
    name: str
    model: ModelConfig
    tasks: tuple[TaskConfig, ...]
    run_dir: str | None = None
    seeds: tuple[int, ...] = field(default=(0,), metadata={"nonempty": True})
    synth: Any = None  # engine.synth.config.SynthConfig
    miniature: Any = None  # engine.miniature.spec.MiniatureSpec, when model.path == "miniature"
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    scoring: ScoringConfig = ScoringConfig()
    knockout: KnockoutConfig = KnockoutConfig()
    patching: PatchingConfig = PatchingConfig()
    sweep: dict = field(default_factory=dict)  # dotted key -> list of values
    source_file: str = ""

    def resolved_run_dir(self) -> Path:
        # Absolute: Ray Train workers and actors do not share the driver's working directory.
        return Path(self.run_dir or f"runs/{self.name}").resolve()

    def task(self, name: str) -> TaskConfig:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)


@dataclass(frozen=True)
class Run:
    """One cell of the grid: a task, a variant, a seed and any swept settings."""

    task: str
    variant: str
    seed: int
    overrides: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    @property
    def fine_tuned(self) -> bool:
        return self.variant != "base"


# ----------------------------------------------------------------------------- parsing


def _section_class(name: str) -> type:
    """Sections whose dataclasses live with their stage, each in a module of its own; imported
    only when used (the miniature's package loads torch)."""
    if name == "synth":
        from engine.synth.config import SynthConfig

        return SynthConfig
    from engine.miniature.spec import MiniatureSpec

    return MiniatureSpec


SECTIONS = ("synth", "miniature")


def load_experiment(path: str | Path, overrides: typing.Sequence[str] = (), check_sources: bool = True) -> Experiment:
    """Reads an experiment YAML, applies `key=value` overrides and validates every key.

    Args:
        path: the experiment file.
        overrides: dotted `key=value` settings applied on top of the file.
        check_sources: require every `tasks.<task>.sources` path to exist.

    Raises:
        ConfigError: the first problem found, naming the file and the key (or line).
    """
    raw = read_yaml(path, "experiment file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        apply_override(raw, item, source=str(path))
    return parse_experiment(raw, source=str(path), check_sources=check_sources)



def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()):
    """Reads a miniature recipe (experiments/miniature.yaml: the fields of
    `engine.miniature.MiniatureSpec`), validated like an experiment's sections."""
    raw = read_yaml(path, "recipe file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        apply_override(raw, item, source=str(path))
    return build(_section_class("miniature"), raw, f"{path}:")


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document in `path`, with one clear error for a missing, unreadable or
    malformed file and for a mapping that repeats a key (YAML would keep only the last)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such {what}")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; expected the {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    try:
        _check_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        from engine.store import yaml_problem

        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(err)}") from None


def _check_duplicate_keys(node, path: Path, seen_nodes: set | None = None) -> None:
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if node is None or id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name != "<<":
                line = key.start_mark.line + 1
                if name in first:
                    raise ConfigError(f"{path}:{line}: duplicate key {name!r} (first at line {first[name]}); "
                                      f"YAML would silently keep only the last")
                first[name] = line
            _check_duplicate_keys(value, path, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, path, seen_nodes)


def apply_override(raw: dict, item: str, source: str = "command line") -> None:
    """Sets a dotted key (`train.lr=1e-4`, `tasks.mdqa.n_train=50`) in the raw YAML mapping."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: override {key!r}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = yaml.safe_load(value)


def parse_experiment(raw: dict, source: str = "<experiment>", check_sources: bool = True) -> Experiment:
    raw = dict(raw)
    tasks_raw = raw.pop("tasks", None)
    if not isinstance(tasks_raw, dict) or not tasks_raw:
        raise ConfigError(f"{source}: 'tasks' must map task names to their settings")
    tasks = []
    for name, body in tasks_raw.items():
        tasks.append(parse_task(name, body or {}, source, check_sources=check_sources))
    values: dict[str, Any] = {"tasks": tuple(tasks), "source_file": source}
    for key, value in raw.items():
        if key in SECTIONS:
            values[key] = build(_section_class(key), value or {}, f"{source}: {key}")
    rest = {k: v for k, v in raw.items() if k not in SECTIONS}
    experiment = build(Experiment, {**rest, **values}, f"{source}:", prebuilt=set(values))
    if experiment.synth is None:
        experiment = dataclasses.replace(experiment, synth=_section_class("synth")())
    if experiment.model.path == "miniature" and experiment.miniature is None:
        experiment = dataclasses.replace(experiment, miniature=_section_class("miniature")())
    _check_sweep(experiment, source)
    for key, choices in SCORING_CHOICES.items():
        if getattr(experiment.scoring, key) not in choices:
            raise ConfigError(f"{source}: scoring.{key}: {getattr(experiment.scoring, key)!r} is not one of "
                              f"{', '.join(choices)}")
    for task in experiment.tasks:
        check_target_tokens(task.target_tokens, experiment.model.max_context,
                            f"{source}: tasks.{task.name}.target_tokens",
                            f"model.max_context ({experiment.model.max_context})")
    return experiment


def check_target_tokens(target_tokens: int, max_context: int | None, where: str, limit: str, hint: str = "") -> None:
    """A prompt of `target_tokens` must leave room for the answer within `max_context` (`limit` names it)."""
    if max_context is not None and target_tokens >= max_context:
        raise ConfigError(f"{where} ({target_tokens}) leaves no room for the answer within {limit}; "
                          f"valid: 1 to {max_context - 1}{hint}")


def parse_task(name: str, body: Any, source: str, check_sources: bool = True) -> TaskConfig:
    """One task's settings (`tasks.<name>` of an experiment YAML), checked against the task.

    Raises:
        ConfigError: an unknown task, variant, option or source key, a value out of range, or
            (with `check_sources`) a source path that does not exist.
    """
    try:
        module = get_task(name)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{source}: tasks.{name}: {err}") from err
    if not isinstance(body, dict):
        raise ConfigError(f"{source}: tasks.{name}: expected a mapping of settings, got {type(body).__name__}")
    config = build(TaskConfig, {"name": name, **body}, f"{source}: tasks.{name}")
    for limited, options in config.limited_variants.items():
        if LIMITED not in module.VARIANTS:
            raise ConfigError(f"{source}: tasks.{name}.limited_variants: {name} has no {LIMITED} variant")
        if not NAMED_LIMITED.fullmatch(str(limited)) or not isinstance(options, dict):
            raise ConfigError(f"{source}: tasks.{name}.limited_variants: {limited!r} must be named "
                              f"{LIMITED}_<name> (lower-case letters, digits, _) and map to options")
    known = (*module.VARIANTS, *config.limited_variants)
    valid = [v for v in VARIANTS if v in module.VARIANTS or v == "base"] + list(config.limited_variants)
    for variant in config.variants:
        if variant in valid:
            continue
        if variant_kind(variant) == LIMITED and LIMITED in module.VARIANTS:
            declared = ", ".join(config.limited_variants) or "none"
            raise ConfigError(f"{source}: tasks.{name}.variants: {variant!r} is not declared in "
                              f"tasks.{name}.limited_variants (declared: {declared})")
        raise ConfigError(f"{source}: tasks.{name}.variants: unknown variant {variant!r}; valid: {', '.join(valid)}")
    for variant, options in config.variant_options.items():
        if variant not in known or not isinstance(options, dict):
            raise ConfigError(f"{source}: tasks.{name}.variant_options: {variant!r} must be a variant of "
                              f"{name} ({', '.join(known)}) mapping to options")
    option_sets = {"options": config.options, "limited_options": config.limited_options,
                   **{f"limited_variants.{v}": o for v, o in config.limited_variants.items()},
                   **{f"variant_options.{v}": o for v, o in config.variant_options.items()}}
    for key, options in option_sets.items():
        unknown = sorted(set(options) - set(module.OPTIONS))
        if unknown:
            raise ConfigError(
                f"{source}: tasks.{name}.{key}: unknown option {unknown[0]!r}; "
                f"valid: {', '.join(sorted(module.OPTIONS))}"
            )
    unknown = sorted(set(config.sources) - set(module.SOURCES))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), module.SOURCES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{source}: tasks.{name}.sources: unknown source {unknown[0]!r}{hint}; valid: {', '.join(module.SOURCES)}"
        )
    for key, value in config.sources.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: tasks.{name}.sources.{key}: expected a file path, got {value!r}")
        if check_sources and not Path(value).expanduser().exists():
            raise ConfigError(f"{source}: tasks.{name}.sources.{key}: {value} does not exist"
                              + ("" if Path(value).is_absolute() else f" (relative to {Path.cwd()})"))
    return config


def variant_kind(variant: str) -> str:
    """The task variant a name builds: `real_limited_l1` is a `real_limited`; others are themselves."""
    return LIMITED if NAMED_LIMITED.fullmatch(variant) else variant


def build(cls, data: Any, where: str, prebuilt: set[str] = frozenset()):
    """Builds frozen dataclass `cls` from a mapping, checking every key and type."""
    if dataclasses.is_dataclass(data):
        return data
    where_key = where
    where = where.rstrip(":")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in fields or key == "source_file" and key not in prebuilt:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            valid = ", ".join(f for f in fields if f != "source_file")
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: {valid}")
        if key in prebuilt:
            values[key] = value
        else:
            values[key] = _coerce(value, hints[key], _join(where_key, key))
            check_limits(values[key], fields[key].metadata, _join(where_key, key))
    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key {missing[0]!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # a section's own checks (__post_init__)
        message = str(err)
        section = where.rsplit(" ", 1)[-1]
        if message.startswith(section) and where.endswith(" " + section):
            raise ConfigError(f"{where[: -len(section)].rstrip()} {message}") from None
        raise ConfigError(f"{where}: {message}") from None


def check_limits(value: Any, limits: typing.Mapping, where: str) -> None:
    """Checks `value` against a field's limits (`at_least`, `above`, `in_range`, `one_of`, `each`)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if "each" in limits:
        for i, item in enumerate(value):
            check_limits(item, limits["each"], f"{where}[{i}]")
    if limits.get("nonempty") and not value:
        raise ConfigError(f"{where}: must not be empty")
    if "choices" in limits and value not in limits["choices"]:
        close = difflib.get_close_matches(str(value), [str(c) for c in limits["choices"]], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: {value!r} is not a valid choice{hint}; valid: {', '.join(map(str, limits['choices']))}")
    low, above_, below = limits.get("min"), limits.get("gt"), limits.get("lt")
    if (low is not None and value < low) or (above_ is not None and value <= above_) or (below is not None and value >= below):
        bounds = [f">= {low:g}" if low is not None else "", f"> {above_:g}" if above_ is not None else "",
                  f"< {below:g}" if below is not None else ""]
        raise ConfigError(f"{where}: {value!r} is out of range; valid: {' and '.join(b for b in bounds if b)}")


def _join(where: str, key: str) -> str:
    """`file.yaml: train.lr`: the file, then the dotted key inside it."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _check_sweep(experiment: Experiment, source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    for key, values in experiment.sweep.items():
        section, _, name = key.partition(".")
        if section != "train" or name not in fields:
            raise ConfigError(f"{source}: sweep key {key!r}: only train.<key> can be swept")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: sweep.{key}: expected a non-empty list of values")
        for i, value in enumerate(values):  # each swept value must be one the train section accepts
            where = f"{source}: sweep.{key}[{i}]"
            value = _coerce(value, hints[name], where)
            check_limits(value, fields[name].metadata, where)
            try:
                dataclasses.replace(experiment.train, **{name: value})
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{where}: {err}") from None


# ----------------------------------------------------------------------------- grid


def expand(experiment: Experiment) -> list[Run]:
    """Expands the grid: task x variant x seed x every swept value (fine-tuned variants only)."""
    sweep_keys = sorted(experiment.sweep)
    combos = list(itertools.product(*(experiment.sweep[k] for k in sweep_keys))) or [()]
    runs = []
    for task in experiment.tasks:
        for variant in task.variants:
            seeds = experiment.seeds if variant != "base" else experiment.seeds[:1]
            for seed in seeds:
                for combo in combos if variant != "base" else [()]:
                    overrides = tuple(zip(sweep_keys, combo))
                    seeded = len(experiment.seeds) > 1 and variant != "base"
                    label = run_label(variant, seed if seeded else None, overrides)
                    runs.append(Run(task.name, variant, seed, overrides, label))
    return runs


def run_label(variant: str, seed: int | None = None, overrides: typing.Sequence[tuple[str, Any]] = ()) -> str:
    """A run's label, its directory name under models/ and eval/: the variant, `-s<seed>` when the
    grid has several seeds, `@<key>=<value>` per swept train key (`hh-s1@lr=0.0001`)."""
    label = variant if seed is None else f"{variant}-s{seed}"
    return label + "".join(f"@{key.split('.', 1)[-1]}={value}" for key, value in overrides)


def label_variant(label: str) -> str:
    """The variant a run label names (`run_label`'s inverse for the variant): "hh-s1" and
    "hh@lr=0.0001" are both "hh". Variant names hold neither "-" nor "@"."""
    return re.split(r"[-@]", label, maxsplit=1)[0]


def task_options(task: TaskConfig, variant: str) -> dict:
    """The options one variant is built with: shared, then its limited set's, then its own.

    `real_limited` takes `limited_options`; a named limited variant takes its entry of
    `limited_variants` instead, so each subset is exactly what its own entry says.
    """
    limited = task.limited_options if variant == LIMITED else task.limited_variants.get(variant, {})
    return {**task.options, **limited, **task.variant_options.get(variant, {})}


def train_config(experiment: Experiment, run: Run) -> TrainConfig:
    changes = {key.split(".", 1)[1]: value for key, value in run.overrides}
    return dataclasses.replace(experiment.train, **changes)


# ----------------------------------------------------------------------------- hashes


def content_hash(*parts: Any) -> str:
    """A stable hash of JSON-able parts (dataclasses included), equal across processes."""
    blob = json.dumps([_jsonable(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def data_hash(experiment: Experiment, run: Run) -> str:
    task = experiment.task(run.task)
    variant = "real" if run.variant == "base" else run.variant
    # Only what builds this variant: its resolved options, not other variants' (so declaring or
    # changing one limited subset leaves every other dataset done).
    task_part = dataclasses.replace(task, variants=(), head_kind=None, options={}, limited_options={},
                                    limited_variants={}, variant_options={},
                                    n_eval=task.n_eval if variant == "real" else 0)
    synth = experiment.synth if variant in SYNTHETIC_VARIANTS else None
    # Datasets do not depend on the training seed: every seed of a variant trains on the same data.
    return content_hash("data", experiment.model.path, experiment.miniature, task_part, variant, synth,
                        task_options(task, variant))


def train_hash(experiment: Experiment, run: Run) -> str:
    model = dataclasses.replace(experiment.model, name="")
    config = dataclasses.replace(train_config(experiment, run), max_concurrent=None, ray_env=None)
    return content_hash("train", data_hash(experiment, run), model, config, run.seed)


def eval_hash(experiment: Experiment, run: Run, split: str) -> str:
    upstream = train_hash(experiment, run) if run.fine_tuned else content_hash(experiment.model)
    data = data_hash(experiment, Run(run.task, "real", 0) if split == "real" or not run.fine_tuned else run)
    settings = dataclasses.replace(experiment.evaluate, **{key: None for key in EVALUATE_RUNTIME})
    return content_hash("evaluate", upstream, data, split, settings, experiment.task(run.task).head_kind,
                        experiment.scoring)


def to_dict(experiment: Experiment) -> dict:
    """The resolved config as plain YAML-able data (written into the run directory)."""
    data = _jsonable(experiment)
    data["tasks"] = {t.pop("name"): t for t in data["tasks"]}
    data.pop("source_file", None)
    return data
