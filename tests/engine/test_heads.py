"""Knockout, patching and the Eq. 1 / Eq. 2 scores against hand-built references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from engine.decode import greedy_decode
from engine.head_scores import HeadError, insight_hits, insight_scores, retrieval_hits, retrieval_scores, score_table
from engine.heads import Knockout, Patch, knockout, patch_heads, record_heads
from tiny import FAMILIES, char_tokenizer, tiny_model

N_HEADS, D_HEAD = 4, 16  # tiny models: 4 query heads of 64 / 4


# --------------------------------------------------------------------------- Eq. 1, Eq. 2 by hand

PROMPT = np.array([10, 11, 20, 20, 21, 12, 20, 22, 23, 13])  # answer "20 20 21" at 2..4, "22 23" at 7..8


def one_head(*positions) -> np.ndarray:
    """`[steps, 1, 1]` argmax trajectory of a single head."""
    return np.array(positions, dtype=np.int64).reshape(-1, 1, 1)


def test_retrieval_repeated_span_tokens_count_once_per_position():
    generated = np.array([20, 20, 20, 21])
    # position 2 twice (counts once), position 3, position 4 with a token mismatch (20 != 21? no: step 3 is 21)
    argmax = one_head(2, 2, 3, 4)
    assert retrieval_scores(argmax, generated, PROMPT, [(2, 5)])[0, 0] == pytest.approx(3 / 3)
    argmax = one_head(2, 2, 2, 4)
    assert retrieval_scores(argmax, generated, PROMPT, [(2, 5)])[0, 0] == pytest.approx(2 / 3)


def test_retrieval_needs_token_match_and_position_in_span():
    generated = np.array([20, 20, 21])
    # position 6 holds 20 (== generated) but lies outside the span; position 3 holds 20 but step emits 21
    argmax = one_head(6, 6, 3)
    assert retrieval_scores(argmax, generated, PROMPT, [(2, 5)])[0, 0] == 0.0
    # -1 (no prompt key visible) never counts
    assert retrieval_scores(one_head(-1, -1, -1), generated, PROMPT, [(2, 5)])[0, 0] == 0.0


def test_retrieval_takes_best_of_several_spans():
    generated = np.array([22, 23, 20])
    argmax = one_head(7, 8, 2)  # all of span (7, 9), one of three in span (2, 5)
    assert retrieval_scores(argmax, generated, PROMPT, [(2, 5), (7, 9)])[0, 0] == pytest.approx(1.0)
    assert retrieval_scores(argmax, generated, PROMPT, [(2, 5)])[0, 0] == pytest.approx(1 / 3)


def test_retrieval_repeats_reading_counts_every_step():
    """Wu et al.'s code adds 1/|span| at every retrieving step: repeats count, scores pass 1."""
    generated = np.array([20, 20, 20, 21])
    argmax = one_head(2, 2, 3, 4)  # position 2 twice, then 3 and 4: four retrieving steps
    assert retrieval_scores(argmax, generated, PROMPT, [(2, 5)], count="repeats")[0, 0] == pytest.approx(4 / 3)
    assert retrieval_scores(argmax, generated, PROMPT, [(2, 5)], count="unique")[0, 0] == pytest.approx(3 / 3)
    # best span under repeats: span (7, 9) gets one step of two positions, span (2, 5) two of three
    argmax, generated = one_head(7, 2, 2), np.array([22, 20, 20])
    assert retrieval_scores(argmax, generated, PROMPT, [(2, 5), (7, 9)], count="repeats")[0, 0] == pytest.approx(2 / 3)
    with pytest.raises(HeadError, match="count must be one of"):
        retrieval_scores(argmax, generated, PROMPT, [(2, 5)], count="twice")


def test_argmax_on_a_generated_token_retrieves_nothing():
    """Under the global argmax, positions past the prompt are generated tokens: never in y*."""
    generated = np.array([20, 20, 20])
    argmax = one_head(10, 12, 2)  # PROMPT has 10 tokens: 10 and 12 are the 1st and 3rd generated
    assert retrieval_scores(argmax, generated, PROMPT, [(2, 5)])[0, 0] == pytest.approx(1 / 3)
    np.testing.assert_array_equal(retrieval_hits(argmax, generated, PROMPT, [(2, 5)])[:, 0, 0], [False, False, True])
    np.testing.assert_array_equal(insight_hits(argmax, generated, PROMPT, [(0, 10)])[:, 0, 0], [False, False, True])
    assert insight_scores(one_head(10, 11), generated[:2], PROMPT, [(0, 10)])[0, 0] == 0.0


def test_hits_are_the_events_behind_the_scores():
    generated = np.array([20, 21])
    argmax = np.array([[[2, 0], [9, 4]], [[3, 4], [-1, 4]]])  # [steps=2, layers=2, heads=2]
    hits = retrieval_hits(argmax, generated, PROMPT, [(2, 5)])
    # step 0 emits 20: (0,0)->2 holds 20; (1,1)->4 holds 21. step 1 emits 21: (0,1)->4 and (1,1)->4 hold 21
    np.testing.assert_array_equal(hits, [[[True, False], [False, False]], [[False, True], [False, True]]])
    np.testing.assert_array_equal(insight_hits(argmax, generated, PROMPT, [(2, 5)]),
                                  [[[True, False], [False, True]], [[True, True], [False, True]]])
    assert retrieval_hits(argmax, generated, PROMPT, []).sum() == 0


def test_retrieval_without_span_is_not_counted():
    scores = retrieval_scores(one_head(2), np.array([20]), PROMPT, [])
    assert np.isnan(scores).all()
    assert np.isnan(insight_scores(one_head(2), np.array([20]), PROMPT, [])).all()


def test_scores_per_head_and_layer():
    generated = np.array([20, 21])
    argmax = np.array([[[2, 0], [9, 4]], [[3, 4], [-1, 4]]])  # [steps=2, layers=2, heads=2]
    expected = np.array([[1 / 3, 1 / 3], [0.0, 1 / 3]])
    np.testing.assert_allclose(retrieval_scores(argmax, generated, PROMPT, [(2, 5)]), expected)
    np.testing.assert_allclose(insight_scores(argmax, generated, PROMPT, [(2, 5)]), [[1, 1], [0, 1]])


def test_insight_any_step_in_any_needle_and_strict_option():
    generated = np.array([50, 51, 22])
    argmax = one_head(0, 7, 1)
    assert insight_scores(argmax, generated, PROMPT, [(2, 5)])[0, 0] == 0.0
    assert insight_scores(argmax, generated, PROMPT, [(2, 5), (6, 8)])[0, 0] == 1.0
    # strict: position 7 holds 22 but step 1 emitted 51
    assert insight_scores(argmax, generated, PROMPT, [(6, 8)], strict=True)[0, 0] == 0.0
    assert insight_scores(one_head(0, 5, 7), generated, PROMPT, [(6, 8)], strict=True)[0, 0] == 1.0


def test_score_table_nanmean_and_counts():
    retrieval = np.array([
        [[0.5, 0.0]],
        [[np.nan, np.nan]],
        [[1.0, 0.0]],
    ])  # 3 examples, 1 layer, 2 heads; the second had no answer span
    insight = np.array([[[1.0, 0.0]], [[0.0, 0.0]], [[1.0, 1.0]]])
    table = score_table(retrieval, insight).to_pylist()
    assert table == [
        {"layer": 0, "head": 0, "kind": "retrieval", "score": 0.75, "n_examples": 2},
        {"layer": 0, "head": 1, "kind": "retrieval", "score": 0.0, "n_examples": 2},
        {"layer": 0, "head": 0, "kind": "insight", "score": pytest.approx(2 / 3), "n_examples": 3},
        {"layer": 0, "head": 1, "kind": "insight", "score": pytest.approx(1 / 3), "n_examples": 3},
    ]
    schema = score_table(None, insight).schema
    assert [str(t) for t in schema.types] == ["int32", "int32", "string", "double", "int64"]
    empty = score_table(np.full((2, 1, 1), np.nan), None).to_pylist()
    assert np.isnan(empty[0]["score"]) and empty[0]["n_examples"] == 0
    with pytest.raises(HeadError, match="must be"):
        score_table(np.zeros((2, 3)), None)


# --------------------------------------------------------------------------- knockout


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def logits(model, text="The key of door 7 is q4zx. Key?"):
    ids = torch.tensor([char_tokenizer()(text)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


def zero_o_proj_columns(model, heads):
    """Reference knockout: a copy whose o_proj ignores the heads' input slices (weights zeroed)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, head in heads:
            ref.model.layers[layer].self_attn.o_proj.weight[:, head * D_HEAD : (head + 1) * D_HEAD] = 0
    return ref


def test_knockout_of_no_heads_is_identity(family):
    model = tiny_model(family)
    with knockout(model, []):
        assert torch.equal(logits(model), logits(tiny_model(family)))


def test_knockout_of_a_whole_layer_equals_zeroed_o_proj_input(family):
    model = tiny_model(family)
    zeroed = copy.deepcopy(model)
    # by hand: o_proj sees an all-zero input
    zeroed.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, args: (torch.zeros_like(args[0]),))
    with knockout(model, [(1, h) for h in range(N_HEADS)]):
        knocked = logits(model)
    torch.testing.assert_close(knocked, logits(zeroed), rtol=0, atol=0)
    assert not torch.allclose(knocked, logits(model))  # hooks gone after exit


def test_knockout_hooks_removed_on_error(family):
    model = tiny_model(family)
    before = logits(model)
    with pytest.raises(RuntimeError, match="boom"):
        with knockout(model, [(0, 1)]):
            raise RuntimeError("boom")
    assert torch.equal(logits(model), before)
    with pytest.raises(HeadError, match=r"head \(2, 0\) does not exist"):
        with knockout(model, [(2, 0)]):
            pass


def test_knocked_out_heads_stay_masked_during_decode(family, tok):
    heads = ((0, 1), (1, 0), (1, 3))
    model = tiny_model(family)
    prompts = ["abcabc xyz abcabc", "the sky is blue. code: 7731. code?"]
    knocked = greedy_decode(model, tok, prompts, max_new_tokens=12, intervention=Knockout(heads), batch_size=2)
    reference = greedy_decode(zero_o_proj_columns(model, heads), tok, prompts, max_new_tokens=12, batch_size=2)
    plain = greedy_decode(model, tok, prompts, max_new_tokens=12, batch_size=2)
    assert [d.token_ids for d in knocked] == [d.token_ids for d in reference]
    assert [d.token_ids for d in knocked] != [d.token_ids for d in plain]


# --------------------------------------------------------------------------- patching


def o_proj_inputs(model, ids, patch=None):
    """o_proj inputs `[layer][batch, pos, head, d_head]` as o_proj receives them."""
    seen = {}
    handles = [
        attn.self_attn.o_proj.register_forward_hook(
            lambda m, args, out, layer=i: seen.__setitem__(layer, args[0].view(*args[0].shape[:-1], N_HEADS, D_HEAD))
        )
        for i, attn in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            if patch is None:
                model(ids)
            else:
                with patch_heads(model, *patch):
                    model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_patching_changes_only_the_chosen_heads(family, tok):
    source, target = tiny_model(family, seed=1), tiny_model(family, seed=2)
    ids = torch.tensor([tok("the sky is blue. code: 7731. code?")["input_ids"]])
    heads = ((1, 0), (1, 2))
    with torch.no_grad(), record_heads(source, heads) as recorded:
        source(ids)
    a, b = o_proj_inputs(source, ids), o_proj_inputs(target, ids)
    patched = o_proj_inputs(target, ids, patch=(heads, recorded))
    torch.testing.assert_close(patched[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(patched[1][:, :, [0, 2]], a[1][:, :, [0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(patched[1][:, :, [1, 3]], b[1][:, :, [1, 3]], rtol=0, atol=0)
    assert not torch.allclose(a[1], b[1])


def test_patching_with_own_activations_is_identity(family, tok):
    model = tiny_model(family)
    prompts = ["abcabc xyz abcabc", "the sky is blue. code: 7731. code?", "k"]
    heads = ((0, 0), (0, 3), (1, 1))
    plain = greedy_decode(model, tok, prompts, max_new_tokens=10, batch_size=3)
    for source in (model, copy.deepcopy(model)):
        patched = greedy_decode(model, tok, prompts, max_new_tokens=10, batch_size=3,
                                intervention=Patch(source=source, heads=heads))
        assert [d.token_ids for d in patched] == [d.token_ids for d in plain]


def reference_patched_greedy(source, target, ids: list[int], heads, steps: int) -> list[int]:
    """No KV cache: every step recomputes the whole sequence, patching only the prompt positions."""
    n_prompt = len(ids)
    with torch.no_grad(), record_heads(source, heads) as recorded:
        source(torch.tensor([ids]))
    by_layer = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def hook_for(layer):
        def hook(module, args):
            z = args[0].view(*args[0].shape[:-1], N_HEADS, D_HEAD).clone()
            z[:, :n_prompt, sorted(by_layer[layer])] = recorded[layer]
            return (z.view_as(args[0]),)
        return hook

    handles = [target.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook_for(layer))
               for layer in by_layer]
    sequence = list(ids)
    try:
        with torch.no_grad():
            for _ in range(steps):
                sequence.append(int(target(torch.tensor([sequence])).logits[0, -1].argmax()))
    finally:
        for h in handles:
            h.remove()
    return sequence[n_prompt:]


def test_patched_decode_equals_uncached_reference_batched(family, tok):
    source, target = tiny_model(family, seed=1), tiny_model(family, seed=2)
    heads = ((0, 1), (1, 0), (1, 3))
    prompts = ["the sky is blue. code: 7731. code?", "abc xyz"]
    patched = greedy_decode(target, tok, prompts, max_new_tokens=8, batch_size=2,
                            intervention=Patch(source=source, heads=heads))
    plain = greedy_decode(target, tok, prompts, max_new_tokens=8, batch_size=2)
    for prompt, result in zip(prompts, patched):
        expected = reference_patched_greedy(source, target, tok(prompt)["input_ids"], heads, 8)
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id)]
        assert list(result.token_ids) == expected
    assert [d.token_ids for d in patched] != [d.token_ids for d in plain]


def test_patch_needs_compatible_source(tok):
    target = tiny_model("llama")
    with pytest.raises(HeadError, match="n_layers"):
        greedy_decode(target, tok, ["abc"], max_new_tokens=2,
                      intervention=Patch(source=tiny_model("llama", num_hidden_layers=3), heads=((0, 0),)))


# --------------------------------------------------------------------------- visible keys


@pytest.mark.parametrize("window", [None, 1, 3, 12])
def test_visible_keys_match_transformers_masks_for_every_backend_form(window):
    """The newest query's visible keys, from each mask form a backend passes, equal transformers' own mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    from engine.head_argmax import _visible_keys

    kv_len = 9
    padding = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9], dtype=torch.bool)
    function = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    reference = sdpa_mask(batch_size=2, q_length=1, kv_length=kv_len, q_offset=kv_len - 1, mask_function=function,
                          attention_mask=padding, allow_is_causal_skip=False)  # [batch, 1, 1, kv]
    as_2d = _visible_keys(padding.long(), 2, kv_len, window, "cpu")  # FlashAttention: padding only
    as_4d = _visible_keys(reference, 2, kv_len, window, "cpu")  # SDPA: full bool mask
    additive = torch.where(reference, 0.0, torch.finfo(torch.float32).min)
    as_float = _visible_keys(additive, 2, kv_len, window, "cpu")  # eager: additive mask
    for got in (as_2d, as_4d, as_float):
        assert torch.equal(got.expand(2, 1, 1, kv_len), reference)
    no_padding = _visible_keys(None, 2, kv_len, window, "cpu")  # None: every key visible
    got = torch.ones(1, 1, 1, kv_len, dtype=torch.bool) if no_padding is None else no_padding
    assert torch.equal(got, reference[1:2])  # row 1 has no padding
