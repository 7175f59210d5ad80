"""The pretraining mix of the miniature base model: copying, key lookup, drills and task QA.

A tiny model learns a positional shortcut whenever it can (DESIGN.md, "Known traps"): with a
fixed distance between a span and its copy it learns "attend k tokens back" within a hundred
steps and fails as soon as the distance varies. Every sequence here therefore puts its
needle at a random depth with a random gap, so only content-based retrieval pays:
- copy: noise, MARK, span, noise of random length, MARK -> span (Olsson et al. 2022
  induction), over every token of the vocabulary, character pieces included (the synthetic
  variants spell invented names and symbols in them);
- lookup: "key : value ," pairs in random order, then a key -> its value;
- mdqa / musique / summhay: drills, the task's prompt format with several questions per
  context at lengths from one document to the pretraining length (`drills.py`);
- qa: the real variants of MDQA, MuSiQue and SummHay built by `tasks/` from the rendered
  world at the pretraining length, with the miniature's task options (`TASK_OPTIONS`), so the
  base model answers exactly the prompts of the fine-tuning and evaluation data at its short
  context and fails beyond (the analog of an instruct model at 8K).
Loss is on the copies and answers only (labels -100 elsewhere).

Example:
    >>> qa = encode_qa(tokenizer, sum(task_examples(tokenizer, sources, 192, n=300, seed=0).values(), []))
    >>> mix = PretrainingMix(tokenizer, qa, context=192, size=32 * 1400, seed=0, batch_size=32, phase1=900,
    ...                      world=world)
    >>> item = mix[0]                      # {"input_ids": [...], "labels": [...]}
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tasks import get_task

from .drills import drill
from .spec import MiniatureError
from .world import WORD_PATTERN

COPY_MARK = "Copy"
LOOKUP_MARK = "Query"
TASKS = ("mdqa", "musique", "summhay")
KINDS = ("copy", "lookup", "mdqa", "musique", "summhay", "qa")
# The miniature's task options, at its pretraining length and 4x it (experiments/demo.yaml
# sets the same; a test holds them equal): MuSiQue writes its hops before the final answer,
# since three lookups in one step are beyond a four-layer model; SummHay cites two of eight
# documents (a random pair scores F1 0.25; of four, 0.5).
TASK_OPTIONS = {"mdqa": {}, "musique": {"answer_hops": True}, "summhay": {"n_documents": 8}}


@dataclass(frozen=True)
class Tokens:
    """Token ids the synthetic sequences are drawn from."""

    bos: int
    eos: int
    copy_mark: int
    lookup_mark: int
    colon: int
    comma: int
    words: tuple[int, ...]  # whole-word tokens (no specials, no marks)
    pieces: tuple[int, ...] = ()  # words and "##" continuation pieces


def token_ids(tokenizer) -> Tokens:
    vocab = tokenizer.get_vocab()
    reserved = {COPY_MARK, LOOKUP_MARK, ":", ","} | set(tokenizer.all_special_tokens)
    words = tuple(sorted(i for w, i in vocab.items() if w not in reserved and not w.startswith("##")))
    pieces = tuple(sorted(i for w, i in vocab.items() if w not in reserved))
    return Tokens(tokenizer.bos_token_id, tokenizer.eos_token_id, vocab[COPY_MARK], vocab[LOOKUP_MARK],
                  vocab[":"], vocab[","], words, pieces)


def copy_sequence(rng: random.Random, tokens: Tokens, length: int, span: int,
                  gap: int | None = None, pieces: bool = False) -> tuple[list[int], int]:
    """One copy probe of `length` tokens: (ids, index where the copied span starts).

    The span sits at a random depth; `gap` fixes the distance between span and copy (only
    to build a positional-shortcut model on purpose), otherwise it is whatever the depth
    leaves. Tokens are whole words, or with `pieces` any word or character piece.
    """
    free = length - 2 * span - 3  # bos + two marks
    if free < 0:
        raise ValueError(f"copy probe: span {span} does not fit in {length} tokens")
    gap = rng.randint(0, free) if gap is None else min(gap, free)
    words = tokens.pieces if pieces else tokens.words
    noise = [words[rng.randrange(len(words))] for _ in range(free)]
    content = [words[rng.randrange(len(words))] for _ in range(span)]
    before = free - gap
    ids = [tokens.bos] + noise[:before] + [tokens.copy_mark] + content + noise[before:] + [tokens.copy_mark]
    return ids + content, len(ids)


def lookup_sequence(rng: random.Random, tokens: Tokens, length: int) -> tuple[list[int], int]:
    """Key-value pairs filling about `length` tokens, then a query key: (ids, answer start)."""
    words, pairs, used, size = tokens.words, [], set(), 3
    while size + 8 < length:
        key = words[rng.randrange(len(words))]
        if key in used:
            continue
        used.add(key)
        value = [words[rng.randrange(len(words))] for _ in range(rng.randint(1, 3))]
        pairs.append((key, value))
        size += len(value) + 3
    key, value = pairs[rng.randrange(len(pairs))]
    ids = [tokens.bos]
    for k, v in pairs:
        ids += [k, tokens.colon] + v + [tokens.comma]
    ids += [tokens.lookup_mark, key, tokens.colon]
    return ids + value + [tokens.eos], len(ids)


def task_examples(tokenizer, sources: dict[str, dict[str, str]], context: int, n: int, seed: int,
                  split: str = "train", variants: tuple[str, ...] = ("real",)) -> dict[str, list[tuple[str, str]]]:
    """(prompt, target) pairs per task, built by the tasks' own code at the pretraining length.

    The base model then meets exactly the prompt styles of the fine-tuning and evaluation
    data, only short: `context` minus room for the answer.
    """
    pairs = {}
    for name in TASKS:
        examples = []
        for variant in variants:
            result = get_task(name).build(variant, sources=sources.get(name, {}), options=TASK_OPTIONS[name],
                                          tokenizer=tokenizer,
                                          target_tokens=context - 16, n=n, seed=seed, split=split)
            examples += [(e.prompt, e.target) for e in result.examples]
        pairs[name] = examples
    return pairs


def prompt_words(tokenizer, sources: dict[str, dict[str, str]], seed: int, n: int = 4, context: int = 512) -> list[str]:
    """Words the tasks' prompts use in at least two prompts (instructions, template frames,
    filler), so they become whole tokens; one-off random symbols do not."""
    texts = task_examples(tokenizer, sources, context, n, seed,
                          variants=("real", "hh", "hl", "lh", "ll", "symbolic"))
    seen: dict[str, int] = {}
    for pairs in texts.values():
        for prompt, _ in pairs:
            for word in set(re.findall(WORD_PATTERN, prompt)):
                seen[word] = seen.get(word, 0) + 1
    # Mixed letters-and-digits words are the variants' random symbols ("xq7b"), never words.
    mixed = re.compile(r"(?=.*[A-Za-z])(?=.*\d)")
    return sorted(w for w, c in seen.items() if c >= 2 and not mixed.match(w))


def encode_qa(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(ids, answer start) of prompt + target + eos."""
    encoded = []
    for prompt, target in pairs:
        p = tokenizer(prompt)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        encoded.append((p + t + [tokenizer.eos_token_id], len(p)))
    return encoded


class PretrainingMix:
    """A map-style dataset of whole batches, read in order: item i is drawn from a generator
    seeded by (seed, i); its batch (i // batch_size) fixes the kind and the length.

    One kind and one length per batch wastes no compute on padding (copy and lookup
    sequences run from ~20 tokens to `context`). Two phases, because copy heads form only
    when they are the cheapest way down the loss (Olsson et al. 2022): the first `phase1`
    batches are copy probes alone, `SHORT` to `phase1_length` tokens long, until the
    induction heads form (measured: ~800 steps at batch 32, DESIGN.md "Embedded default");
    a mixed run with lookup and QA from the start, or longer sequences while the heads
    form, never formed them within 1,200 steps. The remaining batches draw copy, lookup,
    the drills and QA by `weights` at lengths up to `context`, so copying holds at every
    depth there.

    Args:
        tokenizer: the world's tokenizer.
        qa: encoded QA examples (ids, answer start).
        context: the pretraining length; every sequence fits in it.
        size: number of items (steps x batch size).
        weights: mix of `KINDS` (copy, lookup, the three drills, qa) after phase 1.
        fixed_gap: copy distance held fixed (a positional-shortcut model, for tests).
        max_span: longest copied span.
        batch_size: items per batch (the trainer's, which must read items in order).
        phase1: batches of short copy probes alone at the start.
        phase1_length: longest sequence in phase 1.
        ramp: batches after phase 1 over which the longest length and the other kinds grow.
        world: the world the drills are written about (no drills without it).
        lm_share: share of drill and QA sequences with next-token loss on every token (the
            documents and questions too, as real pretraining has), not on the answers alone.
        stages: a gated curriculum (`spec.Stage`s) between phase 1 and `weights`. A stage
            ends after its `max_steps` batches, or earlier when `end_stage` is called (its
            gate passed); each start is recorded in `starts`, the run's curriculum.
    """

    SHORT = 48

    def __init__(self, tokenizer, qa: list[tuple[list[int], int]], context: int, size: int, seed: int,
                 weights: tuple[float, ...] = (0.5, 0.2, 0.0, 0.0, 0.0, 0.3), fixed_gap: int | None = None,
                 max_span: int = 32, batch_size: int = 1, phase1: int = 0, phase1_length: int = 96,
                 ramp: int = 0, world=None, lm_share: float = 0.0, stages: tuple = ()):
        if len(weights) != len(KINDS):
            raise ValueError(f"pretraining mix: weights {weights} must give one weight per kind {KINDS}")
        self.tokenizer, self.tokens, self.world = tokenizer, token_ids(tokenizer), world
        self.qa, self.context, self.size, self.seed = qa, context, size, seed
        self.weights = tuple(w if (k != "qa" or qa) and (k not in TASKS or world) else 0.0
                             for k, w in zip(KINDS, weights))
        self.fixed_gap, self.max_span = fixed_gap, max_span
        self.batch_size, self.phase1, self.phase1_length = batch_size, phase1, min(phase1_length, context)
        self.ramp, self.lm_share = ramp, lm_share
        self.n_batches = -(-size // batch_size)
        self.stages = tuple(stages)
        # starts[k]: first batch of stage k (k == len(stages): the final mix); known up to the
        # current stage, the next one is set when the current one ends.
        self.starts: list[int] = [phase1] if self.stages else []
        self.read = -1  # the last batch an item was read from (the trainer reads ahead)
        for kind, weight in zip(KINDS, self._all_weights()):
            if kind in TASKS and weight > 0 and self._drill(kind, random.Random(f"{seed}/fits/{kind}")) is None:
                raise MiniatureError(f"miniature.context {context}: no {kind} drill fits in {context} tokens "
                                 f"({self.DRILL_TRIES} draws); give it weight 0 in miniature.mix or a longer context")

    def __len__(self) -> int:
        return self.size

    def _all_weights(self) -> tuple[float, ...]:
        """The largest weight each kind gets anywhere in the run (a drill that can be drawn must fit)."""
        return self._usable(max([w] + [s.mix[k] for s in self.stages]) for k, w in enumerate(self.weights))

    def _usable(self, weights) -> tuple[float, ...]:
        return tuple(w if (k != "qa" or self.qa) and (k not in TASKS or self.world) else 0.0
                     for k, w in zip(KINDS, weights))

    def stage_of(self, batch: int) -> int | None:
        """The curriculum stage of `batch` (len(stages): the final mix; None: phase 1 or no stages).

        A stage that reaches its `max_steps` ends there: its successor's start is set here,
        the same in every run, whatever the gate checks say."""
        if not self.stages or batch < self.starts[0]:
            return None
        k = max(i for i, start in enumerate(self.starts) if start <= batch)
        while k < len(self.stages) and batch >= self.starts[k] + self.stages[k].max_steps:
            if len(self.starts) == k + 1:
                self.starts.append(self.starts[k] + self.stages[k].max_steps)
            k += 1
        return k

    def end_stage(self, stage: int) -> int | None:
        """Ends `stage` (its gate passed) before the next batch not yet read; returns the batch
        its successor starts at, or None when `stage` is no longer the current one."""
        if stage >= len(self.stages) or len(self.starts) != stage + 1:
            return None
        start = max(self.read + 1, self.starts[stage] + 1)
        if start >= self.starts[stage] + self.stages[stage].max_steps:
            return None  # it ends there anyway
        self.starts.append(start)
        return start

    def _stage_plan(self, batch: int, stage: int, rng: random.Random, short: int) -> tuple[str, int]:
        """(kind, length) of a batch in a curriculum stage: the stage's mix and longest length,
        reached from the previous stage's (or phase 1's) over `ramp` batches."""
        def setting(k):
            if k < 0:
                return (1.0, 0.0, 0.0, 0.0, 0.0, 0.0), self.phase1_length
            if k == len(self.stages):
                return self.weights, self.context
            return self._usable(self.stages[k].mix), self.stages[k].longest or self.context
        weights, longest = setting(stage)
        if self.ramp and (stage > 0 or self.phase1) and batch < self.starts[stage] + self.ramp:
            before, before_longest = setting(stage - 1)
            f = (batch - self.starts[stage] + 1) / (self.ramp + 1)
            weights = [(1 - f) * b + f * w for b, w in zip(before, weights)]
            longest = round(before_longest + f * (longest - before_longest))
        return rng.choices(KINDS, weights=weights)[0], rng.randint(short, max(short, longest))

    DRILL_TRIES = 200

    def _drill(self, kind: str, rng: random.Random):
        """A drill of `kind` at the full length: the first of `DRILL_TRIES` draws that fits, or None."""
        for _ in range(self.DRILL_TRIES):
            made = drill(kind, rng, self.world, self.tokenizer, self.context)
            if made is not None:
                return made
        return None

    def batch_plan(self, batch: int) -> tuple[str, int]:
        """(kind, length) shared by every item of `batch`."""
        rng = random.Random(f"{self.seed}/batch/{batch}")
        short = min(self.SHORT, self.context)
        if self.fixed_gap is not None:
            return rng.choices(KINDS, weights=self.weights)[0], self.context
        if batch < self.phase1:
            return "copy", rng.randint(short, max(short, self.phase1_length))
        if self.stages:
            return self._stage_plan(batch, self.stage_of(batch), rng, short)
        if batch < self.phase1 + self.ramp:
            # Heads formed at short range break when long sequences and new kinds arrive at
            # once: the longest length and the other kinds' share grow together, linearly.
            f = (batch - self.phase1 + 1) / (self.ramp + 1)
            longest = round(self.phase1_length + f * (self.context - self.phase1_length))
            weights = [1 - f * (1 - self.weights[0])] + [f * w for w in self.weights[1:]]
            return rng.choices(KINDS, weights=weights)[0], rng.randint(short, max(short, longest))
        kind = rng.choices(KINDS, weights=self.weights)[0]
        return kind, rng.randint(short, self.context)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:  # iteration stops here
            raise IndexError(f"pretraining mix item {i} out of range 0..{self.size - 1}")
        kind, length = self.batch_plan(i // self.batch_size)
        self.read = max(self.read, i // self.batch_size)
        rng = random.Random(self.seed * 1_000_003 + i)
        if kind == "copy":
            span = rng.randint(4, max(4, min(self.max_span, (length - 8) // 2)))
            ids, start = copy_sequence(rng, self.tokens, max(length, 2 * span + 8), span, self.fixed_gap,
                                       pieces=rng.random() < 0.5)
        elif kind == "lookup":
            ids, start = lookup_sequence(rng, self.tokens, max(length, 16))
        elif kind in TASKS:
            # A drill needs room for its documents and questions: when a draw does not fit,
            # the next draws take the full length (the batch is padded to its longest item).
            made = drill(kind, rng, self.world, self.tokenizer, length) or self._drill(kind, rng)
            if made is None:
                raise MiniatureError(f"pretraining mix item {i}: no {kind} drill fit in {self.context} tokens "
                                   f"in {self.DRILL_TRIES} draws")
            ids, labels = made
            if rng.random() < self.lm_share:
                labels = list(ids)
            return {"input_ids": ids, "labels": labels}
        else:
            ids, start = self.qa[rng.randrange(len(self.qa))]
        labels = [-100] * start + ids[start:]
        if kind == "qa" and rng.random() < self.lm_share:
            labels = list(ids)
        return {"input_ids": ids, "labels": labels}
