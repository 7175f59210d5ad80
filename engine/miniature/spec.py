"""The miniature's recipe: every setting that determines its base model (the cache key), in a
module of its own so that the experiment loader reads `miniature:` without torch.

Example:
    >>> MiniatureSpec(steps=3000, context=128).context
    128
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class MiniatureError(RuntimeError):
    """The miniature cannot be pretrained as its recipe says, or the pretrained one does not
    retrieve by content at its own length."""


GATES = ("copy", "mdqa", "musique", "summhay")


@dataclass(frozen=True)
class Stage:
    """One stage of a gated curriculum: a mix that trains until its gate passes.

    Attributes:
        name: what the report calls it.
        mix: weights of the `corpus.KINDS` (copy, lookup, the three drills, task QA).
        longest: longest sequence in tokens (None: the pretraining length).
        gate: what ends the stage early: "copy" (copy accuracy at random depths at `longest`)
            or a task (teacher-forced exact answers on held-out prompts of that task at
            `longest`); None runs the stage for `max_steps`.
        bar: the gate's accuracy that ends the stage.
        max_steps: the stage ends here when its gate has not passed.
    """

    name: str
    mix: tuple[float, ...]
    longest: int | None = None
    gate: str | None = None
    bar: float = 0.95
    max_steps: int = 1000

    def __post_init__(self):
        object.__setattr__(self, "mix", tuple(float(w) for w in self.mix))
        object.__setattr__(self, "bar", float(self.bar))
        if len(self.mix) != 6 or sum(self.mix) <= 0 or min(self.mix) < 0:
            raise ValueError(f"stage {self.name!r}: mix {list(self.mix)} must give six weights >= 0, not all 0: "
                             "copy, lookup, the MDQA, MuSiQue and SummHay drills, task QA")
        if self.gate is not None and self.gate not in GATES:
            raise ValueError(f"stage {self.name!r}: gate {self.gate!r}; choose from {', '.join(GATES)} or null")
        if self.max_steps < 1:
            raise ValueError(f"stage {self.name!r}: max_steps {self.max_steps} must be >= 1")
        if self.longest is not None and self.longest < 48:  # corpus.PretrainingMix.SHORT
            raise ValueError(f"stage {self.name!r}: longest {self.longest} must be >= 48 tokens, the shortest "
                             "sequence the pretraining mix draws")


@dataclass(frozen=True)
class MiniatureSpec:
    """Everything that determines the miniature base model (the cache key).

    Attributes:
        seed: world and training seed.
        n_layers / n_heads / n_kv_heads / hidden / intermediate: Llama dimensions (GQA).
        head_dim: per-head width (default hidden / n_heads). RoPE rotates head_dim / 2
            frequency pairs; with few pairs, raising the base moves even the fast ones a lot.
        context: pretraining length in tokens.
        rope_base: RoPE base during pretraining.
        steps / batch_size / lr / warmup_steps: optimization (`steps` counts both phases).
        phase1_steps: first steps on short copy probes alone, where the copy heads form.
        phase1_length: longest sequence in phase 1.
        ramp_steps: steps after phase 1 over which the longest length grows to `context` and
            the mix moves from copy alone to `mix`.
        mix: weights of the `corpus.KINDS` (copy, lookup, the MDQA, MuSiQue and SummHay drills,
            task QA) after phase 1, at lengths up to `context`.
        rope_jitter: from step `rope_jitter_from`, every other step on average trains at a RoPE
            base drawn log-uniformly from [rope_base, rope_base * rope_jitter] (1: off); the
            rest, and the saved model, keep `rope_base`. A large model tolerates a raised base
            at its own length; a tiny one with few frequency pairs does not unless trained to
            (see `rope_jitter_callback`).
        rope_jitter_from: the first jittered step (None: the end of phase 1). Jitter while
            the skills form slows them (measured: copy at L 0.22 against 0.84 at step 3,000);
            jitter over the last steps keeps them and makes them robust to a raised base.
        lm_share: share of drill and QA sequences trained with next-token loss on every token
            (documents and questions too), the rest on their answers alone.
        stages: a gated curriculum between phase 1 and `mix` (default none): each `Stage`
            trains its own mix until its gate passes (checked every `gate_every` steps on
            `gate_probes` probes or held-out prompts) or for its `max_steps`, entered by a
            ramp of `ramp_steps` from the mix and length before it; `mix` then runs to `steps`.
        gate_every / gate_probes: how often and on how many examples a stage's gate is checked.
        max_span: longest copied span.
        qa_per_task: distinct short real-variant examples per task in the QA part of the
            corpus; the rendered sources grow to hold them (`source_sizes`).
        min_accuracy: copy accuracy required at `context` (random depths).
        check_probes: probes per length in the final check.
        threads: torch threads while pretraining.
    """

    seed: int = 0
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int | None = 32
    hidden: int = 192
    intermediate: int = 512
    context: int = 192
    rope_base: float = 10000.0
    steps: int = 7000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    phase1_steps: int = 800
    phase1_length: int = 96
    ramp_steps: int = 800
    mix: tuple[float, ...] = (0.2, 0.05, 0.25, 0.15, 0.2, 0.15)
    rope_jitter: float = 8.0
    rope_jitter_from: int | None = 5600
    lm_share: float = 1.0
    stages: tuple[Stage, ...] = ()
    gate_every: int = 100
    gate_probes: int = 32
    max_span: int = 32
    qa_per_task: int = 3000
    min_accuracy: float = 0.95
    on_failed_check: str = "raise"  # or "warn": keep the model, flag it in miniature.json and the report
    check_probes: int = 64
    threads: int = 2

    def __post_init__(self):
        # YAML gives lists, and ints where floats are meant (`rope_jitter: 32`); the spec must
        # stay hashable and hash the same either way, or an equal spec pretrains again.
        object.__setattr__(self, "mix", tuple(float(w) for w in self.mix))
        object.__setattr__(self, "stages", tuple(s if isinstance(s, Stage) else Stage(**s) for s in self.stages))
        for f in dataclasses.fields(self):
            if f.type == "float":  # annotations are strings here (from __future__ import annotations)
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
        if self.on_failed_check not in ("raise", "warn"):
            raise ValueError(f"miniature.on_failed_check: {self.on_failed_check!r}; choose 'raise' or 'warn'")
        if len(self.mix) != 6:
            raise ValueError(f"miniature.mix: {list(self.mix)} must give six weights: copy, lookup, the MDQA, "
                             "MuSiQue and SummHay drills, task QA")
        if self.n_heads % self.n_kv_heads or (self.head_dim is None and self.hidden % self.n_heads):
            raise ValueError(f"miniature: hidden {self.hidden}, heads {self.n_heads}, kv heads "
                             f"{self.n_kv_heads} do not divide evenly")
        longest = [s.longest for s in self.stages if s.longest is not None and s.longest > self.context]
        if longest:
            raise ValueError(f"miniature.stages: longest {longest[0]} exceeds the context {self.context}")
        if self.gate_every < 1 or self.gate_probes < 1:
            raise ValueError(f"miniature: gate_every {self.gate_every} and gate_probes {self.gate_probes} must be >= 1")
