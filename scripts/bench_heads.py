"""Benchmark of inline head scoring: time overhead over plain decoding and memory scaling.

Scoring in `engine.decode.greedy_decode` takes each head's attention argmax inside the
model's own attention call (O(heads x T) per step), so it should cost almost nothing and
its memory should grow linearly with the context, unlike an eager `output_attentions=True`
pass, which holds T x T weights per head and layer.

Measures, on random tiny-ish Llama-architecture models (GQA, CPU, one torch thread):
- `scored_over_plain`: CPU time of a scored greedy decode / a plain one (same model, batch,
  SDPA backend, prompts, one thread); goal <= 1.10. Also for the decoding steps alone, and
  the wall-time ratio.
- `memory_8k_over_1k`: peak RSS growth of a scored decode at an 8K context / at 1K, each
  length in a fresh subprocess; goal <= 9 (linear). `eager_memory_8k_over_1k`: the same for
  one eager `output_attentions=True` forward, for comparison.

With `--model smollm2-135m-instruct` (or any local checkpoint) the same on a real instruct
LLM, on pass-key prompts in real text (tasks/needle.py) through its chat template: scored over
plain decoding at 1K and 2K tokens (goal <= 1.10), and the peak memory of the scored decode
at 2K over 256 tokens (linear growth is <= 8; a T x T attention matrix would be ~64). EOS is
switched off, so every decode runs its whole token budget. Two whole decodes differ by their
prefills' noise (several percent on a CPU, as much as scoring costs), so the decoding steps are
also timed on one shared prefill (`time_steps`, plain and scored interleaved) and the whole
decode's ratio follows from those parts; `--only-steps` runs that alone.

Example:
    $ .venv/bin/python scripts/bench_heads.py --out runs/bench_heads.json
    $ .venv/bin/python scripts/bench_heads.py --model smollm2-135m-instruct --out runs/bench_heads_smollm2.json
    $ .venv/bin/python scripts/bench_heads.py --model smollm2-135m-instruct --only-steps --out runs/steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.store import write_json  # noqa: E402

LENGTHS = (1024, 2048, 4096, 8192)
REAL_CONTEXTS = (1024, 2048)
REAL_LENGTHS = (256, 512, 1024, 2048)
NQ = ROOT / "data" / "nq-open-oracle.jsonl.gz"
TIMING_MODEL = dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                    num_key_value_heads=2, head_dim=64)
MEMORY_MODEL = dict(num_hidden_layers=2, hidden_size=512, intermediate_size=1536, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=64)


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII (offsets come for free)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1}
    vocab.update({chr(c): len(vocab) for c in range(32, 127)})
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    inner.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", bos_token="<s>")
    tok.padding_side = "left"
    return tok


def random_model(shape: dict, attn_implementation: str = "sdpa", seed: int = 0):
    """A random Llama with no EOS, so every decode runs its full token budget."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, max_position_embeddings=16384, bos_token_id=1, eos_token_id=None,
                         pad_token_id=0, tie_word_embeddings=False, **shape)
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    return model


def prompts_and_spans(n: int, length: int, seed: int = 0):
    """Random printable prompts of exactly `length` characters with an answer and a needle span."""
    import random

    from engine.decode import ScoreSpans

    rng = random.Random(seed)
    prompts = ["".join(chr(rng.randrange(33, 127)) for _ in range(length)) for _ in range(n)]
    middle = length // 2
    spans = [ScoreSpans(answer_spans=((middle, middle + 8),), needle_spans=((middle - 40, middle + 40),))] * n
    return prompts, spans


def real_model(path: str, attn_implementation: str = "sdpa"):
    """A real checkpoint (or fetchable model name) and its tokenizer, with EOS switched off."""
    from engine.model_sources import resolve_model
    from engine.models import load_model, load_tokenizer

    path = resolve_model(path)
    model, tok = load_model(path, attn_implementation=attn_implementation), load_tokenizer(path)
    model.generation_config.eos_token_id = None
    tok.eos_token = None  # the pad token stays; decoding now runs its whole budget
    return model, tok


def pass_key_prompts(tok, n: int, length: int, seed: int = 0):
    """Pass-key prompts in real text whose templated form is `length` tokens (within 2%)."""
    from engine.chat import render_prompt
    from engine.decode import ScoreSpans
    from tasks import needle

    overhead = len(tok(render_prompt(tok, "").text, add_special_tokens=False)["input_ids"])
    examples = needle.build("real", sources={"haystack": str(NQ)}, options={}, tokenizer=tok,
                            target_tokens=length - overhead, n=n, seed=seed, split="eval").examples
    spans = [ScoreSpans(tuple((s.start, s.end) for s in e.answer_spans), tuple((s.start, s.end) for s in e.needle_spans))
             for e in examples]
    return [e.prompt for e in examples], spans


def timing_inputs(context: int, batch: int, model_path: str | None):
    """(model, tokenizer, prompts, spans) of a timing run: the random model on character prompts,
    or a real checkpoint on pass-key prompts."""
    if model_path is None:
        return random_model(TIMING_MODEL), char_tokenizer(), *prompts_and_spans(batch, context)
    model, tok = real_model(model_path)
    return model, tok, *pass_key_prompts(tok, batch, context)


def time_decode(context: int, batch: int, new_tokens: int, repeats: int, model_path: str | None = None) -> dict:
    """Plain vs scored greedy decoding: whole call and decoding steps (total minus prefill).

    The ratio uses process CPU time (one torch thread), the best of `repeats`: on a shared
    machine wall time mostly measures other processes. Wall times are reported alongside.
    """
    import torch

    from engine.decode import greedy_decode

    torch.set_num_threads(1)
    model, tok, prompts, spans = timing_inputs(context, batch, model_path)
    chat = model_path is not None

    def run(scored: bool, budget: int) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        greedy_decode(model, tok, prompts, max_new_tokens=budget, batch_size=batch,
                      spans=spans if scored else None, chat_template=chat)
        return time.process_time() - cpu, time.perf_counter() - wall

    run(True, 2), run(False, 2)  # warm-up
    runs = {key: [] for key in ("plain", "scored", "plain_prefill", "scored_prefill")}
    for _ in range(repeats):  # interleaved, so load from other processes hits both alike
        runs["plain"].append(run(False, new_tokens))
        runs["scored"].append(run(True, new_tokens))
        runs["plain_prefill"].append(run(False, 1))
        runs["scored_prefill"].append(run(True, 1))
    cpu = {key: min(c for c, _ in v) for key, v in runs.items()}
    wall = {key: min(w for _, w in v) for key, v in runs.items()}
    plain_steps = cpu["plain"] - cpu["plain_prefill"]
    scored_steps = cpu["scored"] - cpu["scored_prefill"]
    return {
        "context": context, "batch": batch, "new_tokens": new_tokens, "repeats": repeats,
        "cpu_seconds": cpu, "wall_seconds": wall,
        "scored_over_plain": cpu["scored"] / cpu["plain"],
        "scored_over_plain_wall": wall["scored"] / wall["plain"],
        "scored_over_plain_steps": scored_steps / plain_steps,
        "step_ms_plain": 1000 * plain_steps / (new_tokens - 1),
        "step_ms_scored": 1000 * scored_steps / (new_tokens - 1),
    }


def time_steps(context: int, batch: int, new_tokens: int, repeats: int, model_path: str | None = None) -> dict:
    """The decoding steps alone, scored against plain, on one shared prefill.

    A whole decode at 2K tokens is mostly its prefill, which scoring does not change, and two
    prefills of the same batch differ by several percent on a CPU; the difference of two
    such totals ("decoding steps only" of `time_decode`) then measures noise. Here the prompt is
    prefilled once; each repeat crops the KV cache back to the prompt and runs the same
    `new_tokens - 1` decode steps (the same fixed tokens) plain, then scored, under the
    engine's decode attention, as `greedy_decode` runs them. The whole-decode ratio follows
    as (prefill + scored steps) / (prefill + plain steps).
    """
    import torch
    from transformers import DynamicCache

    from engine.head_argmax import ARGMAX_KWARG, HeadArgmax, decoding_attention
    from engine.models import architecture

    from engine.chat import render_prompt

    torch.set_num_threads(1)
    model, tok, prompts, _ = timing_inputs(context, batch, model_path)
    if model_path is not None:  # through the chat template, as greedy_decode renders them
        prompts = [render_prompt(tok, p).text for p in prompts]
    encoded = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=model_path is None)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    width = ids.shape[1]
    steps = new_tokens - 1
    tokens = torch.randint(3, model.config.vocab_size, (steps, ids.shape[0]), generator=torch.Generator().manual_seed(0))
    recorder = HeadArgmax(architecture(model).n_layers, context_len=width)
    cache = DynamicCache()
    with torch.no_grad(), decoding_attention(model, scored=True):
        cpu = time.process_time()
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
              logits_to_keep=1, **{ARGMAX_KWARG: recorder})
        prefill = time.process_time() - cpu
        recorder.take()

        def run(scored: bool) -> float:
            extra_tokens = cache.get_seq_length() - width
            if extra_tokens:
                cache.crop(-extra_tokens)  # back to the prompt (this transformers takes tokens to remove)
            extra = {ARGMAX_KWARG: recorder} if scored else {}
            step_mask, step_positions = mask, positions[:, -1:]
            cpu = time.process_time()
            for step in range(steps):
                step_mask = torch.cat([step_mask, step_mask.new_ones(step_mask.shape[0], 1)], dim=1)
                step_positions = step_positions + 1
                out = model(input_ids=tokens[step][:, None], attention_mask=step_mask, position_ids=step_positions,
                            past_key_values=cache, use_cache=True, **extra)
                out.logits[:, -1].argmax(-1).tolist()
                if scored:
                    recorder.take()
            return time.process_time() - cpu

        run(False), run(True)  # warm-up
        plain, scored = [], []
        for _ in range(repeats):  # interleaved, so load from other processes hits both alike
            plain.append(run(False))
            scored.append(run(True))
    p, q = min(plain), min(scored)
    return {"context": width, "batch": ids.shape[0], "steps": steps, "repeats": repeats, "prefill_cpu_s": prefill,
            "steps_cpu_s": {"plain": p, "scored": q}, "step_ms": {"plain": 1000 * p / steps, "scored": 1000 * q / steps},
            "scored_over_plain_steps": q / p, "scored_over_plain_decode": (prefill + q) / (prefill + p)}


def memory_status() -> dict[str, float]:
    """Current and peak resident memory of this process, in MiB (Linux /proc)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # kB
    return fields


def reset_peak() -> float:
    """Resets the peak-RSS mark to the current RSS (ru_maxrss would include the parent's peak)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return memory_status()["VmRSS"]


def memory_child(mode: str, length: int, new_tokens: int, model_path: str | None = None) -> dict:
    """Runs in a fresh process: peak RSS growth of one scored decode or one eager pass."""
    import torch

    from engine.decode import ScoreSpans, greedy_decode

    torch.set_num_threads(1)
    if model_path is not None:
        return real_memory_child(mode, length, new_tokens, model_path)
    tok = char_tokenizer()
    prompts, spans = prompts_and_spans(1, length)
    with torch.no_grad():
        if mode == "scored":
            model = random_model(MEMORY_MODEL)
            greedy_decode(model, tok, ["warm up"], max_new_tokens=2, spans=[ScoreSpans((), ())])
            before = reset_peak()
            out = greedy_decode(model, tok, prompts, max_new_tokens=new_tokens, spans=spans)
            assert out[0].retrieval.shape == (MEMORY_MODEL["num_hidden_layers"], MEMORY_MODEL["num_attention_heads"])
        else:
            model = random_model(MEMORY_MODEL, attn_implementation="eager")
            model(torch.tensor([[5] * 8]), output_attentions=True)
            ids = torch.tensor([tok(prompts[0])["input_ids"]])
            before = reset_peak()
            model(ids, output_attentions=True, logits_to_keep=1)
    peak = memory_status()["VmHWM"]
    return {"mode": mode, "length": length, "baseline_mb": before, "peak_mb": peak, "growth_mb": peak - before}


def real_memory_child(mode: str, length: int, new_tokens: int, model_path: str) -> dict:
    """`memory_child` on a real model: a templated pass-key prompt of `length` tokens."""
    import torch

    from engine.chat import render_prompt
    from engine.decode import ScoreSpans, greedy_decode

    model, tok = real_model(model_path, attn_implementation="sdpa" if mode == "scored" else "eager")
    prompts, spans = pass_key_prompts(tok, 1, length)
    with torch.no_grad():
        if mode == "scored":
            greedy_decode(model, tok, ["warm up"], max_new_tokens=2, spans=[ScoreSpans((), ())],
                          chat_template=True)
            before = reset_peak()
            greedy_decode(model, tok, prompts, max_new_tokens=new_tokens, spans=spans, chat_template=True)
        else:
            model(torch.tensor([[5] * 8]), output_attentions=True)
            ids = torch.tensor([tok(render_prompt(tok, prompts[0]).text, add_special_tokens=False)["input_ids"]])
            before = reset_peak()
            model(ids, output_attentions=True, logits_to_keep=1)
    peak = memory_status()["VmHWM"]
    return {"mode": mode, "length": length, "baseline_mb": before, "peak_mb": peak, "growth_mb": peak - before}


def measure_memory(mode: str, new_tokens: int, model_path: str | None = None) -> list[dict]:
    rows = []
    for length in LENGTHS if model_path is None else REAL_LENGTHS:
        extra = [model_path] if model_path is not None else []
        done = subprocess.run(
            [sys.executable, __file__, "--child", mode, str(length), str(new_tokens), *extra],
            capture_output=True, text=True, timeout=600,
            # a fixed mmap threshold returns freed large tensors to the OS at once, so RSS follows
            # live tensors instead of glibc's adaptive heap (which made 1K runs vary by 30%)
            env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"},
        )
        if done.returncode != 0:
            raise RuntimeError(f"memory run {mode} at {length} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON file to write")
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens in the timing run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="a real checkpoint or fetchable model name (smollm2-135m-instruct)")
    parser.add_argument("--only-steps", action="store_true",
                        help="with --model: only the decoding steps on one shared prefill (minutes, not an hour)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # MODE LENGTH NEW_TOKENS [MODEL]
    args = parser.parse_args(argv)
    if args.child:
        mode, length, new_tokens, *model = args.child
        print(json.dumps(memory_child(mode, int(length), int(new_tokens), model[0] if model else None)))
        return {}
    if args.out is None:
        parser.error("--out is required")
    if args.model:
        return main_real(args)

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("timing plain vs scored decode", total=3)
        timing = time_decode(args.context, args.batch, args.new_tokens, args.repeats)
        bar.update(task, advance=1, description="memory: scored decode, 1K..8K")
        scored = measure_memory("scored", new_tokens=16)
        bar.update(task, advance=1, description="memory: eager output_attentions, 1K..8K")
        eager = measure_memory("eager", new_tokens=0)
        bar.update(task, advance=1)

    def ratio(rows):
        return rows[-1]["growth_mb"] / rows[0]["growth_mb"]

    result = {
        "scored_over_plain": timing["scored_over_plain"],
        "memory_8k_over_1k": ratio(scored),
        "eager_memory_8k_over_1k": ratio(eager),
        "timing": {**timing, "model": TIMING_MODEL, "backend": "sdpa", "device": "cpu", "torch_threads": 1},
        "memory": {"model": MEMORY_MODEL, "scored": scored, "eager": eager,
                   "method": "peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the pass, "
                             "fresh subprocess per length, MALLOC_MMAP_THRESHOLD_=65536"},
    }
    from engine.provenance import provenance

    write_json({**result, "provenance": provenance()}, args.out)

    table = Table(title="inline head scoring")
    for column in ("metric", "value", "goal", "detail"):
        table.add_column(column)
    t = timing
    table.add_row("scored / plain decode CPU time", f"{t['scored_over_plain']:.3f}", "<= 1.10",
                  f"{t['cpu_seconds']['scored']:.2f}s vs {t['cpu_seconds']['plain']:.2f}s; T={t['context']}, "
                  f"batch {t['batch']}, {t['new_tokens']} tokens")
    table.add_row("  wall time", f"{t['scored_over_plain_wall']:.3f}", "",
                  f"{t['wall_seconds']['scored']:.2f}s vs {t['wall_seconds']['plain']:.2f}s (shared machine)")
    table.add_row("  decoding steps only", f"{t['scored_over_plain_steps']:.3f}", "",
                  f"{t['step_ms_scored']:.1f} vs {t['step_ms_plain']:.1f} ms/step")
    table.add_row("scored decode memory 8K / 1K", f"{result['memory_8k_over_1k']:.2f}", "<= 9",
                  " ".join(f"{r['length'] // 1024}K:{r['growth_mb']:.0f}MB" for r in scored))
    table.add_row("eager output_attentions 8K / 1K", f"{result['eager_memory_8k_over_1k']:.2f}", "(comparison)",
                  " ".join(f"{r['length'] // 1024}K:{r['growth_mb']:.0f}MB" for r in eager))
    console.print(table)
    console.print(f"wrote {args.out}")
    return result


def main_real(args) -> dict:
    """The benchmark on a real model: timing at REAL_CONTEXTS, memory at REAL_LENGTHS."""
    from rich.console import Console
    from rich.table import Table

    from engine.model_sources import resolve_model

    console = Console()
    path = resolve_model(args.model)
    timings = []
    for context in REAL_CONTEXTS if not args.only_steps else ():
        console.print(f"timing plain vs scored decode at {context} tokens")
        timings.append(time_decode(context, args.batch, args.new_tokens, args.repeats, model_path=path))
    step_timings = []
    for context in REAL_CONTEXTS:
        console.print(f"timing plain vs scored decoding steps on one prefill at {context} tokens")
        step_timings.append(time_steps(context, args.batch, args.new_tokens, max(args.repeats, 5), model_path=path))
    scored = eager = []
    if not args.only_steps:
        console.print("memory: scored decode and eager output_attentions, 256..2K")
        scored = measure_memory("scored", new_tokens=256, model_path=path)
        eager = measure_memory("eager", new_tokens=0, model_path=path)

    def ratio(rows):
        return rows[-1]["growth_mb"] / rows[0]["growth_mb"] if rows else None

    result = {
        "model": args.model, "path": path,
        "scored_over_plain": {str(t["context"]): t["scored_over_plain"] for t in timings},
        "scored_over_plain_steps_shared_prefill": {str(c): t["scored_over_plain_steps"]
                                                   for c, t in zip(REAL_CONTEXTS, step_timings)},
        "scored_over_plain_decode_shared_prefill": {str(c): t["scored_over_plain_decode"]
                                                    for c, t in zip(REAL_CONTEXTS, step_timings)},
        "step_timing": step_timings,
        "memory_2k_over_256": ratio(scored),
        "eager_memory_2k_over_256": ratio(eager),
        "timing": [{**t, "backend": "sdpa", "device": "cpu", "torch_threads": 1, "chat_template": True}
                   for t in timings],
        "memory": {"scored": scored, "eager": eager, "scored_new_tokens": 256,
                   "method": "peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the pass, "
                             "fresh subprocess per length, MALLOC_MMAP_THRESHOLD_=65536"},
    }
    from engine.provenance import provenance

    write_json({**result, "provenance": provenance()}, args.out)
    table = Table(title=f"inline head scoring on {args.model}")
    for column in ("metric", "value", "goal", "detail"):
        table.add_column(column)
    for t in timings:
        table.add_row(f"scored / plain decode CPU time, {t['context']} tokens", f"{t['scored_over_plain']:.3f}",
                      "<= 1.10", f"{t['cpu_seconds']['scored']:.2f}s vs {t['cpu_seconds']['plain']:.2f}s; batch "
                      f"{t['batch']}, {t['new_tokens']} tokens")
        table.add_row("  decoding steps only", f"{t['scored_over_plain_steps']:.3f}", "",
                      f"{t['step_ms_scored']:.1f} vs {t['step_ms_plain']:.1f} ms/step")
    for c, t in zip(REAL_CONTEXTS, step_timings):
        table.add_row(f"scored / plain decoding steps, one prefill, {c} tokens", f"{t['scored_over_plain_steps']:.3f}",
                      "", f"{t['step_ms']['scored']:.1f} vs {t['step_ms']['plain']:.1f} ms/step, best of {t['repeats']}")
        table.add_row("  whole decode from these parts", f"{t['scored_over_plain_decode']:.3f}", "<= 1.10",
                      f"prefill {t['prefill_cpu_s']:.1f}s + {t['steps']} steps")
    if scored:
        table.add_row("scored decode memory 2K / 256 (256 new tokens)", f"{result['memory_2k_over_256']:.2f}",
                      "<= 8 (linear)", " ".join(f"{r['length']}:{r['growth_mb']:.0f}MB" for r in scored))
        table.add_row("eager output_attentions 2K / 256", f"{result['eager_memory_2k_over_256']:.2f}", "(comparison)",
                      " ".join(f"{r['length']}:{r['growth_mb']:.0f}MB" for r in eager))
    console.print(table)
    console.print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
