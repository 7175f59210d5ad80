"""Model loading: causal LMs with a raised RoPE base, a scaled sliding window and LoRA.

Context extension in the study changes exactly two things about a model: the RoPE base
(`rope_theta`) and, for Mistral, the sliding window. Everything else is LoRA on attention.

Example:
    >>> model = load_model("meta-llama/Meta-Llama-3-8B-Instruct", rope_base=6315088)
    >>> model = add_lora(model, rank=8, alpha=8)            # q, k, v, o only
    >>> arch = architecture(model)                           # layers, heads, o_proj modules

Stages load through `engine.placement.load_configured`: the experiment's `ModelConfig` whole,
placed where `engine.placement.resolve_placement` says (device, dtype, attention backend).

transformers 5 keeps the base in `config.rope_parameters["rope_theta"]`; assigning
`config.rope_theta` on a built config changes nothing, so the base is set on the config
before the model (and its rotary embedding) is constructed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
import torch
from torch import nn

from engine.store import atomic_dir, write_json

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR_MODULES = ATTENTION_MODULES + ("gate_proj", "up_proj", "down_proj")
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ADAPTER_META = "needlework_model.json"


class ModelError(ValueError):
    """A model, adapter or architecture that needlework cannot use as asked."""


@dataclass(frozen=True)
class Architecture:
    """Where the heads live in a decoder-only model."""

    family: str
    n_layers: int
    n_heads: int  # query heads per layer
    n_kv_heads: int
    head_dim: int
    sliding_window: int | None
    attentions: tuple[nn.Module, ...]  # each layer's self_attn
    o_projs: tuple[nn.Module, ...]  # each layer's o_proj; its input is [batch, pos, head, d_head]

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads


def with_rope_base(config, rope_base: float | None, sliding_window: int | None = None):
    """Returns `config` with a new RoPE base and sliding window, before any model is built."""
    if rope_base is not None:
        params = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
        params["rope_theta"] = float(rope_base)
        config.rope_parameters = params
    if sliding_window is not None:
        if not hasattr(config, "sliding_window"):
            raise ModelError(f"{config.model_type} has no sliding window to scale")
        config.sliding_window = int(sliding_window)
    return config


def rope_base_of(model_or_config) -> float:
    config = getattr(model_or_config, "config", model_or_config)
    return float(config.rope_parameters["rope_theta"])


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer of a local model directory or hub id, padding on the left.

    Raises:
        ModelError: nothing loadable at `path` (a missing directory, no tokenizer files, an
            unknown hub id offline).
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        missing = "" if Path(path).exists() else " (no such directory, and no hub model of that name available)"
        raise ModelError(f"{path}: cannot load a tokenizer{missing}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# A tokenizer saved without a limit reports ~1e30 positions.
_NO_LIMIT = 1_000_000_000


def position_limit(path: str, rope_base: float | None = None, trust_remote_code: bool = False,
                   tokenizer=None) -> tuple[int | None, str]:
    """The longest context the model at `path` can position, and how that was found.

    RoPE models have no hard limit, but a model only positions what it was trained at,
    `max_position_embeddings` P. Raising the RoPE base by a factor r stretches every
    wavelength by at most r, so a context extension by raising the base reaches at most about
    r x P (the study: Llama-3-8B-Instruct, r = 12.6, extended 8K -> 32K). Without a config,
    the tokenizer's `model_max_length`, if it states one.

    Returns:
        (limit, reason); limit is None when neither the model nor the tokenizer states one.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        config = None
    positions = getattr(config, "max_position_embeddings", None) if config is not None else None
    if positions:
        base = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
        if rope_base and base and rope_base > base:
            factor = rope_base / base
            return (int(positions * factor), f"max_position_embeddings {positions} of {path} x {factor:.3g} for the "
                                             f"RoPE base raised {base:g} -> {rope_base:g}")
        return int(positions), f"max_position_embeddings of {path}"
    length = getattr(tokenizer, "model_max_length", None)
    if length and length < _NO_LIMIT:
        return int(length), f"model_max_length of the tokenizer at {path}"
    return None, "no limit stated"


def load_model(
    path: str,
    *,
    rope_base: float | None = None,
    sliding_window: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    instrumented: bool = True,
):
    """Loads a causal LM (safetensors only) with the RoPE base and window of the extension.

    Args:
        path: local directory or hub id.
        rope_base: new RoPE base; None keeps the pretrained one.
        sliding_window: new sliding window (Mistral); None keeps it.
        dtype: torch dtype or its name ("bfloat16").
        attn_implementation: "sdpa" or "flash_attention_2".
        trust_remote_code: off unless the experiment YAML asks for it.
        device: where the weights go.
        instrumented: require a family whose heads the engine can instrument
            (`SUPPORTED_FAMILIES`); synthesis models need not be one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if instrumented:
        check_family(config.model_type, source=path)
    with_rope_base(config, rope_base, sliding_window)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    return model.to(device).eval()


def check_family(model_type: str, source: str = "model") -> None:
    if model_type not in SUPPORTED_FAMILIES:
        raise ModelError(
            f"{source}: model family {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_FAMILIES)}"
        )


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a (possibly PEFT-wrapped) causal LM."""
    inner = model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        raise ModelError(f"{type(inner).__name__} has no model.layers; not a supported decoder")
    return layers


def architecture(model) -> Architecture:
    """Describes layers, heads and the o_proj instrumentation points of `model`."""
    config = model.config
    check_family(config.model_type, source=getattr(config, "_name_or_path", "model") or "model")
    layers = decoder_layers(model)
    attentions, o_projs = [], []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        missing = [m for m in ATTENTION_MODULES if attn is None or not hasattr(attn, m)]
        if missing:
            raise ModelError(f"layer {i}: self_attn lacks {', '.join(missing)}")
        attentions.append(attn)
        o_projs.append(attn.o_proj)
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return Architecture(
        family=config.model_type,
        n_layers=len(layers),
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        sliding_window=getattr(config, "sliding_window", None),
        attentions=tuple(attentions),
        o_projs=tuple(o_projs),
    )


def lora_targets(target: str) -> list[str]:
    if target == "attention":
        return list(ATTENTION_MODULES)
    if target == "all":
        return list(ALL_LINEAR_MODULES)
    raise ModelError(f"lora target {target!r}; choose 'attention' or 'all'")


def add_lora(model, rank: int = 8, alpha: int = 8, dropout: float = 0.0, target: str = "attention"):
    """Wraps `model` with a PEFT LoRA adapter on attention (default) or all linear modules."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_targets(target),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_adapter(model, out_dir: str | Path, base_path: str) -> None:
    """Writes the adapter (safetensors) and the extension settings it was trained with, as one
    directory that replaces `out_dir` whole."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_adapter_meta(model.config, tmp, base_path)


def write_adapter_meta(config, out_dir: str | Path, base_path: str) -> None:
    """Records the extension settings next to an adapter written by other means (a Trainer,
    whose `save_model` also gathers DeepSpeed ZeRO-3 shards)."""
    out_dir = Path(out_dir)
    meta = {
        "base_model": base_path,
        "model_type": config.model_type,
        "rope_base": rope_base_of(config),
        "sliding_window": getattr(config, "sliding_window", None),
        "n_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
    }
    write_json(meta, out_dir / ADAPTER_META)


def load_trained(
    base_path: str,
    adapter_dir: str | Path | None,
    *,
    rope_base: float | None = None,
    sliding_window: int | None = None,
    merge: bool = True,
    **load_kwargs,
):
    """Loads the base model with the adapter's recorded extension settings and the adapter.

    With `adapter_dir=None` this is the non-fine-tuned model with the given RoPE base.
    """
    if adapter_dir is None:
        return load_model(base_path, rope_base=rope_base, sliding_window=sliding_window, **load_kwargs)
    adapter_dir = Path(adapter_dir)
    meta_path = adapter_dir / ADAPTER_META
    if not (adapter_dir / "adapter_model.safetensors").exists():
        raise ModelError(f"{adapter_dir}: no adapter_model.safetensors (adapters load from safetensors only)")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    model = load_model(
        base_path,
        rope_base=meta.get("rope_base", rope_base),
        sliding_window=meta.get("sliding_window", sliding_window),
        **load_kwargs,
    )
    for key in ("model_type", "n_layers", "hidden_size"):
        want = {"model_type": model.config.model_type, "n_layers": model.config.num_hidden_layers,
                "hidden_size": model.config.hidden_size}[key]
        if key in meta and meta[key] != want:
            raise ModelError(
                f"{adapter_dir}: adapter was trained on {key}={meta[key]!r}, base {base_path} has {want!r}"
            )
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), use_safetensors=True)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ModelError(f"{adapter_dir}: adapter does not match base model {base_path}: {err}") from err
    if merge:
        model = model.merge_and_unload()
    return model.eval()
