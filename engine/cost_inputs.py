"""The inputs of a cost estimate: the largest cluster, its prices, and seconds per token.

- `cluster.yaml`: the node types and `max_workers` of each; the largest cluster the autoscaler
  may build (spot node types are left out: their capacity is not guaranteed).
- `prices.yaml`: a dated table of on-demand prices, GPUs and vCPUs per instance type.
- per-token costs: measured, from `<run_dir>/calibration.json` (`scripts/bench_cost.py`), or
  stated: `throughput.yaml`'s GPU specs and model shapes with assumed utilizations, turned into
  seconds per token by `stated_rates` (the formulas are written out in that file).

Example:
    >>> prices = load_prices("data/costs/prices.yaml")
    >>> cluster = load_cluster("cluster.yaml", prices)
    >>> cluster.gpus, cluster.usd_per_gpu_hour(1)
    (24, 12.29)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = "calibration.json"
RATE_FIELDS = ("train_s_per_token", "prefill_s_per_token", "decode_s_per_token", "train_startup_s", "load_s")


class CostError(ValueError):
    """An input the cost estimate cannot use: names the file and key."""


@dataclass(frozen=True)
class InstanceType:
    name: str
    usd_per_hour: float
    gpus: int
    vcpus: int
    gpu: str | None = None


@dataclass(frozen=True)
class Prices:
    date: str
    region: str
    instances: dict[str, InstanceType]
    source: str  # the file


@dataclass(frozen=True)
class Cluster:
    """The largest cluster: worker nodes at their maximum counts, and the head."""

    head: InstanceType
    workers: tuple[tuple[InstanceType, int], ...]  # (type, count), most GPUs per node first
    prices: Prices

    @property
    def gpus(self) -> int:
        return sum(t.gpus * n for t, n in self.workers)

    @property
    def gpu(self) -> str | None:
        kinds = {t.gpu for t, _ in self.workers if t.gpus}
        if len(kinds) > 1:
            raise CostError(f"cluster mixes GPU types {sorted(kinds)}; the estimate assumes one")
        return next(iter(kinds), None)

    def slots(self, gpus_per_job: float) -> int:
        """Jobs of `gpus_per_job` GPUs that fit at once (a job stays on one node)."""
        return sum(int(t.gpus // gpus_per_job) * n for t, n in self.workers if t.gpus >= gpus_per_job)

    def usd_per_gpu_hour(self, gpus_per_job: float) -> float:
        """The cheapest on-demand price per GPU-hour among node types a job of this size fits on."""
        fits = [t.usd_per_hour / t.gpus for t, _ in self.workers if t.gpus >= gpus_per_job]
        if not fits:
            raise CostError(f"no node type of the cluster has {gpus_per_job:g} GPUs for one job")
        return min(fits)


@dataclass(frozen=True)
class Rates:
    """Seconds of one GPU (of a CPU slot, for jobs that ask no GPU) per unit of work."""

    train_s_per_token: float
    prefill_s_per_token: float
    decode_s_per_token: float  # per generated token of one sequence, at the evaluation batch size
    train_startup_s: float  # per fine-tune
    load_s: float  # per model an evaluation actor loads
    source: str


@dataclass(frozen=True)
class SynthRates:
    """One synthesis engine (`gpus` GPUs): seconds per prompt and generated token, start-up per call."""

    prefill_s_per_token: float
    decode_s_per_token: float
    startup_s: float
    prompt_tokens: int
    gpus: int
    source: str


def _yaml(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CostError(f"{path}: no such {what} file")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise CostError(f"{path}: expected a mapping at the top level")
    return data


def _need(data: dict, key: str, where: str):
    if not isinstance(data, dict) or key not in data:
        raise CostError(f"{where}: missing key {key!r}")
    return data[key]


def load_prices(path: str | Path = ROOT / "data/costs/prices.yaml") -> Prices:
    data = _yaml(path, "price table")
    instances = {}
    for name, body in (_need(data, "instances", str(path)) or {}).items():
        where = f"{path}: instances.{name}"
        try:
            instances[name] = InstanceType(name, float(_need(body, "usd_per_hour", where)),
                                           int(_need(body, "gpus", where)), int(_need(body, "vcpus", where)),
                                           body.get("gpu"))
        except (TypeError, ValueError) as err:
            raise CostError(f"{where}: {err}") from err
    return Prices(str(_need(data, "date", str(path))), str(data.get("region", "")), instances, str(path))


def load_cluster(path: str | Path, prices: Prices) -> Cluster:
    """The largest on-demand cluster `path` allows, node types priced from `prices`."""
    data = _yaml(path, "cluster")
    types = _need(data, "available_node_types", str(path))
    head_name = _need(data, "head_node_type", str(path))

    def instance(name: str) -> InstanceType:
        kind = _need(_need(types[name], "node_config", f"{path}: available_node_types.{name}"), "InstanceType",
                     f"{path}: available_node_types.{name}.node_config")
        if kind not in prices.instances:
            raise CostError(f"{path}: node type {name!r} is {kind}, which {prices.source} does not price; "
                            f"priced: {', '.join(sorted(prices.instances))}")
        return prices.instances[kind]

    workers = []
    for name, body in types.items():
        spot = (body.get("node_config", {}).get("InstanceMarketOptions") or {}).get("MarketType") == "spot"
        if name != head_name and not spot and int(body.get("max_workers", 0)) > 0:
            workers.append((instance(name), int(body["max_workers"])))
    # The cluster-wide cap binds first on the types with most GPUs per node: fill those first.
    workers.sort(key=lambda tn: -tn[0].gpus)
    room, capped = int(data.get("max_workers", sum(n for _, n in workers))), []
    for kind, n in workers:
        take = min(n, room)
        room -= take
        if take:
            capped.append((kind, take))
    return Cluster(instance(head_name), tuple(capped), prices)


# ----------------------------------------------------------------------------- per-token costs


@dataclass(frozen=True)
class ModelShape:
    params: float
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    sliding_window: int | None = None


def _shape(table: dict, model: str, where: str) -> ModelShape:
    body = (table.get("models") or {}).get(model)
    if body is None:
        raise CostError(f"{where}: no shape for model {model!r}; measure its costs with scripts/bench_cost.py "
                        f"(writes {CALIBRATION} into the run directory) or add it under models:")
    values = {}
    for f in fields(ModelShape):
        if f.name in body and body[f.name] is not None:
            values[f.name] = _number(body[f.name], f"{where}: models.{model}.{f.name}",
                                     float if f.name == "params" else int)
    try:
        return ModelShape(**values)
    except TypeError as err:
        raise CostError(f"{where}: models.{model}: {err}") from err


def _number(value, where: str, kind=float):
    # YAML reads 8.03e9 (no sign in the exponent) as a string; accept it as the number it is.
    try:
        return kind(float(value)) if kind is int else float(value)
    except (TypeError, ValueError):
        raise CostError(f"{where}: expected a number, got {value!r}") from None


def _numbers(body: dict, where: str) -> dict:
    return {k: _number(v, f"{where}.{k}") for k, v in body.items() if k != "source"}


def attended_keys(context: int, window: int | None) -> float:
    """Keys a query attends on average over a causal sequence of `context` tokens (continuous)."""
    if window is None or window >= context:
        return context / 2
    return window - window * window / (2 * context)


def forward_flops(shape: ModelShape, context: int, window: int | None) -> float:
    """FLOPs per token of one forward pass: the matmuls (the input embedding is a lookup) and attention."""
    return 2 * (shape.params - shape.vocab * shape.hidden) + attention_flops(shape, context, window)


def attention_flops(shape: ModelShape, context: int, window: int | None) -> float:
    # q.k and (attention).v, 2 FLOPs per multiply-add each, per attended key
    return 4 * shape.layers * shape.heads * shape.head_dim * attended_keys(context, window)


def decode_step_s(shape: ModelShape, gpu: dict, a: dict, context: int, window: int | None, batch: int,
                  n_gpus: int = 1) -> float:
    """One decode step of `batch` sequences: memory-bound (weights and KV cache) or compute-bound."""
    keys = context if window is None else min(context, window)
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * a["bytes_per_param"] * keys  # per sequence
    memory = (shape.params * a["bytes_per_param"] + batch * kv) / (n_gpus * gpu["memory_bytes_per_s"] *
                                                                    a["memory_efficiency"])
    per_token = 2 * (shape.params - shape.vocab * shape.hidden) + 4 * shape.layers * shape.heads * shape.head_dim * keys
    compute = batch * per_token / (n_gpus * gpu["bf16_flops"] * a["prefill_mfu"])
    return max(memory, compute) + a["decode_step_overhead_s"]


def stated_rates(table: dict, model: str, gpu_name: str | None, context: int, window: int | None, batch: int,
                 checkpointing: bool, where: str = "throughput.yaml") -> Rates:
    """Seconds per token on one GPU, from the model's shape, the GPU's specs and the assumptions."""
    shape = _shape(table, model, where)
    gpu = _gpu(table, gpu_name, where)
    a = _numbers(_need(table, "assumptions", where), f"{where}: assumptions")
    window = window or shape.sliding_window
    matmul = 2 * (shape.params - shape.vocab * shape.hidden)
    attention = attention_flops(shape, context, window)
    # LoRA leaves the base frozen: backward computes input gradients (one more matmul pass) and
    # FlashAttention-2's backward costs ~2.5 forward attentions; checkpointing adds a forward.
    train = (3 if checkpointing else 2) * matmul + (4.5 if checkpointing else 3.5) * attention
    peak = gpu["bf16_flops"]
    return Rates(
        train_s_per_token=train / (peak * a["train_mfu"]),
        prefill_s_per_token=(matmul + attention) / (peak * a["prefill_mfu"]),
        decode_s_per_token=decode_step_s(shape, gpu, a, context, window, batch) / batch,
        train_startup_s=float(a["train_startup_s"]),
        load_s=float(a["model_load_s"]),
        source=f"stated: {where} ({model} on {gpu_name}, assumed utilization)",
    )


def stated_synth_rates(table: dict, model: str, gpu_name: str | None, tp: int, batch: int, max_tokens: int,
                       where: str = "throughput.yaml") -> SynthRates:
    """One tensor-parallel engine of `tp` GPUs generating `batch` sequences at a time."""
    shape = _shape(table, model, where)
    gpu = _gpu(table, gpu_name, where)
    a = _numbers(_need(table, "assumptions", where), f"{where}: assumptions")
    prompt = int(a["synth_prompt_tokens"])
    context = prompt + max_tokens
    return SynthRates(
        prefill_s_per_token=forward_flops(shape, prompt, None) / (tp * gpu["bf16_flops"] * a["prefill_mfu"]),
        decode_s_per_token=decode_step_s(shape, gpu, a, context, None, batch, n_gpus=tp) / batch,
        startup_s=float(a["synth_startup_s"]),
        prompt_tokens=prompt,
        gpus=tp,
        source=f"stated: {where} ({model} on {tp} x {gpu_name}, assumed utilization)",
    )


def _gpu(table: dict, name: str | None, where: str) -> dict:
    gpus = table.get("gpus") or {}
    if name not in gpus:
        raise CostError(f"{where}: no specs for GPU {name!r}; known: {', '.join(gpus) or 'none'}")
    return _numbers(gpus[name], f"{where}: gpus.{name}")


def load_throughput(path: str | Path = ROOT / "data/costs/throughput.yaml") -> dict:
    return _yaml(path, "throughput")


def read_calibration(run_dir: str | Path, model: str) -> Rates | None:
    """Measured rates from `<run_dir>/calibration.json` for `model`, or None when there are none."""
    path = Path(run_dir) / CALIBRATION
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CostError(f"{path}: not valid JSON: {err}") from err
    if data.get("model") != model:
        raise CostError(f"{path}: measured for model {data.get('model')!r}, this experiment runs {model!r}; "
                        "re-run scripts/bench_cost.py or delete the file")
    missing = [k for k in RATE_FIELDS if not isinstance(data.get(k), (int, float))]
    if missing:
        raise CostError(f"{path}: missing or non-numeric {missing}")
    return Rates(**{k: float(data[k]) for k in RATE_FIELDS},
                 source=f"measured: {path} ({data.get('device', '?')}, {data.get('measured_at', '?')}, "
                        f"{data.get('context_tokens', '?')} tokens)")
