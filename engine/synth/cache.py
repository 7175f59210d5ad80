"""Content-addressed cache of generations: key = hash(chat, seed, model + sampling) -> raw text.

The raw backend output of every attempt is cached, not only the final text, so a re-run
replays validation (and its retry counts) exactly without calling the backend, and a change
to a validator is applied to cached outputs too. Entries are append-only Parquet shards in
the cache directory, each named by the hash of its keys and written atomically (temporary
file, then `os.replace`); concurrent writers never corrupt each other's shards.

Example:
    >>> cache = GenerationCache(Path("runs/exp/synth_cache"))
    >>> key = generation_key(chat, seed=0, identity=config.identity())
    >>> cache.get(key) or cache.put({key: "text"})
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.store import write_parquet

SCHEMA = pa.schema([("key", pa.string()), ("text", pa.string()), ("model", pa.string())])
KEY_VERSION = 1  # bump when the meaning of a key changes


def generation_key(chat: list[dict], seed: int, identity: dict) -> str:
    """SHA-256 of everything that determines a generation."""
    payload = json.dumps(
        {"v": KEY_VERSION, "chat": chat, "seed": int(seed), "identity": identity},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class GenerationCache:
    """Key -> text, loaded from all shards in `root` at construction."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._texts: dict[str, str] = {}
        for shard in sorted(self.root.glob("*.parquet")):
            try:
                table = pq.read_table(shard, schema=SCHEMA)
            except Exception as e:  # a foreign or damaged file must not be mistaken for data
                raise ValueError(f"{shard}: not a readable generation cache shard ({e})") from e
            self._texts.update(zip(table.column("key").to_pylist(), table.column("text").to_pylist()))

    def __len__(self) -> int:
        return len(self._texts)

    def get(self, key: str) -> str | None:
        return self._texts.get(key)

    def put(self, entries: dict[str, str], model: str = "") -> Path | None:
        """Writes new entries as one shard; returns its path (None if nothing was new)."""
        new = {k: v for k, v in entries.items() if k not in self._texts}
        if not new:
            return None
        keys = sorted(new)
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32] + ".parquet"
        table = pa.table(
            {"key": keys, "text": [new[k] for k in keys], "model": [model] * len(keys)}, schema=SCHEMA
        )
        path = self.root / name
        write_parquet(table, path)
        self._texts.update(new)
        return path
