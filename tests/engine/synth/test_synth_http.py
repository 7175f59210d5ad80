"""The http backend against a real OpenAI-compatible server on 127.0.0.1 that generates with a
tiny HF model: bounded parallelism, retries on 503, timeouts, errors, and the synthesizer on top."""

from __future__ import annotations

import pytest

from engine.synth import SynthConfig, SynthError, Synthesizer, make_request
from engine.synth.openai_http import HTTPBackend
from synth_openai_server import ChatServer


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny import save_tiny

    return str(save_tiny("llama", tmp_path_factory.mktemp("synth_http") / "llama", max_position_embeddings=2048))


def direct(model_path, chats, max_tokens):
    """Reference: the same generator called in-process, one chat at a time."""
    from engine.config import ModelConfig
    from engine.synth.hf import HFGenerator

    g = HFGenerator(ModelConfig("tiny", model_path), max_tokens=max_tokens, temperature=0.0, top_p=1.0)
    return [g.generate([c], [0])[0] for c in chats]


def test_http_backend_generates_in_order_with_bounded_parallelism(tiny_llama):
    chats = [[{"role": "user", "content": f"Describe item {i}{'!' * i}"}] for i in range(6)]
    with ChatServer(tiny_llama, fail_first=2, delay_s=0.05) as server:
        cfg = SynthConfig(backend="http", model="tiny", base_url=server.base_url, temperature=0, max_tokens=7,
                          concurrency=2, timeout_s=20, max_retries=2)
        backend = HTTPBackend(cfg, backoff_s=0.01)
        texts = backend.complete(chats, list(range(6)))
        assert server.peak_in_flight == 2  # parallel, but never more than `concurrency`
        assert server.received == 6 + 2  # two 503s were retried
        assert backend.requests_sent == 8
    assert texts == direct(tiny_llama, chats, 7)
    assert len(set(texts)) > 1


def test_http_backend_timeout_and_errors(tiny_llama):
    chat = [[{"role": "user", "content": "hi"}]]
    with ChatServer(tiny_llama, delay_s=1.0) as server:
        cfg = SynthConfig(backend="http", model="tiny", base_url=server.base_url, timeout_s=0.2, max_retries=1)
        with pytest.raises(SynthError, match=r"failed after 2 attempts; last error: .*timed out"):
            HTTPBackend(cfg, backoff_s=0.01).complete(chat, [0])
    with ChatServer(tiny_llama) as server:
        bad = SynthConfig(backend="http", model="tiny", base_url=server.base_url.replace("/v1", "/v2"))
        with pytest.raises(SynthError, match="HTTP 404: .*no route /v2/chat/completions"):
            HTTPBackend(bad).complete(chat, [0])
    with pytest.raises(SynthError, match="NEEDLEWORK_TEST_KEY is not set"):
        HTTPBackend(SynthConfig(backend="http", model="m", base_url="http://127.0.0.1:9/v1",
                                api_key_env="NEEDLEWORK_TEST_KEY"))


def test_http_synthesizer_end_to_end(tiny_llama, tmp_path):
    insight = "Teams that meet weekly report fewer missed deadlines than teams that meet monthly."
    reqs = [make_request("simplify_insight", template="Weekly meetings help.", insight=insight, seed=s)
            for s in range(3)]
    reqs.append(make_request("paraphrase_needle", template="Ada lives in Rome.", sentence="Ada lives in Rome.",
                             answer="Rome"))
    with ChatServer(tiny_llama) as server:
        cfg = SynthConfig(backend="http", model="tiny", base_url=server.base_url, temperature=0, max_tokens=10,
                          concurrency=2, max_retries=1)
        synth = Synthesizer(cfg, tmp_path, show_progress=False)
        texts = synth.generate(reqs)
        sent = server.received
        again = Synthesizer(cfg, tmp_path, show_progress=False)
        assert again.generate(reqs) == texts
        assert server.received == sent  # the re-run was served from the cache
    report = synth.report
    assert report["requests"] == 4
    assert report["valid_first_try"] + report["fallback"] == 4
    assert report["generated"] == sent == 4 + report["retried"]  # one request per try, none wasted
    assert texts[3] == reqs[3].template and report["fallback"] >= 1  # "Rome" never survives a random model
