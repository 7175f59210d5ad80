"""Synthesizer mechanics with a scripted backend: order, retries, fallback, raise, cache."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from engine.synth import SynthConfig, SynthError, Synthesizer, make_request, run_synth, write_requests
from engine.synth.synthesizer import attempt_seed


class ScriptedBackend:
    """Answers a paraphrase request validly only once `seed` is in `good_seeds`; counts calls."""

    def __init__(self, good_seeds):
        self.good_seeds = set(good_seeds)
        self.calls = 0
        self.items = 0

    def complete(self, chats, seeds):
        self.calls += 1
        self.items += len(chats)
        out = []
        for chat, seed in zip(chats, seeds):
            prompt = chat[-1]["content"]
            answer = prompt.split('Keep the exact text "')[1].split('"')[0]
            out.append(f"It is {answer}, says seed {seed}." if seed in self.good_seeds else "no idea")
        return out


def needles(n):
    return [
        make_request("paraphrase_needle", template=f"T{i} lives in City{i}.", seed=10 * i,
                     sentence=f"T{i} lives in City{i}.", answer=f"City{i}")
        for i in range(n)
    ]


CFG = SynthConfig(backend="hf", model="scripted", max_retries=2, temperature=0.7)


def test_template_backend_returns_templates():
    reqs = needles(3)
    synth = Synthesizer(SynthConfig(), None, show_progress=False)
    assert synth.generate(reqs) == [r.template for r in reqs]
    assert synth.report["template"] == 3 and synth.report["generated"] == 0


def test_retries_recover_and_fallback_is_counted(tmp_path):
    reqs = needles(4)
    # request 0 valid at once, 1 after one retry, 2 after two retries, 3 never
    good = {attempt_seed(0, 0), attempt_seed(10, 1), attempt_seed(20, 2)}
    backend = ScriptedBackend(good)
    synth = Synthesizer(CFG, tmp_path, backend=backend, show_progress=False)
    texts = synth.generate(reqs)
    assert texts == [
        f"It is City0, says seed {attempt_seed(0, 0)}.",
        f"It is City1, says seed {attempt_seed(10, 1)}.",
        f"It is City2, says seed {attempt_seed(20, 2)}.",
        reqs[3].template,
    ]
    r = synth.report
    assert (r["valid_first_try"], r["recovered"], r["fallback"]) == (1, 2, 1)
    assert r["invalid_outputs"] == 1 + 2 + 3  # request 1 failed once, 2 twice, 3 three times
    assert r["retried"] == 3 + 2  # pending before try 2 and before try 3
    assert r["generated"] == backend.items == 4 + 3 + 2
    assert backend.calls == 3  # one backend call per round
    assert r["reasons"]["paraphrase_needle"] == {"answer missing": 6, "fallback": 1}

    # a re-run with the same config replays from the Parquet cache: no backend call, same texts
    again = ScriptedBackend(set())
    synth2 = Synthesizer(CFG, tmp_path, backend=again, show_progress=False)
    assert synth2.generate(reqs) == texts
    assert again.calls == 0
    assert synth2.report["cache_hits"] == 9 and synth2.report["fallback"] == 1


def test_changed_sampling_misses_the_cache(tmp_path):
    reqs = needles(2)
    Synthesizer(CFG, tmp_path, backend=ScriptedBackend({0, 10}), show_progress=False).generate(reqs)
    other = ScriptedBackend({0, 10})
    cfg = SynthConfig(backend="hf", model="scripted", max_retries=2, temperature=0.3)
    Synthesizer(cfg, tmp_path, backend=other, show_progress=False).generate(reqs)
    assert other.items == 2


def test_duplicate_requests_generate_once():
    reqs = needles(1) * 3
    backend = ScriptedBackend({0})
    synth = Synthesizer(CFG, None, backend=backend, show_progress=False)
    assert len(set(synth.generate(reqs))) == 1
    assert backend.items == 1 and synth.report["valid_first_try"] == 3


def test_raise_policy_names_counts():
    cfg = SynthConfig(backend="hf", model="scripted", max_retries=1, on_invalid="raise")
    synth = Synthesizer(cfg, None, backend=ScriptedBackend({0}), show_progress=False)
    with pytest.raises(SynthError, match=r"1 of 2 requests still invalid after 1 retries .*answer missing"):
        synth.generate(needles(2))


def test_run_synth_from_file(tmp_path, monkeypatch):
    reqs = needles(3)
    write_requests(tmp_path / "req.parquet", reqs)
    report = run_synth(tmp_path / "req.parquet", SynthConfig(), tmp_path / "cache", out_path=tmp_path / "out.parquet",
                       show_progress=False)
    assert report["requests"] == 3 and report["template"] == 3
    assert pq.read_table(tmp_path / "out.parquet").column("text").to_pylist() == [r.template for r in reqs]
