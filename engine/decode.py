"""Batched greedy decoding with a KV cache, optional head interventions and inline head scores.

Every evaluation in the study decodes greedily (Zhao, Yin, Durrett, ICML 2025, Sec. 4). The
same decode yields the answers for F1 and, when `spans` are given, the retrieval score
(Eq. 1) and insight score (Eq. 2) of every head: the attention argmax per head and step is
taken inside the model's own attention call (see `engine.head_argmax.decode_attention`), so
scoring needs no second pass and never a T x T attention matrix. Decoding runs that attention
whether or not it scores, so the tokens decoded never depend on scoring.

Example:
    >>> from engine.models import load_model, load_tokenizer
    >>> model, tok = load_model("ckpt"), load_tokenizer("ckpt")
    >>> out = greedy_decode(model, tok, ["Q: 2+2?\\nA:"], max_new_tokens=8, stop_strings=["\\n"],
    ...                     spans=[ScoreSpans(answer_spans=((3, 6),), needle_spans=())])
    >>> out[0].text, out[0].retrieval.shape        # ('4', (n_layers, n_heads))

Prompts are raw strings, tokenized with the tokenizer's default special tokens, or, with
`chat_template=True`, rendered through the tokenizer's chat template (`engine.chat`; spans shift
with the prompt, and the template supplies its own special tokens); left padded within a
batch; batches group prompts of similar length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from engine.chat import render_prompt, shift_spans
from engine.head_argmax import ARGMAX_KWARG, ARGMAX_OVER, HeadArgmax, decoding_attention
from engine.head_scores import COUNTS, HeadError, insight_hits, insight_scores, retrieval_hits, retrieval_scores
from engine.heads import Knockout, Patch, check_compatible, knockout, patch_heads, record_heads
from engine.models import architecture


class DecodeError(ValueError):
    """Inputs greedy decoding cannot use as given."""


@dataclass(frozen=True)
class ScoreSpans:
    """Where the answer (y*, Eq. 1) and the needles (f*, Eq. 2) lie in a prompt.

    Character offsets into the prompt, end exclusive (as `tasks.example.Example` stores them).
    """

    answer_spans: tuple[tuple[int, int], ...]
    needle_spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Decoded:
    """One greedy continuation.

    Attributes:
        text: decoded continuation, cut before the first stop string; special tokens skipped.
        token_ids: generated tokens up to the end of the sequence; EOS excluded, the tokens
            of a stop string included.
        retrieval: `[n_layers, n_heads]` retrieval scores (Eq. 1), NaN when no answer span was
            located; None when scoring was off.
        insight: the same for insight scores (Eq. 2) against the needle spans.
        argmax: with `keep_argmax=True`, `[steps, n_layers, n_heads]` each head's attention
            argmax at each scored step, as a position in the sequence (the prompt's tokens,
            then the generated ones; -1: no candidate key visible).
        retrieval_hits: `[steps, n_layers, n_heads]` whether each head retrieved (Eq. 1's
            event) at each scored step; None when scoring was off.
        insight_hits: the same for Eq. 2's event (argmax inside a needle).
    """

    text: str
    token_ids: tuple[int, ...]
    retrieval: np.ndarray | None
    insight: np.ndarray | None
    argmax: np.ndarray | None = None
    retrieval_hits: np.ndarray | None = None
    insight_hits: np.ndarray | None = None


def token_spans(offsets: Sequence[tuple[int, int]], char_spans: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Maps character spans to token spans `(first, last + 1)` through a tokenizer's offsets.

    A token belongs to a span when its character range overlaps it; tokens with an empty
    range (BOS, padding) belong to none. A span no token overlaps is dropped ("not located").
    """
    if not len(offsets):
        return ()
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0], bounds[:, 1]
    nonempty = ends > starts
    located = []
    for start, end in char_spans:
        inside = np.flatnonzero(nonempty & (starts < end) & (ends > start))
        if inside.size:
            located.append((int(inside[0]), int(inside[-1]) + 1))
    return tuple(located)


def eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids of the tokenizer and of the model's generation config (Llama-3 has two)."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


def greedy_decode(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    batch_size: int = 4,
    spans: Sequence[ScoreSpans] | None = None,
    intervention: Knockout | Patch | None = None,
    insight_strict: bool = False,
    progress: Callable[[int], None] | None = None,
    keep_argmax: bool = False,
    argmax_over: str = "all",
    count: str = "unique",
    chat_template: bool = False,
) -> list[Decoded]:
    """Greedily continues each prompt until EOS, a stop string or `max_new_tokens`.

    When `spans` is given, at every step, including the first token (produced by prefill,
    scored with the last prompt query's attention), each query head's attention argmax (RoPE
    applied, padding and sliding window respected) is paired with the token generated at that
    step. The step that generates EOS or completes a stop string is scored; steps after it are
    not. The argmax is over every visible key (`argmax_over="all"`) or the prompt keys only
    ("prompt"); see `engine.head_scores` for the two readings and for `count`.

    Args:
        model: causal LM (sdpa or flash attention backend for scoring).
        tokenizer: its tokenizer; a fast one when `spans` is given (offsets are needed).
        prompts: raw prompt strings.
        max_new_tokens: token budget per prompt.
        stop_strings: end a sequence as soon as its decoded text contains one of these.
        batch_size: prompts per forward pass.
        spans: per prompt, the answer and needle spans to score heads against.
        intervention: `Knockout` for the whole decode, or `Patch` of the prompt positions
            from `Patch.source` (model A) into `model` (model B) before unpatched decoding.
        insight_strict: also require the token match of Eq. 1 for the insight score.
        progress: called after each batch with the number of prompts it finished.
        keep_argmax: also return the per-step argmax behind the scores (needs `spans`).
        argmax_over: "all" (the paper's reading) or "prompt".
        count: "unique" (the paper's Eq. 1) or "repeats" (Wu et al.'s code).
        chat_template: prompt through the tokenizer's chat template (the prompt is the user
            turn); the argmax then indexes the rendered prompt's tokens.

    Returns:
        One `Decoded` per prompt, in input order.
    """
    prompts = list(prompts)
    if max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise DecodeError(f"batch_size must be >= 1, got {batch_size}")
    if spans is not None and len(spans) != len(prompts):
        raise DecodeError(f"{len(spans)} score spans for {len(prompts)} prompts")
    if tokenizer.pad_token_id is None:
        raise DecodeError("tokenizer has no pad token; set tokenizer.pad_token (load_tokenizer does)")
    scored = spans is not None
    if keep_argmax and not scored:
        raise DecodeError("keep_argmax needs spans (the argmax is taken only while scoring)")
    if argmax_over not in ARGMAX_OVER:
        raise DecodeError(f"argmax_over must be one of {ARGMAX_OVER}, got {argmax_over!r}")
    if count not in COUNTS:
        raise DecodeError(f"count must be one of {COUNTS}, got {count!r}")
    if scored and not getattr(tokenizer, "is_fast", False):
        raise DecodeError("scoring needs a fast tokenizer (return_offsets_mapping) to locate spans")
    if isinstance(intervention, Patch):
        check_compatible(intervention.source, model)
    elif intervention is not None and not isinstance(intervention, Knockout):
        raise DecodeError(f"intervention must be Knockout, Patch or None, not {type(intervention).__name__}")
    if not prompts:
        return []

    rendered = [render_prompt(tokenizer, p) for p in prompts] if chat_template else None
    texts = [r.text for r in rendered] if rendered else prompts
    encoded = tokenizer(texts, return_offsets_mapping=scored, add_special_tokens=not chat_template)
    ids = [list(x) for x in encoded["input_ids"]]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise DecodeError(f"prompts {empty[:5]} tokenize to nothing")
    answer_tok, needle_tok = [()] * len(prompts), [()] * len(prompts)
    if scored:
        for i, (prompt, example_spans) in enumerate(zip(prompts, spans)):
            for name in ("answer_spans", "needle_spans"):
                for start, end in getattr(example_spans, name):
                    if not 0 <= start <= end <= len(prompt):
                        raise DecodeError(f"prompt {i}: {name} ({start}, {end}) outside the prompt (length {len(prompt)})")
            offsets = encoded["offset_mapping"][i]
            shift = rendered[i].offset if rendered else 0
            answer_tok[i] = token_spans(offsets, shift_spans(example_spans.answer_spans, shift))
            needle_tok[i] = token_spans(offsets, shift_spans(example_spans.needle_spans, shift))

    eos = eos_token_ids(model, tokenizer)
    # longest first: similar lengths share a batch, so little padding
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    results: list[Decoded | None] = [None] * len(prompts)
    kept_out = knockout(model, intervention.heads) if isinstance(intervention, Knockout) else nullcontext()
    with torch.no_grad(), kept_out, decoding_attention(model, scored=scored):
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            generated, argmax = _decode_batch(
                model,
                tokenizer,
                [ids[i] for i in batch],
                max_new_tokens=max_new_tokens,
                stop_strings=tuple(stop_strings),
                eos=eos,
                scored=scored,
                patch=intervention if isinstance(intervention, Patch) else None,
                argmax_over=argmax_over,
            )
            for row, i in enumerate(batch):
                tokens = generated[row]
                retrieval = insight = r_hits = i_hits = None
                if scored:
                    steps = argmax[row]
                    gen = np.asarray(tokens, dtype=np.int64)
                    prompt_ids = np.asarray(ids[i], dtype=np.int64)
                    retrieval = retrieval_scores(steps, gen, prompt_ids, answer_tok[i], count=count)
                    insight = insight_scores(steps, gen, prompt_ids, needle_tok[i], strict=insight_strict)
                    r_hits = retrieval_hits(steps, gen, prompt_ids, answer_tok[i])
                    i_hits = insight_hits(steps, gen, prompt_ids, needle_tok[i], strict=insight_strict)
                kept = tuple(tokens[:-1] if tokens and tokens[-1] in eos else tokens)
                results[i] = Decoded(
                    text=_cut(tokenizer.decode(list(kept), skip_special_tokens=True), stop_strings),
                    token_ids=kept,
                    retrieval=retrieval,
                    insight=insight,
                    argmax=argmax[row] if keep_argmax else None,
                    retrieval_hits=r_hits,
                    insight_hits=i_hits,
                )
            if progress is not None:
                progress(len(batch))
    return results


def _cut(text: str, stop_strings: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    return text[: min(cuts)] if cuts else text


def _stopped(tokenizer, tokens: list[int], stop_strings: Sequence[str]) -> bool:
    if not stop_strings:
        return False
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return any(s and s in text for s in stop_strings)


def _decode_batch(
    model,
    tokenizer,
    batch_ids: list[list[int]],
    *,
    max_new_tokens: int,
    stop_strings: tuple[str, ...],
    eos: set[int],
    scored: bool,
    patch: Patch | None,
    argmax_over: str = "all",
) -> tuple[list[list[int]], list[np.ndarray] | None]:
    """Decodes one left-padded batch.

    Returns each row's generated tokens (ending token included) and, when scored, each
    row's `[steps, layer, head]` argmax as a position in that row's unpadded sequence (prompt,
    then generated tokens; -1: no candidate key visible).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    n_rows, width = len(batch_ids), max(len(x) for x in batch_ids)
    input_ids = torch.full((n_rows, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n_rows, width), dtype=torch.long)
    for row, tokens in enumerate(batch_ids):
        input_ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at 0
    pads = torch.tensor([width - len(x) for x in batch_ids])

    context_len = width if argmax_over == "prompt" else None  # the padded prompt is cache [0, width)
    recorder = HeadArgmax(architecture(model).n_layers, context_len=context_len) if scored else None
    extra = {ARGMAX_KWARG: recorder} if scored else {}
    # a cache without the config keeps every position, so cache index == padded position
    # even under a sliding window (the mask, not the cache, applies the window)
    cache = DynamicCache()
    with ExitStack() as prefill:
        if patch is not None:
            prefill.enter_context(patch_heads(model, patch.heads, _record_source(patch, input_ids, mask, positions)))
        out = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=True, logits_to_keep=1, **extra,
        )

    generated: list[list[int]] = [[] for _ in range(n_rows)]
    done = [False] * n_rows
    steps: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        next_token = out.logits[:, -1].argmax(-1)  # [batch]
        if scored:
            steps.append(recorder.take())
        for row, token in enumerate(next_token.tolist()):
            if done[row]:
                continue
            generated[row].append(token)
            done[row] = token in eos or _stopped(tokenizer, generated[row], stop_strings)
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(n_rows, 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=next_token[:, None], attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=True, **extra,
        )
    if not scored:
        return generated, None
    cache_index = torch.stack(steps).cpu()  # [steps, batch, layer, head]
    # left padding shifts prompt and generated tokens alike, so one subtraction maps both
    prompt_index = torch.where(cache_index >= 0, cache_index - pads[None, :, None, None], cache_index)
    per_row = [prompt_index[: len(generated[row]), row].numpy() for row in range(n_rows)]
    return generated, per_row


def _record_source(patch: Patch, input_ids, mask, positions) -> dict[int, torch.Tensor]:
    """Runs model A's prefill on the same padded batch, recording the patched heads."""
    source = patch.source
    device = next(source.parameters()).device
    with record_heads(source, patch.heads) as recorded:
        source(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
            use_cache=False, logits_to_keep=1,
        )
    if not recorded and patch.heads:
        raise HeadError("patch source recorded nothing")
    return recorded
