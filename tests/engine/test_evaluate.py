"""Sharded evaluation on a real local Ray cluster against in-process greedy decoding.

Reference: `engine.decode.greedy_decode` called directly on the same checkpoint (no Ray, no
shards), scored with the registered `mdqa` task's `score`; head scores from
`engine.head_scores.score_table` over its per-example scores.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from eval_data import make_examples, write_eval_set

from engine.config import EvaluateConfig, ModelConfig, ScoringConfig
from engine.decode import ScoreSpans, greedy_decode
from engine.evaluate import EvalError, EvalJob, EvalWorker, ModelRef, job_hash, run_eval_pool, run_jobs
from engine.head_scores import score_table
from engine.heads import Knockout
from engine.models import load_model, load_tokenizer
from engine.pool import ACTOR_PREFIX, WorkItem, pool_size
from tasks import mdqa

N_EXAMPLES = 40
MAX_NEW = 16  # the char vocabulary has no newline: every answer runs to this length
KNOCKED = ((0, 1), (1, 3))
SELF_PATCHED = 6  # examples
POOL = EvaluateConfig(num_actors=2, shard_size=2, max_retries=3, timeout_s=120, max_new_tokens=MAX_NEW, batch_size=1)


def tiny(ckpt: str) -> ModelRef:
    return ModelRef(ModelConfig("tiny", ckpt))


def job(name: str, ckpt: str, data: str, out: Path, evaluate: EvaluateConfig = POOL,
        scoring: ScoringConfig | None = ScoringConfig(), **kw) -> EvalJob:
    return EvalJob(name, tiny(ckpt), "mdqa", data, str(out), evaluate, scoring, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("evaluate")
    data = write_eval_set(root / "eval.parquet", N_EXAMPLES)
    ckpt = tiny_checkpoints["llama"]
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    examples = make_examples(N_EXAMPLES)
    spans = [ScoreSpans(tuple((s.start, s.end) for s in e.answer_spans),
                        tuple((s.start, s.end) for s in e.needle_spans)) for e in examples]
    prompts = [e.prompt for e in examples]
    kw = dict(max_new_tokens=MAX_NEW, stop_strings=mdqa.STOP_STRINGS, batch_size=1)
    ref = greedy_decode(model, tok, prompts, spans=spans, **kw)
    ref_ko = greedy_decode(model, tok, prompts, intervention=Knockout(KNOCKED), **kw)
    return {"root": root, "data": data, "ckpt": ckpt, "examples": examples, "ref": ref, "ref_ko": ref_ko}


@pytest.fixture(scope="module")
def undisturbed(setup, ray_cluster):
    """One pool run of a scored job and a knockout job (2 actors), shards kept."""
    kept = dataclasses.replace(POOL, keep_shards=True)
    jobs = [
        job("plain", setup["ckpt"], setup["data"], setup["root"] / "plain", kept),
        job("ko", setup["ckpt"], setup["data"], setup["root"] / "ko", kept, scoring=None, knockout=KNOCKED),
        # a model patched with its own activations must be the unpatched model
        job("self-patch", setup["ckpt"], setup["data"], setup["root"] / "self-patch",
            dataclasses.replace(kept, limit=SELF_PATCHED), patch_source=tiny(setup["ckpt"]), patch_heads=KNOCKED),
    ]
    summaries, stats = run_eval_pool(jobs, show_progress=False)
    return {"jobs": jobs, "summaries": summaries, "stats": stats}


def check_predictions(path: Path, examples, decoded) -> None:
    table = pq.read_table(path)
    assert table.column_names == ["id", "prediction", "f1", "em", "n_tokens"]
    assert table["id"].to_pylist() == [e.id for e in examples]  # data order, no row lost or doubled
    assert table["prediction"].to_pylist() == [d.text for d in decoded]
    assert table["f1"].to_pylist() == [mdqa.score(d.text, e)["f1"] for e, d in zip(examples, decoded)]
    assert table["em"].to_pylist() == [mdqa.score(d.text, e)["em"] for e, d in zip(examples, decoded)]
    assert table["n_tokens"].to_pylist() == [len(d.token_ids) for d in decoded]


def test_pool_matches_in_process_decoding(setup, undisturbed):
    ref, examples = setup["ref"], setup["examples"]
    assert undisturbed["stats"].n_actors == 2
    n_shards = 2 * N_EXAMPLES // POOL.shard_size + SELF_PATCHED // POOL.shard_size
    assert undisturbed["stats"].calls == n_shards and not undisturbed["stats"].retries
    check_predictions(setup["root"] / "plain" / "predictions.parquet", examples, ref)
    check_predictions(setup["root"] / "ko" / "predictions.parquet", examples, setup["ref_ko"])
    assert [d.text for d in setup["ref_ko"]] != [d.text for d in ref]  # the knockout changed something

    got = pq.read_table(setup["root"] / "plain" / "head_scores.parquet").to_pylist()
    want = score_table(np.stack([d.retrieval for d in ref]), np.stack([d.insight for d in ref])).to_pylist()
    assert len(got) == len(want) == 2 * 2 * 4
    for g, w in zip(got, want):
        assert (g["layer"], g["head"], g["kind"], g["n_examples"]) == (w["layer"], w["head"], w["kind"], w["n_examples"])
        assert g["score"] == pytest.approx(w["score"], abs=1e-12)
    assert any(w["score"] > 0 for w in want if w["kind"] == "retrieval")  # the comparison has teeth
    assert not (setup["root"] / "ko" / "head_scores.parquet").exists()

    patched = pq.read_table(setup["root"] / "self-patch" / "predictions.parquet")
    assert patched.equals(pq.read_table(setup["root"] / "plain" / "predictions.parquet").slice(0, SELF_PATCHED))
    patched_scores = pq.read_table(setup["root"] / "self-patch" / "head_scores.parquet")["score"].to_numpy()
    want = score_table(np.stack([d.retrieval for d in ref[:SELF_PATCHED]]),
                       np.stack([d.insight for d in ref[:SELF_PATCHED]]))["score"].to_numpy()
    np.testing.assert_allclose(patched_scores, want, atol=1e-12)

    summary = undisturbed["summaries"]["plain"]
    assert summary["n"] == N_EXAMPLES
    assert summary["f1"] == pytest.approx(np.mean([mdqa.score(d.text, e)["f1"] for e, d in zip(examples, ref)]))


def test_per_example_scores_step_hits_and_provenance_are_kept(setup, undisturbed):
    """head_examples.parquet holds what in-process decoding gives per example: scores and the
    per-step hits; summary.json names the commit that computed it."""
    import json
    import subprocess

    rows = pq.read_table(setup["root"] / "plain" / "head_examples.parquet").to_pylist()
    assert [r["id"] for r in rows] == [e.id for e in setup["examples"]]
    for row, ref in zip(rows, setup["ref"]):
        np.testing.assert_allclose(np.reshape(row["retrieval"], (2, 4)), ref.retrieval)
        np.testing.assert_allclose(np.reshape(row["insight"], (2, 4)), ref.insight)
        assert row["n_steps"] == len(ref.retrieval_hits)
        for kind, hits in (("retrieval", ref.retrieval_hits), ("insight", ref.insight_hits)):
            flat = np.zeros(hits.size, dtype=bool)
            flat[row[f"{kind}_hits"]] = True
            np.testing.assert_array_equal(flat.reshape(hits.shape), hits)
    assert any(r["retrieval_hits"] for r in rows)  # some head retrieved: the comparison has teeth
    assert not (setup["root"] / "ko" / "head_examples.parquet").exists()  # knockout runs are not scored
    summary = json.loads((setup["root"] / "plain" / "summary.json").read_text())
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert summary["provenance"]["git"]["commit"] == commit
    assert summary["provenance"]["actor_torch_threads"] == 1
    assert summary["scoring"] == {"argmax_over": "all", "count": "unique", "insight_strict": False}


def test_rerun_skips_existing_shards(setup, undisturbed, ray_cluster):
    out = setup["root"] / "resume"
    shutil.copytree(setup["root"] / "plain", out)
    before = pq.read_table(out / "predictions.parquet")
    shards = sorted((out / "shards").glob("*.parquet"))
    assert len(shards) == N_EXAMPLES // POOL.shard_size
    for path in (out / "predictions.parquet", out / "summary.json", shards[3], shards[7]):
        path.unlink()  # a driver that died after some shards
    resumed = job("resume", setup["ckpt"], setup["data"], out)
    summaries, stats = run_eval_pool([resumed], show_progress=False)
    assert stats.calls == 2 and stats.n_actors == 2  # only the two missing shards ran
    assert pq.read_table(out / "predictions.parquet").equals(before)
    assert not list((out / "shards").glob("*.parquet"))  # merged shards are removed by default

    again, stats = run_eval_pool([resumed], show_progress=False)
    assert stats.calls == 0 and stats.n_actors == 0  # a finished job starts no actor at all
    assert again == summaries


def test_killed_actor_mid_shard_loses_and_doubles_nothing(setup, undisturbed, ray_cluster):
    out = setup["root"] / "killed"
    killed: list[str] = []

    def kill_one_actor_mid_run():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((out / "shards").glob("*.parquet")):
            time.sleep(0.005)  # wait until actors are busy with shards
        names = sorted(n for n in ray_cluster.util.list_named_actors() if n.startswith(ACTOR_PREFIX))
        if names:
            ray_cluster.kill(ray_cluster.get_actor(names[0]))
            killed.append(names[0])

    killer = threading.Thread(target=kill_one_actor_mid_run)
    killer.start()
    summaries, stats = run_eval_pool([job("killed", setup["ckpt"], setup["data"], out)], show_progress=False)
    killer.join(timeout=130)
    assert killed, "no actor was found to kill"
    assert stats.retries, f"the kill hit no running shard: {stats.failures}"
    assert any(killed[0] in line for line in stats.failures)
    got = pq.read_table(out / "predictions.parquet")
    assert got.equals(pq.read_table(setup["root"] / "plain" / "predictions.parquet"))
    assert pq.read_table(out / "head_scores.parquet").equals(pq.read_table(setup["root"] / "plain" / "head_scores.parquet"))
    assert summaries["killed"]["n"] == N_EXAMPLES
    assert not [n for n in ray_cluster.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]  # pool released


def test_worker_runs_without_ray_and_keeps_its_model(setup):
    worker = EvalWorker(torch_threads=1)
    rows = pq.read_table(setup["data"]).to_pylist()
    j = job("local", setup["ckpt"], setup["data"], setup["root"] / "local")
    first = worker.run(j, 0, rows[:2])
    second = worker.run(j, 2, rows[2:4])
    assert worker.loads == 1
    assert first["index"].to_pylist() == [0, 1] and second["index"].to_pylist() == [2, 3]
    assert second["prediction"].to_pylist() == [d.text for d in setup["ref"][2:4]]
    worker.run(job("ko", setup["ckpt"], setup["data"], setup["root"] / "x", knockout=KNOCKED), 0, rows[:1])
    assert worker.loads == 1  # knockout runs on the same model pair


def test_bad_inputs_fail_with_clear_errors(setup, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nosuchtask'"):
        run_jobs([dataclasses.replace(job("a", setup["ckpt"], setup["data"], tmp_path / "a"), task="nosuchtask")])
    with pytest.raises(EvalError, match="does not exist"):
        run_jobs([job("a", setup["ckpt"], str(tmp_path / "nope.parquet"), tmp_path / "a")])
    with pytest.raises(EvalError, match="unique"):
        run_jobs([job("a", setup["ckpt"], setup["data"], tmp_path / "a")] * 2)
    with pytest.raises(EvalError, match=r"heads \[\(2, 0\)\] do not exist"):
        run_jobs([job("a", setup["ckpt"], setup["data"], tmp_path / "a", knockout=((0, 1), (2, 0)))])
    with pytest.raises(EvalError, match=r"jobs of one pool must agree on evaluate\.num_actors, .*shard_size"):
        run_jobs([job("a", setup["ckpt"], setup["data"], tmp_path / "a"),
                  job("b", setup["ckpt"], setup["data"], tmp_path / "b", dataclasses.replace(POOL, shard_size=3))])
    with pytest.raises(EvalError, match="go together"):
        job("a", setup["ckpt"], setup["data"], tmp_path / "a", patch_heads=((0, 0),))


def test_job_hash_follows_data_and_adapter_contents(tmp_path):
    data, adapter = tmp_path / "eval.parquet", tmp_path / "adapter"
    data.write_bytes(b"v1")
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"w1")
    j = EvalJob("a", ModelRef(ModelConfig("m", "base"), str(adapter)), "kv", str(data), str(tmp_path / "a"))
    first = job_hash(j)
    assert job_hash(dataclasses.replace(j, name="b", out_dir="elsewhere")) == first
    # how the pool runs does not change what a shard holds
    runtime = dataclasses.replace(j.evaluate, num_actors=7, cpus_per_actor=3, max_retries=0, timeout_s=5.0,
                                  keep_shards=True)
    assert job_hash(dataclasses.replace(j, evaluate=runtime)) == first
    assert job_hash(dataclasses.replace(j, evaluate=dataclasses.replace(j.evaluate, shard_size=8))) != first
    assert job_hash(dataclasses.replace(j, evaluate=dataclasses.replace(j.evaluate, gpus_per_actor=1))) != first
    bf16 = dataclasses.replace(j.model, model=dataclasses.replace(j.model.model, dtype="bfloat16"))
    assert job_hash(dataclasses.replace(j, model=bf16)) != first
    (adapter / "adapter_model.safetensors").write_bytes(b"w2")  # retrained at the same path
    second = job_hash(j)
    assert second != first
    data.write_bytes(b"v2")
    assert job_hash(j) not in (first, second)


def test_pool_size_from_free_resources():
    assert pool_size(EvaluateConfig(cpus_per_actor=1), 10, {"CPU": 2.0}) == 2
    assert pool_size(EvaluateConfig(cpus_per_actor=1), 1, {"CPU": 2.0}) == 1
    assert pool_size(EvaluateConfig(cpus_per_actor=0.5), 10, {"CPU": 2.0}) == 4
    assert pool_size(EvaluateConfig(gpus_per_actor=1), 10, {"CPU": 8.0, "GPU": 3.0}) == 3
    assert pool_size(EvaluateConfig(cpus_per_actor=4), 10, {"CPU": 2.0}) == 1  # at least one actor
    assert pool_size(EvaluateConfig(num_actors=6), 10, {"CPU": 2.0}) == 6
    assert WorkItem("k", "m", ()).size == 1


def test_an_actor_asked_for_bfloat16_holds_a_bfloat16_model_where_it_was_placed(setup, ray_cluster, tmp_path):
    """A real Ray actor of the pool's worker class, given the model section's dtype, holds its
    model in that dtype on the device `resolve_placement` chose, and the job's summary says so."""
    import ray

    from engine.placement import resolve_placement

    bf16 = ModelRef(ModelConfig("tiny", setup["ckpt"], dtype="bfloat16"))
    j = EvalJob("bf16", bf16, "mdqa", setup["data"], str(tmp_path / "bf16"), POOL, ScoringConfig())
    expected = resolve_placement(bf16.model, POOL.gpus_per_actor)
    assert (expected.device, expected.dtype, expected.attn_implementation) == ("cpu", "bfloat16", "sdpa")

    actor = ray.remote(EvalWorker).options(num_cpus=POOL.cpus_per_actor).remote(torch_threads=1)
    try:
        rows = pq.read_table(setup["data"]).to_pylist()[:2]
        table = ray.get(actor.run.remote(j, 0, rows), timeout=300)
        held = ray.get(actor.held.remote(), timeout=60)
    finally:
        ray.kill(actor)
    assert held == {"device": "cpu", "dtype": "bfloat16", "attn_implementation": "sdpa"}
    assert set(table["dtype"].to_pylist()) == {"bfloat16"} and set(table["device"].to_pylist()) == {"cpu"}

    summary = run_jobs([j], show_progress=False)["bf16"]
    assert summary["placement"] == [held]
    float32 = run_jobs([job("fp32", setup["ckpt"], setup["data"], tmp_path / "fp32")], show_progress=False)["fp32"]
    assert float32["placement"] == [{"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"}]
