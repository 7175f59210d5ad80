"""Greedy decoding and inline head scoring against independent references.

References: transformers' own `generate` for the tokens, and an eager
`output_attentions=True` forward (T x T, test only) for the per-step attention argmax.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.decode import DecodeError, ScoreSpans, greedy_decode, token_spans
from tiny import FAMILIES, char_tokenizer, tiny_model

PROMPTS = (
    "The key of door 7 is q4zx. Doors: 7 q4zx, 8 mm1, 9 kz. Key of 7?",
    "abcabc xyz abcabc",
    "the grass is green. the sky is blue. code: 7731. code?",
)
SPANS = (
    ScoreSpans(answer_spans=((20, 24), (42, 46)), needle_spans=((0, 25),)),
    ScoreSpans(answer_spans=((0, 17),), needle_spans=((7, 10), (11, 17))),
    ScoreSpans(answer_spans=((43, 47),), needle_spans=((37, 48),)),
)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return tiny_model(family)


def eager_argmax(family: str, prompt_ids: list[int], generated: list[int], over: str = "prompt", **overrides):
    """Reference `[steps, layer, head]`: argmax of eager attention weights (T x T, test only) over
    the prompt keys (`over="prompt"`) or over every key up to the query (`over="all"`), as a
    position in the unpadded sequence."""
    eager = tiny_model(family, attn_implementation="eager", **overrides)
    steps = len(generated)
    sequence = torch.tensor([prompt_ids + generated[: steps - 1]])
    with torch.no_grad():
        attentions = eager(sequence, output_attentions=True).attentions  # per layer [1, head, T, T]
    n_prompt = len(prompt_ids)
    out = np.empty((steps, len(attentions), attentions[0].shape[1]), dtype=np.int64)
    for layer, weights in enumerate(attentions):
        keys = n_prompt if over == "prompt" else weights.shape[-1]  # later keys carry 0 (causal mask)
        rows = weights[0, :, n_prompt - 1 : n_prompt - 1 + steps, :keys]  # [head, step, key]
        best = rows.argmax(-1).T.numpy()
        out[:, layer] = np.where(rows.max(-1).values.T.numpy() > 0, best, -1)
    return out, attentions, n_prompt


@pytest.mark.parametrize("over", ["all", "prompt"])
def test_inline_argmax_matches_eager_attention(family, model, tok, over):
    decoded = greedy_decode(
        model, tok, PROMPTS, max_new_tokens=16, spans=SPANS, batch_size=3, keep_argmax=True, argmax_over=over
    )
    checked = ties = 0
    for prompt, result in zip(PROMPTS, decoded):
        prompt_ids = tok(prompt)["input_ids"]
        generated = list(result.token_ids)
        if len(result.argmax) > len(generated):  # the step that produced EOS is scored too
            generated.append(tok.eos_token_id)
        reference, attentions, n_prompt = eager_argmax(family, prompt_ids, generated, over=over)
        assert result.argmax.shape == reference.shape
        for step, layer, head in zip(*np.nonzero(result.argmax != reference)):
            # only an exact tie in the weights may pick a different position
            row = attentions[layer][0, head, n_prompt - 1 + step]
            row = row[:n_prompt] if over == "prompt" else row
            assert abs(row[result.argmax[step, layer, head]] - row.max()) < 1e-6, (step, layer, head)
            ties += 1
        checked += reference.size
    assert ties <= checked // 100
    first = decoded[0].argmax
    if over == "all":  # later queries see their own and earlier generated tokens, and look there
        assert (first >= len(tok(PROMPTS[0])["input_ids"])).any()
        assert (first >= 0).all()
    if family == "mistral" and over == "prompt":  # window 12 < 16 steps: late steps see no prompt key
        assert (first == -1).any()
        assert (first[0] >= 0).all()


def scores_by_hand(argmax, generated, prompt_ids, answer, needles, strict=False, count="unique"):
    """Eq. 1 and Eq. 2 by plain loops over steps, layers and heads; `count="repeats"` adds
    1/|span| at every retrieving step (Wu et al.'s code), "unique" counts each position once."""
    steps, n_layers, n_heads = argmax.shape
    retrieval = np.full((n_layers, n_heads), np.nan) if not answer else np.zeros((n_layers, n_heads))
    insight = np.full((n_layers, n_heads), np.nan) if not needles else np.zeros((n_layers, n_heads))
    for layer in range(n_layers):
        for head in range(n_heads):
            for start, end in answer:
                steps_hit = [argmax[t, layer, head] for t in range(steps)
                             if start <= argmax[t, layer, head] < end
                             and prompt_ids[argmax[t, layer, head]] == generated[t]]
                got = len(steps_hit) if count == "repeats" else len(set(steps_hit))
                retrieval[layer, head] = max(retrieval[layer, head], got / (end - start))
            if needles:
                insight[layer, head] = float(any(
                    s <= argmax[t, layer, head] < e and (not strict or prompt_ids[argmax[t, layer, head]] == generated[t])
                    for t in range(steps) for s, e in needles
                ))
    return retrieval, insight


# The third prompt's answer span covers the whole prompt, so that even heads whose global argmax
# looks at the generated "q"s first retrieve in prefill (the first step sees only the prompt).
COPY_PROMPTS = ("xyz qqqqqqqq abc q", "ab qq kqq cd qq zz q", "q q q q q q q q q")
COPY_SPANS = (
    ScoreSpans(answer_spans=((4, 8), (8, 12)), needle_spans=((13, 16),)),
    ScoreSpans(answer_spans=((3, 5), (6, 9)), needle_spans=((0, 2), (13, 15))),
    ScoreSpans(answer_spans=((0, 16),), needle_spans=((0, 9),)),
)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("over,count", [("all", "unique"), ("prompt", "unique"), ("all", "repeats"),
                                        ("prompt", "repeats")])
def test_scores_from_eager_reference_and_char_offsets(family, tok, strict, over, count):
    """Scores equal Eq. 1/2 computed by hand from the eager argmax (char tokenizer: token i = char i),
    under each reading: argmax over all keys or the prompt, positions counted once or per step.

    Tied embeddings make a random model repeat its last input token ("q"), which also occurs
    in the answer spans (repeatedly) and outside them, so heads do retrieve.
    """
    model = tiny_model(family, tie_word_embeddings=True)
    decoded = greedy_decode(model, tok, COPY_PROMPTS, max_new_tokens=8, spans=COPY_SPANS, batch_size=3,
                            keep_argmax=True, insight_strict=strict, argmax_over=over, count=count)
    differs = []
    for prompt, spans, result in zip(COPY_PROMPTS, COPY_SPANS, decoded):
        prompt_ids = tok(prompt)["input_ids"]
        generated = list(result.token_ids) + [tok.eos_token_id] * (len(result.argmax) - len(result.token_ids))
        reference, _, _ = eager_argmax(family, prompt_ids, generated, over=over, tie_word_embeddings=True)
        retrieval, insight = scores_by_hand(reference, generated, prompt_ids, spans.answer_spans,
                                            spans.needle_spans, strict, count)
        np.testing.assert_allclose(result.retrieval, retrieval)
        np.testing.assert_allclose(result.insight, insight)
        other, _ = scores_by_hand(reference, generated, prompt_ids, spans.answer_spans, spans.needle_spans,
                                  strict, "unique" if count == "repeats" else "repeats")
        differs.append(bool((other != retrieval).any()))
        # the per-step events behind the scores: a head that scores retrieved at some step
        assert result.retrieval_hits.shape == reference.shape
        np.testing.assert_array_equal(result.retrieval_hits.any(axis=0), result.retrieval > 0)
        np.testing.assert_array_equal(result.insight_hits.any(axis=0), result.insight > 0)
    assert decoded[0].text.startswith("q")
    assert any((d.retrieval > 0).any() for d in decoded)
    assert any(((d.retrieval > 0) & (d.retrieval < 1)).any() for d in decoded)
    # the prompts tell the readings apart: some head retrieves one position at several steps
    assert any(differs), "no head retrieved a position twice: the test cannot tell the counts apart"


def test_readings_differ_on_the_same_decode(family, tok):
    """The same greedy decode scored four ways: "repeats" never scores below "unique", and
    "all" retrieves only where "prompt" does at the same argmax (a step whose global argmax is a
    generated token retrieves nothing)."""
    model = tiny_model(family, tie_word_embeddings=True)
    runs = {(over, count): greedy_decode(model, tok, COPY_PROMPTS, max_new_tokens=8, spans=COPY_SPANS,
                                         batch_size=3, keep_argmax=True, argmax_over=over, count=count)
            for over in ("all", "prompt") for count in ("unique", "repeats")}
    for i in range(len(COPY_PROMPTS)):
        assert len({runs[key][i].token_ids for key in runs}) == 1  # scoring never changes the answer
        for over in ("all", "prompt"):
            assert (runs[(over, "repeats")][i].retrieval >= runs[(over, "unique")][i].retrieval).all()
        same = runs[("all", "unique")][i].argmax == runs[("prompt", "unique")][i].argmax
        hits_all, hits_prompt = runs[("all", "unique")][i].retrieval_hits, runs[("prompt", "unique")][i].retrieval_hits
        np.testing.assert_array_equal(hits_all[same], hits_prompt[same])
        assert not hits_all[~same].any()  # different argmax: the global one is a generated token


def test_batched_left_padding_equals_one_by_one(family, model, tok):
    spans = list(SPANS)
    batched = greedy_decode(model, tok, PROMPTS, max_new_tokens=10, spans=spans, batch_size=3, keep_argmax=True)
    for i, prompt in enumerate(PROMPTS):
        (single,) = greedy_decode(model, tok, [prompt], max_new_tokens=10, spans=[spans[i]], batch_size=1,
                                  keep_argmax=True)
        assert batched[i].token_ids == single.token_ids
        assert batched[i].text == single.text
        np.testing.assert_array_equal(batched[i].argmax, single.argmax)
        np.testing.assert_allclose(batched[i].retrieval, single.retrieval)
        np.testing.assert_allclose(batched[i].insight, single.insight)


def test_tokens_equal_transformers_generate(family, model, tok):
    plain = greedy_decode(model, tok, PROMPTS, max_new_tokens=10, batch_size=3)
    scored = greedy_decode(model, tok, PROMPTS, max_new_tokens=10, batch_size=3, spans=SPANS)
    enc = tok(list(PROMPTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    for row, (p, s) in enumerate(zip(plain, scored)):
        expected = ref[row, enc["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id)]
        assert list(p.token_ids) == expected
        assert s.token_ids == p.token_ids
        assert p.retrieval is None and p.insight is None


def test_scoring_never_changes_what_is_decoded(family, model, tok):
    """Scored and plain decoding run the same attention at every step, so their tokens are equal,
    whatever the intervention (and the decode takes the engine's one-query step, not SDPA's)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from engine.heads import Knockout, Patch

    prompts = [p * 3 for p in PROMPTS]  # long enough that the sliding window (12) cuts in
    spans = [ScoreSpans(((0, 10),), ((0, 20),))] * len(prompts)
    other = tiny_model(family, seed=1)
    for intervention in (None, Knockout(((0, 1), (1, 2))), Patch(other, ((0, 0), (1, 3)))):
        kw = dict(max_new_tokens=24, batch_size=2, intervention=intervention)
        plain = greedy_decode(model, tok, prompts, **kw)
        scored = greedy_decode(model, tok, prompts, spans=spans, **kw)
        assert [p.token_ids for p in plain] == [s.token_ids for s in scored], intervention
        assert all(len(p.token_ids) == 24 for p in plain)  # no EOS: every step compared
    base, calls = ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def counting(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return base(module, query, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = counting
    try:
        greedy_decode(model, tok, prompts[:1], max_new_tokens=5)
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = base
    n_layers = model.config.num_hidden_layers
    assert calls == [len(tok(prompts[0])["input_ids"])] * n_layers  # SDPA ran the prefill alone


def test_stop_strings_cut_text_and_scoring(model, tok):
    (full,) = greedy_decode(model, tok, [PROMPTS[1]], max_new_tokens=12, spans=[SPANS[1]], keep_argmax=True)
    stop = full.text[3:5]
    (cut,) = greedy_decode(model, tok, [PROMPTS[1]], max_new_tokens=12, spans=[SPANS[1]], keep_argmax=True,
                           stop_strings=["\u2603", stop])
    first = full.text.find(stop)
    assert cut.text == full.text[:first]
    n = len(cut.token_ids)  # decoding stops at the token that completes the stop string
    assert cut.token_ids == full.token_ids[:n]
    assert tok.decode(cut.token_ids, skip_special_tokens=True).endswith(stop)
    assert stop not in tok.decode(cut.token_ids[:-1], skip_special_tokens=True)
    np.testing.assert_array_equal(cut.argmax, full.argmax[: len(cut.token_ids)])


def test_progress_and_bad_input(model, tok):
    seen = []
    greedy_decode(model, tok, PROMPTS, max_new_tokens=2, batch_size=2, progress=seen.append)
    assert seen == [2, 1]
    with pytest.raises(DecodeError, match="score spans for 3 prompts"):
        greedy_decode(model, tok, PROMPTS, max_new_tokens=2, spans=SPANS[:1])
    with pytest.raises(DecodeError, match=r"prompt 0: answer_spans \(0, 999\) outside"):
        greedy_decode(model, tok, PROMPTS[:1], max_new_tokens=2, spans=[ScoreSpans(((0, 999),), ())])


def test_token_spans_use_offsets():
    # "<s>" "The" " capital" " is" " Paris" "." as a BPE tokenizer reports offsets
    offsets = [(0, 0), (0, 3), (3, 11), (11, 14), (14, 20), (20, 21)]
    assert token_spans(offsets, [(15, 20)]) == ((4, 5),)  # span without the leading space
    assert token_spans(offsets, [(4, 14)]) == ((2, 4),)  # multi-token
    assert token_spans(offsets, [(18, 21)]) == ((4, 6),)  # partial overlap counts
    assert token_spans(offsets, [(0, 0), (30, 40)]) == ()  # not located
    assert token_spans(offsets, [(0, 2), (20, 21)]) == ((1, 2), (5, 6))  # BOS (empty range) never inside


def test_spans_located_in_real_subword_tokenizer():
    """Same text, different tokens in context and output: offsets locate the context tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "Par": 3, "is": 4, "Paris": 5, "the": 6, "in": 7, "city": 8}
    inner = Tokenizer(models.WordPiece(vocab={**vocab, "##is": 9, "##ris": 10, "##Par": 11}, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="</s>")
    prompt = "the city Paris is in Par"
    enc = fast(prompt, return_offsets_mapping=True)
    start = prompt.index("Paris")
    spans = token_spans(enc["offset_mapping"], [(start, start + 5)])
    assert [enc["input_ids"][i] for i in range(*spans[0])] == [vocab["Paris"]]
