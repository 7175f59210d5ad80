"""engine/models.py: RoPE base, sliding window, LoRA placement, adapters, architecture."""

import pytest
import torch

from engine.models import (
    ModelError,
    add_lora,
    architecture,
    load_model,
    load_trained,
    rope_base_of,
    save_adapter,
)
from tiny import FAMILIES, tiny_model


def independent_inv_freq(base: float, head_dim: int) -> torch.Tensor:
    # RoFormer: theta_i = base^(-2i/d)
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


@pytest.mark.parametrize("family", FAMILIES)
def test_raised_rope_base_changes_inverse_frequencies(family, tiny_checkpoints):
    model = load_model(tiny_checkpoints[family], rope_base=80_000)
    head_dim = architecture(model).head_dim
    expected = independent_inv_freq(80_000, head_dim)
    got = model.model.rotary_emb.inv_freq.double()
    assert torch.allclose(got, expected, rtol=1e-6)
    assert rope_base_of(model) == 80_000
    original = load_model(tiny_checkpoints[family])
    assert not torch.allclose(original.model.rotary_emb.inv_freq.double(), expected)


def test_setting_rope_theta_on_built_config_is_not_how_it_works(tiny_checkpoints):
    # The trap DESIGN.md warns about: this must not be the mechanism the engine relies on.
    model = load_model(tiny_checkpoints["llama"])
    before = model.model.rotary_emb.inv_freq.clone()
    model.config.rope_theta = 1e6
    assert torch.equal(model.model.rotary_emb.inv_freq, before)


def test_sliding_window_scaled(tiny_checkpoints):
    model = load_model(tiny_checkpoints["mistral"], sliding_window=24)
    assert architecture(model).sliding_window == 24
    with pytest.raises(ModelError, match="sliding window"):
        from transformers import AutoConfig

        from engine.models import with_rope_base

        config = AutoConfig.from_pretrained(tiny_checkpoints["llama"])
        if hasattr(config, "sliding_window"):
            del config.sliding_window
        with_rope_base(config, None, sliding_window=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_architecture_describes_heads(family):
    model = tiny_model(family)
    arch = architecture(model)
    assert (arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim) == (2, 4, 2, 16)
    assert arch.o_projs[1] is model.model.layers[1].self_attn.o_proj
    assert arch.o_projs[0].in_features == arch.n_heads * arch.head_dim


def test_unsupported_family_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
    with pytest.raises(ModelError, match="gpt2.*supported: llama"):
        architecture(model)


def _train_steps(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 90, (2, 12))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_attention_only_changes_adapter_not_base(family):
    model = add_lora(tiny_model(family), rank=4, alpha=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_steps(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    lora_modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_" in n}
    assert lora_modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any("mlp" in n for n, _ in model.named_parameters() if "lora_" in n)


def test_lora_all_modules_adapts_mlp_too():
    model = add_lora(tiny_model("llama"), target="all")
    names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_" in n}
    assert {"gate_proj", "up_proj", "down_proj", "q_proj"} <= names
    with pytest.raises(ModelError, match="attention.*all"):
        add_lora(tiny_model("llama"), target="mlp")


def test_adapter_roundtrip_reproduces_logits_and_extension(tmp_path, tiny_checkpoints):
    base = tiny_checkpoints["mistral"]
    model = add_lora(load_model(base, rope_base=50_000, sliding_window=20), rank=4, alpha=8)
    _train_steps(model, steps=4)
    model.eval()
    ids = torch.randint(3, 90, (1, 16))
    want = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter", base_path=base)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    reloaded = load_trained(base, tmp_path / "adapter")
    assert rope_base_of(reloaded) == 50_000 and reloaded.config.sliding_window == 20
    assert torch.allclose(reloaded(input_ids=ids).logits, want, atol=1e-5)


def test_adapter_for_another_base_is_rejected(tmp_path, tiny_checkpoints):
    model = add_lora(load_model(tiny_checkpoints["llama"]))
    save_adapter(model, tmp_path / "a", base_path=tiny_checkpoints["llama"])
    with pytest.raises(ModelError, match="model_type"):
        load_trained(tiny_checkpoints["qwen2"], tmp_path / "a")
