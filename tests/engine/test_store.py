"""engine/store.py: atomic writes, stale temporary entries, manifest, run-directory guard."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from engine.store import (TEMP_MARK, RunStore, StoreError, atomic_dir, atomic_path, clear_stale_temps, is_stale_temp,
                          read_parquet, write_json, write_parquet)


def temporaries(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if TEMP_MARK in p.name)


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


def test_killed_process_leaves_no_file_under_final_name_and_the_next_write_clears_its_leftover(tmp_path):
    final = tmp_path / "killed.parquet"
    proc = mp.get_context("spawn").Process(target=_slow_writer, args=(final,))
    proc.start()
    deadline = time.time() + 300  # a hang guard: the loop ends when the temporary file appears
    while time.time() < deadline and not temporaries(tmp_path):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(60)
    assert not final.exists()
    leftover = tmp_path / temporaries(tmp_path)[0]
    assert leftover.name.startswith(".killed.parquet.tmp@") and f"@{proc.pid}@" in leftover.name
    assert is_stale_temp(leftover)
    write_parquet(pa.table({"a": [1]}), final)
    assert temporaries(tmp_path) == [] and read_parquet(final).num_rows == 1


def test_clear_stale_temps_removes_dead_writers_leftovers_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    host = os.uname().nodename
    stale_file = tmp_path / "data" / f".train.parquet.tmp@{host}@{dead_pid}@x1"
    stale_dir = tmp_path / "models" / f".real.tmp@{host}@{dead_pid}@x2"
    live = tmp_path / f".report.tmp@{host}@{os.getppid()}@x3"  # a writer that still runs
    elsewhere = tmp_path / f".eval.tmp@another-host@{dead_pid}@x4"  # another machine's writer
    for path in (stale_file, live, elsewhere):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    (stale_dir / "inner").mkdir(parents=True)
    (stale_dir / "inner" / "adapter.safetensors").write_text("partial")
    keep = tmp_path / "data" / "val.parquet"
    keep.write_text("done")
    removed = clear_stale_temps(tmp_path)
    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert temporaries(tmp_path) == sorted(p.relative_to(tmp_path).as_posix() for p in (live, elsewhere))
    assert keep.read_text() == "done"


def test_atomic_dir_replaces_whole_or_leaves_the_old_one(tmp_path):
    final = tmp_path / "dataset"
    with atomic_dir(final) as tmp:
        (tmp / "train.parquet").write_text("v1")
        (tmp / "eval.parquet").write_text("v1")
    assert sorted(p.name for p in final.iterdir()) == ["eval.parquet", "train.parquet"]
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "train.parquet").write_text("v2")
            raise RuntimeError("crash mid-build")
    assert (final / "train.parquet").read_text() == "v1" and temporaries(tmp_path) == []
    with atomic_dir(final) as tmp:  # the new build has no eval split: nothing of the old one survives
        (tmp / "train.parquet").write_text("v3")
    assert [p.name for p in final.iterdir()] == ["train.parquet"] and (final / "train.parquet").read_text() == "v3"
    assert temporaries(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="exists and is not a directory"):
        with atomic_dir(tmp_path / "file"):
            pass


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


def test_run_dir_config_must_be_a_readable_mapping_and_a_manifest_needs_it(tmp_path):
    store = RunStore(tmp_path / "run")
    with pytest.raises(StoreError, match="run: no such run directory"):
        store.read_config()
    store.root.mkdir()
    with pytest.raises(StoreError, match=r"not a run directory \(no config.yaml\)"):
        store.read_config()
    (store.root / "config.yaml").write_text("a: [1,\n")
    with pytest.raises(StoreError, match=r"config.yaml: corrupt run config: .*\(line 2, column 1\)"):
        store.read_config()
    (store.root / "config.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(StoreError, match="config.yaml: corrupt run config: expected a mapping, got list"):
        store.save_config({"name": "a", "model": {"path": "m"}}, "a")
    (store.root / "config.yaml").unlink()
    write_json({"data/mdqa/real": {"hash": "h", "path": str(store.root)}}, store.root / "manifest.json")
    with pytest.raises(StoreError, match="holds a manifest.json but no config.yaml"):
        store.save_config({"name": "a", "model": {"path": "m"}}, "a")
    assert not (store.root / "config.yaml").exists()


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
