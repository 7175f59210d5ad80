"""The run directory: atomic writes, the resolved config and the manifest of finished work.

Stages talk only through files here. Every write goes to a temporary file in the same
directory, then `os.replace` renames it, so a crash never leaves a half-written artifact under
its final name. The manifest records each finished stage output with the hash of its inputs;
a re-run skips an output whose recorded hash matches and whose files exist.

Example:
    >>> store = RunStore("runs/demo")
    >>> store.write_json(store.path("data", "mdqa", "real", "stats.json"), {"n": 10})
    >>> store.mark_done("data/mdqa/real", "3f2a...", store.path("data", "mdqa", "real"))
    >>> store.is_done("data/mdqa/real", "3f2a...")
    True
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

MANIFEST = "manifest.json"
CONFIG = "config.yaml"


class StoreError(ValueError):
    """A run directory that cannot be used as asked."""


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `final`; renames it to `final` only if the body succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
    """A run directory (layout in DESIGN.md) and its manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # resolved config -------------------------------------------------------------
    def save_config(self, resolved: dict, experiment_name: str) -> None:
        """Writes the resolved config; refuses a directory made by a different experiment."""
        existing = self.path(CONFIG)
        if existing.exists():
            previous = yaml.safe_load(existing.read_text()) or {}
            if previous.get("name") != experiment_name or previous.get("model", {}).get("path") != resolved.get(
                "model", {}
            ).get("path"):
                raise StoreError(
                    f"{self.root}: holds experiment {previous.get('name')!r} with model "
                    f"{previous.get('model', {}).get('path')!r}; this config is {experiment_name!r} with "
                    f"{resolved.get('model', {}).get('path')!r}. Use another run_dir."
                )
        write_text(yaml.safe_dump(resolved, sort_keys=False), existing)

    # manifest --------------------------------------------------------------------
    def manifest(self) -> dict[str, dict]:
        path = self.path(MANIFEST)
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{path}: corrupt manifest: {err}") from err

    def is_done(self, key: str, input_hash: str) -> bool:
        entry = self.manifest().get(key)
        return bool(entry and entry["hash"] == input_hash and Path(entry["path"]).exists())

    def mark_done(self, key: str, input_hash: str, output: str | Path, **info: Any) -> None:
        manifest = self.manifest()
        manifest[key] = {"hash": input_hash, "path": str(output), "finished": time.time(), **info}
        write_json(manifest, self.path(MANIFEST))

    def forget(self, key: str) -> None:
        manifest = self.manifest()
        if manifest.pop(key, None) is not None:
            write_json(manifest, self.path(MANIFEST))
