"""The hf backend end to end: a tiny random Llama generating through Ray Data actors on CPU.

The model's output is gibberish, so the test checks mechanics: texts equal a direct
`model.generate` reference, generation ran in Ray actors, validation counts failures, and
a re-run is served from the cache.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from engine.synth import SynthConfig, Synthesizer, make_request
from engine.config import ModelConfig
from engine.synth.hf import HFBackend, HFGenerator
from engine.synth.prompts import build_chat
from engine.synth.synthesizer import attempt_seed
from engine.synth.validate import check


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny import save_tiny

    # prompts are ~450 characters = tokens with the char tokenizer
    return str(save_tiny("llama", tmp_path_factory.mktemp("synth_hf") / "llama", max_position_embeddings=2048))


def reference(path, chats, max_new_tokens, seeds=None, temperature=0.0, top_p=1.0):
    """Each chat alone, unpadded, rendered as a plain transcript: greedy through `model.generate`;
    sampled by a hand loop of full forwards (no cache), drawing each token from the softmax at
    `temperature`, cut to top-p by hand, with a generator seeded by the row's seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    eos = model.generation_config.eos_token_id
    out = []
    for i, chat in enumerate(chats):
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in chat) + "assistant:"
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        if seeds is None:
            gen = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, pad_token_id=0, do_sample=False)
            out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
            continue
        g = torch.Generator().manual_seed(seeds[i])
        new = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)).logits[0, -1]
                probs = torch.softmax(logits / temperature, dim=-1).tolist()
                kept, mass = set(), 0.0
                for t in sorted(range(len(probs)), key=lambda t: -probs[t]):
                    if mass >= top_p:
                        break
                    kept.add(t)
                    mass += probs[t]
                p = torch.tensor([q if t in kept else 0.0 for t, q in enumerate(probs)])
                new.append(int(torch.multinomial(p, 1, generator=g)))
                if new[-1] == eos:
                    break
        out.append(tok.decode(new, skip_special_tokens=True))
    return out


def run_with_timeout(fn, seconds=240):
    """Runs fn in a thread and fails the test if it does not return in time."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"Ray Data generation did not finish in {seconds} s"
    return result["value"]


def test_hf_backend_greedy_matches_model_generate_in_ray_actors(ray_cluster, tiny_llama):
    chats = [[{"role": "user", "content": f"Tell me about {name}."}] for name in ("Ada", "Bo", "Cyrus Z", "Dee")]
    cfg = SynthConfig(backend="hf", model=tiny_llama, temperature=0, max_tokens=8, batch_size=3, concurrency=1)
    backend = HFBackend(cfg)
    texts = run_with_timeout(lambda: backend.complete(chats, [0, 1, 2, 3]))
    expected = reference(tiny_llama, chats, 8)
    assert texts == expected
    assert len(set(expected)) > 1  # the prompts really lead to different outputs
    assert backend.workers, "no worker recorded"
    for worker in backend.workers:
        pid, actor = worker.split(":")
        assert int(pid) != os.getpid() and actor != "None"  # ran in a Ray actor, not in the driver


@pytest.mark.parametrize("top_p", [1.0, 0.3])
def test_hf_generator_samples_each_row_of_a_batch_from_its_own_seed(tiny_llama, top_p):
    # the actor class is plain Python: sampling is checked without Ray. The batch pads its
    # rows (prompts of different lengths), the reference runs each row alone.
    chats = [[{"role": "user", "content": "Say something."}]] * 2 + [[{"role": "user", "content": "Other, longer."}]]
    seeds = [5, 6, 5]
    generator = HFGenerator(ModelConfig("tiny", tiny_llama), max_tokens=6, temperature=1.5, top_p=top_p)
    texts = generator.generate(chats, seeds)
    assert texts == reference(tiny_llama, chats, 6, seeds=seeds, temperature=1.5, top_p=top_p)
    assert texts[0] != texts[1]  # same prompt, different seeds
    assert generator.generate(chats[1:2], seeds[1:2]) == texts[1:2]  # a row's text does not depend on its batch


def test_hf_synthesizer_validates_retries_and_caches(ray_cluster, tiny_llama, tmp_path):
    insight = "Teams that meet weekly report fewer missed deadlines than teams that meet monthly."
    reqs = [
        make_request("simplify_insight", template="Weekly meetings help.", insight=insight, seed=1),
        make_request("paraphrase_needle", template="Ada lives in Rome.", sentence="Ada lives in Rome.",
                     answer="Rome", seed=2),
    ]
    cfg = SynthConfig(backend="hf", model=tiny_llama, temperature=1.0, top_p=1.0, max_tokens=10, max_retries=1,
                      batch_size=2)
    synth = Synthesizer(cfg, tmp_path / "cache", show_progress=False)
    texts = run_with_timeout(lambda: synth.generate(reqs))

    # expected: sample each request with its attempt seeds until an output validates
    expected, invalid, generated = [], 0, 0
    for r in reqs:
        for attempt in range(2):
            seed = attempt_seed(r.seed, attempt)
            raw = reference(tiny_llama, [build_chat(r)], 10, seeds=[seed], temperature=1.0)[0]
            generated += 1
            verdict = check(r, raw)
            if verdict.ok:
                expected.append(verdict.text)
                break
            invalid += 1
        else:
            expected.append(r.template)
    assert invalid >= 2  # a random model cannot keep "Rome" in a paraphrase, so it was retried
    assert texts == expected
    report = synth.report
    assert texts[1] == reqs[1].template and report["fallback"] == 1
    assert report["invalid_outputs"] == invalid
    assert report["generated"] == generated
    assert report["retried"] == generated - len(reqs)

    again = Synthesizer(cfg, tmp_path / "cache", show_progress=False)
    again.backend = _Forbidden()  # everything must now come from the cache
    assert again.generate(reqs) == texts
    assert again.report["generated"] == 0 and again.report["cache_hits"] == generated


class _Forbidden:
    def complete(self, chats, seeds):
        raise AssertionError("backend called although every generation is cached")


def test_hf_generator_loads_safetensors_only(tmp_path):
    """A checkpoint that ships only a pickle (pytorch_model.bin) is refused, not unpickled."""
    from tiny import char_tokenizer, tiny_model

    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    char_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(OSError, match="safetensors"):
        HFGenerator(ModelConfig("pickled", str(tmp_path)), max_tokens=4, temperature=0.0, top_p=1.0)


@pytest.mark.slow
def test_real_llm_writes_needles_through_ray_actors_validated_and_cached(ray_cluster, tmp_path):
    """SmolLM2-135M-Instruct (fetched by scripts/setup.sh) writes MDQA `hl` needle paragraphs."""
    import random

    from engine.model_sources import resolve_model
    from tasks import fiction

    rng = random.Random(0)
    opts = dict(fiction.OPTIONS_DEFAULTS)
    reqs = []
    for i, (entity, value) in enumerate([("Velorin Abbey", "Drathis Kell"), ("Mount Quessa", "Orlan Vey")]):
        facts = [fiction.Fact(entity, "founder", value), fiction.Fact(entity, "location", "Tarsk")]
        reqs.append(fiction.paragraph_request(rng, entity, facts, opts, seed=i, answer=value))
    cfg = SynthConfig(backend="hf", model="smollm2-135m-instruct", temperature=0, max_tokens=120, batch_size=2)
    synth = Synthesizer(cfg, tmp_path / "cache", show_progress=False)
    texts = run_with_timeout(lambda: synth.generate(reqs), seconds=1800)

    # reference: the same greedy generation in this process, validated by the kind's check
    direct = HFGenerator(ModelConfig("smollm2", resolve_model("smollm2-135m-instruct")), max_tokens=120, temperature=0,
                         top_p=1.0)
    verdicts = [check(r, raw) for r, raw in zip(reqs, direct.generate([build_chat(r) for r in reqs], [0, 1]))]
    assert texts == [v.text if v.ok else r.template for v, r in zip(verdicts, reqs)]
    # Greedy SmolLM2-135M writes these paragraphs bare, without their labels (measured: one of the
    # two passes the check, the other never names its entity), so a template stands in for the
    # invalid one; a valid paragraph parses back.
    written = [t for t, v in zip(texts, verdicts) if v.ok]
    for text in written:
        parsed = fiction.parse_paragraph(text)
        assert parsed is not None and text not in [r.template for r in reqs]
    report = synth.report
    assert report["valid_first_try"] == len(written) and report["fallback"] == len(reqs) - len(written)
    again = Synthesizer(cfg, tmp_path / "cache", show_progress=False)
    again.backend = _Forbidden()
    assert again.generate(reqs) == texts and again.report["cache_hits"] == len(reqs)
