"""engine/store.py: atomic writes, manifest, run-directory guard."""

import multiprocessing as mp
import os
import signal
import time

import pyarrow as pa
import pytest

from engine.store import RunStore, StoreError, atomic_path, read_parquet, write_json, write_parquet


def test_interrupted_write_leaves_no_file_under_final_name(tmp_path):
    final = tmp_path / "out" / "table.parquet"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"PAR1 half")
            raise RuntimeError("crash mid-write")
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def _slow_writer(final):
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"x" * 1000)
            fh.flush()
            time.sleep(30)  # killed here


def test_killed_process_leaves_no_file_under_final_name(tmp_path):
    final = tmp_path / "killed.parquet"
    proc = mp.get_context("spawn").Process(target=_slow_writer, args=(final,))
    proc.start()
    deadline = time.time() + 20
    while time.time() < deadline and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert not final.exists()


def test_parquet_roundtrip_and_overwrite(tmp_path):
    table = pa.table({"a": [1, 2, 3]})
    write_parquet(table, tmp_path / "t.parquet")
    write_parquet(pa.table({"a": [4]}), tmp_path / "t.parquet")
    assert read_parquet(tmp_path / "t.parquet").column("a").to_pylist() == [4]
    with pytest.raises(StoreError, match="missing.parquet: missing"):
        read_parquet(tmp_path / "missing.parquet")


def test_manifest_records_and_checks_hash(tmp_path):
    store = RunStore(tmp_path)
    out = store.path("data", "mdqa", "real")
    out.mkdir(parents=True)
    assert not store.is_done("data/mdqa/real", "abc")
    store.mark_done("data/mdqa/real", "abc", out)
    assert store.is_done("data/mdqa/real", "abc")
    assert not store.is_done("data/mdqa/real", "changed")
    out.rmdir()
    assert not store.is_done("data/mdqa/real", "abc")  # output gone -> not done


def test_run_dir_from_other_experiment_is_refused(tmp_path):
    store = RunStore(tmp_path)
    store.save_config({"name": "a", "model": {"path": "m1"}}, "a")
    store.save_config({"name": "a", "model": {"path": "m1"}, "x": 1}, "a")
    with pytest.raises(StoreError, match="holds experiment 'a'.*Use another run_dir"):
        store.save_config({"name": "b", "model": {"path": "m1"}}, "b")
    with pytest.raises(StoreError, match="model 'm1'"):
        store.save_config({"name": "a", "model": {"path": "m2"}}, "a")


def test_write_json_atomic(tmp_path):
    write_json({"x": 1}, tmp_path / "a.json")
    assert (tmp_path / "a.json").read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
