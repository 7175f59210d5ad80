"""The run directory: atomic writes, the resolved config and the manifest of finished work.

Stages talk only through files here. Every write goes to a temporary file (or directory) beside
its final path, then `os.replace` renames it, so a crash never leaves a half-written artifact
under its final name. A temporary entry is named after its final path, host and process
(`.<name>.tmp@<host>@<pid>@<random>`), so the next writer of that path, or the next run of
the pipeline, can tell the leftovers of a killed process from the work of a live one and clear
them. The manifest records each finished stage output with the hash of its inputs; a re-run
skips an output whose recorded hash matches and whose files exist.

Example:
    >>> store = RunStore("runs/demo")
    >>> write_json({"n": 10}, store.path("data", "mdqa", "real", "stats.json"))
    >>> store.mark_done("data/mdqa/real", "3f2a...", store.path("data", "mdqa", "real"))
    >>> store.is_done("data/mdqa/real", "3f2a...")
    True
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
TEMP_MARK = ".tmp@"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp@(?P<host>[^@/]+)@(?P<pid>\d+)@[^@/]*$")


class StoreError(ValueError):
    """A run directory that cannot be used as asked."""


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (PyYAML's own text spans several)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


# ----------------------------------------------------------------------------- atomic writes


def _host() -> str:
    return socket.gethostname().replace("@", "_").replace("/", "_") or "localhost"


def _temp_prefix(final: Path) -> str:
    return f".{final.name}{TEMP_MARK}{_host()}@{os.getpid()}@"


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_temp(path: Path) -> bool:
    """A temporary entry of this module whose writer, a process of this machine, is gone."""
    match = _TEMP_NAME.match(Path(path).name)
    if match is None or match["host"] != _host():
        return False  # another machine's writer (shared storage) may still be alive
    pid = int(match["pid"])
    return pid != os.getpid() and not process_alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clear_stale_temps(root: str | Path) -> list[Path]:
    """Removes every stale temporary entry under `root` (see `is_stale_temp`); returns them."""
    removed = []
    for current, dirs, files in os.walk(root):
        for name in list(dirs) + files:
            path = Path(current) / name
            if is_stale_temp(path):
                _remove(path)
                removed.append(path)
                if name in dirs:
                    dirs.remove(name)
    return removed


def _clear_stale_siblings(final: Path) -> None:
    pattern = glob.escape(str(final.parent / f".{final.name}")) + glob.escape(TEMP_MARK) + "*"
    for leftover in glob.glob(pattern):
        if is_stale_temp(Path(leftover)):
            _remove(Path(leftover))


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `final`; renames it to `final` only if the body succeeds.

    Leftovers of killed writers of `final` are cleared first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_siblings(final)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final), dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yields an empty temporary directory beside `final`; on success it replaces `final` whole.

    A reader sees the old directory or the new one, never a mix: an output of several files
    (a dataset, an adapter, a report) is published by renames only. If `final` exists it is
    moved aside under a temporary name first, so a crash between the two renames leaves no
    directory under the final name, and the next writer clears both leftovers.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not final.is_dir():
        raise StoreError(f"{final}: exists and is not a directory")
    _clear_stale_siblings(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix="old", dir=final.parent))
            os.replace(final, old)  # onto the empty directory just made
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(table: pa.Table, final: str | Path) -> Path:
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp)
    return Path(final)


def read_parquet(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: missing (has the stage that writes it run?)")
    return pq.read_table(path)


def write_json(data: Any, final: str | Path) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    return Path(final)


def write_text(text: str, final: str | Path) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_text(text)
    return Path(final)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


class RunStore:
    """A run directory (its layout: engine/layout.py) and its manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # resolved config -------------------------------------------------------------
    def read_config(self) -> dict:
        """The resolved config of the experiment that made this directory.

        Raises:
            StoreError: the directory is no run directory (no config.yaml), or its config is
                unreadable or not a mapping.
        """
        path = self.path(CONFIG)
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: no such run directory")
        if not path.is_file():
            raise StoreError(f"{self.root}: not a run directory (no {CONFIG})")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            problem = yaml_problem(err) if isinstance(err, yaml.YAMLError) else f"not UTF-8 ({err.reason})"
            raise StoreError(f"{path}: corrupt run config: {problem}") from None
        if not isinstance(data, dict):
            raise StoreError(f"{path}: corrupt run config: expected a mapping, got {type(data).__name__}")
        return data

    def check_config(self, resolved: dict, experiment_name: str) -> None:
        """Refuses a directory made by a different experiment, or one whose config is gone.

        A manifest without its config.yaml would count another experiment's outputs as done.
        """
        if not self.path(CONFIG).exists():
            if self.path(MANIFEST).exists():
                raise StoreError(f"{self.root}: holds a {MANIFEST} but no {CONFIG}, so what it records cannot be "
                                 f"checked against this experiment. Use another run_dir.")
            return
        previous = self.read_config()
        model = previous.get("model") if isinstance(previous.get("model"), dict) else {}
        if previous.get("name") != experiment_name or model.get("path") != resolved.get("model", {}).get("path"):
            raise StoreError(
                f"{self.root}: holds experiment {previous.get('name')!r} with model "
                f"{model.get('path')!r}; this config is {experiment_name!r} with "
                f"{resolved.get('model', {}).get('path')!r}. Use another run_dir."
            )

    def save_config(self, resolved: dict, experiment_name: str) -> None:
        """Writes the resolved config; refuses a directory made by a different experiment."""
        self.check_config(resolved, experiment_name)
        write_text(yaml.safe_dump(resolved, sort_keys=False), self.path(CONFIG))

    # manifest --------------------------------------------------------------------
    def manifest(self) -> dict[str, dict]:
        path = self.path(MANIFEST)
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{path}: corrupt manifest: {err}") from err
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise StoreError(f"{path}: corrupt manifest: expected a mapping of output -> record")
        return data

    def is_done(self, key: str, input_hash: str) -> bool:
        entry = self.manifest().get(key)
        return bool(entry and entry.get("hash") == input_hash and entry.get("path") and Path(entry["path"]).exists())

    def mark_done(self, key: str, input_hash: str, output: str | Path, **info: Any) -> None:
        manifest = self.manifest()
        manifest[key] = {"hash": input_hash, "path": str(output), "finished": time.time(), **info}
        write_json(manifest, self.path(MANIFEST))

    def forget(self, key: str) -> None:
        manifest = self.manifest()
        if manifest.pop(key, None) is not None:
            write_json(manifest, self.path(MANIFEST))
