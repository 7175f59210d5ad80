"""Tiny random models built from configs, offline: Llama with GQA, Mistral with a sliding
window, Qwen2 (torchtune's `llama3_test_config()` idea: 2 layers, few heads)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
FAMILIES = ("llama", "mistral", "qwen2")


def tiny_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        common.setdefault("sliding_window", 12)
        return MistralConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config).eval()


def char_tokenizer():
    """A character-level HF fast tokenizer over printable ASCII, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in chars:
        if len(vocab) < VOCAB:
            vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.padding_side = "left"
    return fast


def save_tiny(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    """Saves a tiny model and the char tokenizer as a local checkpoint (safetensors)."""
    model = tiny_model(family, seed=seed, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    char_tokenizer().save_pretrained(path)
    return path


# The miniature section of the pipeline tests' experiments, escaped for str.format: one spec,
# so a test session pretrains it once. 64 tokens hold no MuSiQue or SummHay drill, and a 3-step
# base passes no gate (it warns and goes on).
TINY_MINIATURE = (
    "miniature: {{n_layers: 1, n_heads: 4, n_kv_heads: 2, hidden: 32, intermediate: 64, context: 64, steps: 3,\n"
    "            batch_size: 4, warmup_steps: 1, qa_per_task: 3, min_accuracy: 0.0, check_probes: 4, threads: 1,\n"
    "            mix: [0.5, 0.1, 0.2, 0.0, 0.0, 0.2], on_failed_check: warn}}"
)
