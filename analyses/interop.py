"""Head scores in the formats other retrieval-head tools publish: read, write and compare.

Formats (each checked against the tools' published files and loaders):
- Retrieval_Head / HeadKV JSON (Wu et al. 2024, nightdessert/Retrieval_Head `head_score/*.json`;
  FYYFU/HeadKV loads the same files): one JSON object on one line, `{"layer-head": [score of
  each detection example, ...]}`, query-head indices, every head of the model in layer-major
  order (HeadKV turns the values, in file order, into a `[layers * heads]` tensor). A head's
  score is the mean of its list.
- QRHead (princeton-pli/QRHead): a ranked head list, the YAML config's `attn_head_set:
  "14-22,13-16,..."` (best first), or the detection script's JSON, a list of `["layer-head",
  score]` pairs sorted by score.
- A plain table, Parquet or CSV, with columns `layer, head, score` and optionally `kind`
  (retrieval | insight) and `n_examples`: the engine's own `head_scores.parquet` is one. An
  evaluation directory holding `head_scores.parquet` reads as that table, with the per-example
  scores of `head_examples.parquet` beside it.

A ranked list has no scores: its heads get (K - rank) / K, which keeps the order and puts every
listed head in H (score > 0); unlisted heads score 0. Cosine similarity needs real scores and is
left undefined for a ranked list.

Example:
    >>> ours = read_head_scores("runs/demo/eval/mdqa/real/own", kind="retrieval")
    >>> theirs = read_head_scores("Meta-Llama-3-8B-Instruct.json")
    >>> compare(ours, theirs, top_k=(10, 20))["recall_b_in_a"]
    >>> write_head_scores(ours, "mdqa_real.json")          # Retrieval_Head format
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import yaml

from analyses.head_examples import KINDS, example_scores
from engine.stats import spearman_permutation
from engine.store import atomic_path, write_parquet, write_text

Head = tuple[int, int]  # (layer, query head)
HEAD_KEY = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")
TABLE_SUFFIXES = (".parquet", ".csv")
FORMATS = {".json": "retrieval_head", ".yaml": "qrhead", ".yml": "qrhead", ".parquet": "table", ".csv": "table"}
DEFAULT_TOP_K = (5, 10, 20, 50)


class InteropError(ValueError):
    """A head-score file that cannot be read or written as asked; names the file."""


@dataclass(frozen=True)
class HeadScores:
    """One model's score per head, from any supported file.

    Attributes:
        scores: mean score of every listed head.
        per_example: each head's score on every counted example, when the file has them.
        ranked_only: the file gives an order, not scores (QRHead's lists).
        complete: the file lists every head of the model, so its shape is the model's.
        source: the file read.
        format: "retrieval_head", "qrhead", "table".
    """

    scores: Mapping[Head, float]
    per_example: Mapping[Head, tuple[float, ...]] | None
    ranked_only: bool
    complete: bool
    source: str
    format: str

    @property
    def shape(self) -> tuple[int, int]:
        """(layers, heads) spanned by the listed heads."""
        return (1 + max(h[0] for h in self.scores), 1 + max(h[1] for h in self.scores))

    def ranking(self) -> list[Head]:
        """Listed heads, best score first; ties and NaN scores (last) by (layer, head)."""
        def key(head: Head):
            s = self.scores[head]
            return (math.isnan(s), -s if not math.isnan(s) else 0.0, head)

        return sorted(self.scores, key=key)

    def head_set(self) -> frozenset[Head]:
        """H: the heads with a score above zero."""
        return frozenset(h for h, s in self.scores.items() if s > 0)

    def grid(self, shape: tuple[int, int]) -> np.ndarray:
        """Scores as a `[layer, head]` array of `shape`; unlisted heads 0."""
        out = np.zeros(shape)
        for (layer, head), s in self.scores.items():
            out[layer, head] = s
        return out


# --------------------------------------------------------------------------- reading


ENGINE_COLUMNS = ("kind", "n_examples")  # what the engine's head_scores.parquet has besides layer, head, score


def read_head_scores(path: str | Path, kind: str | None = None,
                     columns: Sequence[str] = ()) -> HeadScores:
    """Reads head scores from a Retrieval_Head/HeadKV JSON, a QRHead YAML or JSON list, a
    Parquet or CSV table, or an evaluation directory.

    Args:
        path: the file (format by suffix) or a directory with `head_scores.parquet`.
        kind: "retrieval" or "insight", for tables with a `kind` column; None takes the only
            kind present. Files of the other tools have one kind and ignore it.

    Raises:
        InteropError: the file is missing or malformed; the message names it and the entry.
    """
    path = Path(path)
    if path.is_dir():
        table = path / "head_scores.parquet"
        if not table.is_file():
            raise InteropError(f"{path}: a directory without head_scores.parquet")
        return _read_table(table, kind, columns)
    if not path.is_file():
        raise InteropError(f"{path}: no such head-score file")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InteropError(f"{path}: unknown head-score format {suffix!r}; expected one of {', '.join(FORMATS)}")
    if suffix in TABLE_SUFFIXES:
        return _read_table(path, kind, columns)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InteropError(f"{path}: not valid JSON: {err}") from err
        if isinstance(data, dict):
            return _read_retrieval_head(data, path)
        if isinstance(data, list):
            return _read_ranked(data, path, "qrhead")
        raise InteropError(f"{path}: expected a JSON object {{\"layer-head\": [scores]}} or a list of "
                           f"[\"layer-head\", score] pairs, got {type(data).__name__}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InteropError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict) or "attn_head_set" not in data:
        raise InteropError(f"{path}: expected QRHead's 'attn_head_set: \"layer-head,...\"' key")
    heads = data["attn_head_set"]
    if heads == "full_heads":
        raise InteropError(f"{path}: attn_head_set is 'full_heads' (every head, unranked): nothing to rank by")
    if isinstance(heads, str):
        heads = [h for h in heads.split(",") if h.strip()]
    if not isinstance(heads, list):
        raise InteropError(f"{path}: attn_head_set must be a comma-separated string or a list")
    return _read_ranked(heads, path, "qrhead")


def parse_head(key, where: str) -> Head:
    """"12-3", "12.3" or [12, 3] -> (12, 3); anything else is an error naming `where`."""
    if isinstance(key, (list, tuple)) and len(key) == 2 and all(isinstance(v, int) and v >= 0 for v in key):
        return int(key[0]), int(key[1])
    match = HEAD_KEY.fullmatch(str(key).replace(".", "-")) if isinstance(key, str) else None
    if not match:
        raise InteropError(f"{where}: {key!r} is not a head; expected \"layer-head\" with non-negative integers")
    return int(match.group(1)), int(match.group(2))


def _read_retrieval_head(data: dict, path: Path) -> HeadScores:
    scores, per_example = {}, {}
    for key, values in data.items():
        head = parse_head(key, f"{path}: key {key!r}")
        if head in scores:
            raise InteropError(f"{path}: head {head[0]}-{head[1]} listed twice (key {key!r})")
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            values = [values]
        if not isinstance(values, list) or not all(_is_number(v) for v in values):
            raise InteropError(f"{path}: key {key!r}: expected a list of numbers, got {str(values)[:60]}")
        per_example[head] = tuple(float(v) for v in values)
        scores[head] = float(np.mean(values)) if values else math.nan
    if not scores:
        raise InteropError(f"{path}: no heads")
    complete = len(scores) == math.prod(_shape(scores))
    return HeadScores(scores, per_example, ranked_only=False, complete=complete, source=str(path),
                      format="retrieval_head")


def _read_ranked(items: list, path: Path, fmt: str) -> HeadScores:
    """A best-first list of heads, or of [head, score] pairs (kept in the list's order)."""
    heads, given = [], []
    for i, item in enumerate(items):
        where = f"{path}: entry {i}"
        if isinstance(item, (list, tuple)) and len(item) == 2 and _is_number(item[1]) and not isinstance(item[0], int):
            heads.append(parse_head(item[0], where))
            given.append(float(item[1]))
        else:
            heads.append(parse_head(item.strip() if isinstance(item, str) else item, where))
    if not heads:
        raise InteropError(f"{path}: no heads")
    if len(set(heads)) != len(heads):
        twice = next(h for h in heads if heads.count(h) > 1)
        raise InteropError(f"{path}: head {twice[0]}-{twice[1]} listed twice")
    if given and len(given) != len(heads):
        raise InteropError(f"{path}: mix of [head, score] pairs and bare heads")
    if given:
        scores = dict(zip(heads, given))
        complete = len(scores) == math.prod(_shape(scores))
        return HeadScores(scores, None, ranked_only=False, complete=complete, source=str(path), format=fmt)
    k = len(heads)
    scores = {h: (k - rank) / k for rank, h in enumerate(heads)}
    return HeadScores(scores, None, ranked_only=True, complete=False, source=str(path), format=fmt)


def _read_table(path: Path, kind: str | None, columns: Sequence[str] = ()) -> HeadScores:
    try:
        table = pq.read_table(path) if path.suffix.lower() == ".parquet" else pa_csv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise InteropError(f"{path}: cannot read as a table: {err}") from err
    return table_head_scores(table, kind, path, beside=True, columns=columns)


def table_head_scores(table: pa.Table, kind: str | None, path: str | Path = "head scores",
                      beside: bool = False, columns: Sequence[str] = ()) -> HeadScores:
    """The head scores of a table with layer, head, score and (optionally) kind columns, as
    the engine's `head_scores.parquet` holds them: the one parser of that format, used by the
    overlap, knockout and patching stages (through `read_head_scores` for a file).

    Raises:
        InteropError: a column is missing, no row has `kind`, a head is listed twice or a
            value is not a number; the message names `path` and the row.

    `beside`: the table was read from `path`, and per-example scores are read from the
    `head_examples.parquet` beside it when there is one. `columns`: the columns required
    besides layer, head and score (the engine's own tables: kind and n_examples).
    """
    path = Path(path)
    missing = [c for c in ("layer", "head", "score", *columns) if c not in table.column_names]
    if missing:
        raise InteropError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    rows = table.to_pylist()
    if "kind" in table.column_names:
        kinds = sorted({str(r["kind"]) for r in rows})
        if kind is None:
            if len(kinds) > 1:
                raise InteropError(f"{path}: holds kinds {kinds}; say which (--kind / the task's head kind)")
            kind = kinds[0] if kinds else None
        rows = [r for r in rows if r["kind"] == kind]
        if not rows:
            raise InteropError(f"{path}: no {kind!r} scores (kinds present: {kinds})")
    scores: dict[Head, float] = {}
    for i, r in enumerate(rows):
        where = f"{path}: row {i}"
        if not (_is_int(r["layer"]) and _is_int(r["head"])):
            raise InteropError(f"{where}: layer and head must be non-negative integers, got {r['layer']!r}, {r['head']!r}")
        head = (int(r["layer"]), int(r["head"]))
        if head in scores:
            raise InteropError(f"{where}: head {head[0]}-{head[1]} listed twice")
        if r["score"] is not None and not _is_number(r["score"]):
            raise InteropError(f"{where}: score {r['score']!r} is not a number")
        scores[head] = math.nan if r["score"] is None else float(r["score"])
    if not scores:
        raise InteropError(f"{path}: no heads")
    per_example = _table_examples(path.parent / "head_examples.parquet", kind, scores) if beside else None
    complete = len(scores) == math.prod(_shape(scores))
    return HeadScores(scores, per_example, ranked_only=False, complete=complete, source=str(path), format="table")


def _table_examples(path: Path, kind: str | None, scores: Mapping[Head, float]) -> dict | None:
    """Per-example scores from the engine's head_examples.parquet beside a head_scores table."""
    if kind not in KINDS or not path.is_file():
        return None
    grid = example_scores(path, kind)
    return {h: tuple(grid[:, h[0], h[1]].tolist()) for h in scores if h[0] < grid.shape[1] and h[1] < grid.shape[2]}


# --------------------------------------------------------------------------- writing


def write_head_scores(scores: HeadScores, path: str | Path, top: int | None = None,
                      kind: str = "retrieval") -> Path:
    """Writes `scores` in the format of `path`'s suffix, atomically.

    - `.json`: Retrieval_Head/HeadKV: one line, `{"layer-head": [per-example scores]}` for
      every head of the model, layer-major. Heads without per-example scores (a ranked list,
      a table without head_examples.parquet) get their one mean score as the list.
    - `.yaml`: QRHead: `attn_head_set: "layer-head,..."`, the `top` best heads with score > 0
      (all of H when `top` is None).
    - `.parquet` / `.csv`: layer, head, kind, score, n_examples.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InteropError(f"{path}: unknown head-score format {suffix!r}; expected one of {', '.join(FORMATS)}")
    n_layers, n_heads = scores.shape
    every = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    if suffix == ".json":
        body = {}
        for head in every:
            listed = (scores.per_example or {}).get(head)
            if listed is None:
                mean = scores.scores.get(head, 0.0)
                listed = () if math.isnan(mean) else (mean,)
            body[f"{head[0]}-{head[1]}"] = [_plain(v) for v in listed]
        # Retrieval_Head and HeadKV read these files with json.loads(file.readline()): one line.
        return write_text(json.dumps(body, separators=(", ", ": ")) + "\n", path)
    if suffix in (".yaml", ".yml"):
        ranked = [h for h in scores.ranking() if scores.scores[h] > 0][:top]
        listed = ",".join(f"{layer}-{head}" for layer, head in ranked)
        text = f"# {len(ranked)} heads by score from {scores.source}\nattn_head_set: \"{listed}\"\n"
        return write_text(text, path)
    rows = [{"layer": h[0], "head": h[1], "kind": kind, "score": scores.scores.get(h, 0.0),
             "n_examples": len((scores.per_example or {}).get(h, ()))} for h in every]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("layer", pa.int32()), ("head", pa.int32()),
                                                         ("kind", pa.string()), ("score", pa.float64()),
                                                         ("n_examples", pa.int64())]))
    if suffix == ".parquet":
        return write_parquet(table, path)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=table.column_names)
        writer.writeheader()
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- comparing


def common_shape(a: HeadScores, b: HeadScores) -> tuple[int, int]:
    """The model shape both files describe; an error when they cannot be the same model."""
    for x, y in ((a, b), (b, a)):
        if x.complete and y.complete and x.shape != y.shape:
            raise InteropError(f"{x.source} lists {x.shape[0]} layers x {x.shape[1]} heads, {y.source} "
                               f"{y.shape[0]} x {y.shape[1]}: not the same model")
        if x.complete and (y.shape[0] > x.shape[0] or y.shape[1] > x.shape[1]):
            outside = next(h for h in y.scores if h[0] >= x.shape[0] or h[1] >= x.shape[1])
            raise InteropError(f"{y.source} names head {outside[0]}-{outside[1]}, outside the {x.shape[0]} x "
                               f"{x.shape[1]} heads of {x.source}")
    return max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])


def top_k_overlap(a: HeadScores, b: HeadScores, k: int) -> float:
    """|top-k(A) ∩ top-k(B)| / k over heads with a score above zero (NaN if either has fewer)."""
    top_a = [h for h in a.ranking() if a.scores[h] > 0][:k]
    top_b = [h for h in b.ranking() if b.scores[h] > 0][:k]
    if len(top_a) < k or len(top_b) < k:
        return math.nan
    return len(set(top_a) & set(top_b)) / k


def compare(a: HeadScores, b: HeadScores, top_k: Sequence[int] = DEFAULT_TOP_K) -> dict:
    """Everything `needlework heads compare` reports about two head-score files.

    Returns:
        A dict with |H_A|, |H_B|, |H_A ∩ H_B|, recall both ways (`recall_b_in_a` = |H_A ∩ H_B|
        / |H_B|: the share of B's heads that A also has, the paper's recall of A against B),
        Jaccard, cosine of the score grids (None for a ranked list), Spearman's rho of the
        scores over every head of the model with its permutation p-value, and the top-k overlap
        for each k.
    """
    shape = common_shape(a, b)
    h_a, h_b = a.head_set(), b.head_set()
    inter = h_a & h_b
    grid_a, grid_b = np.nan_to_num(a.grid(shape)), np.nan_to_num(b.grid(shape))
    norm = float(np.linalg.norm(grid_a) * np.linalg.norm(grid_b))
    cosine = None if a.ranked_only or b.ranked_only else (float(grid_a.ravel() @ grid_b.ravel()) / norm
                                                          if norm > 0 else math.nan)
    rank = spearman_permutation(grid_a.ravel(), grid_b.ravel())
    return {
        "a": a.source, "b": b.source, "format_a": a.format, "format_b": b.format,
        "shape": list(shape),
        "n_a": len(h_a), "n_b": len(h_b), "n_intersection": len(inter),
        "recall_b_in_a": len(inter) / len(h_b) if h_b else math.nan,
        "recall_a_in_b": len(inter) / len(h_a) if h_a else math.nan,
        "jaccard": len(inter) / len(h_a | h_b) if h_a | h_b else math.nan,
        "cosine": cosine,
        "spearman_rho": rank.rho, "spearman_p": rank.p_value, "spearman_n": rank.n,
        "top_k": {int(k): top_k_overlap(a, b, int(k)) for k in top_k},
    }


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes: what a stage that reads it is keyed on."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _shape(scores: Mapping[Head, float]) -> tuple[int, int]:
    return (1 + max(h[0] for h in scores), 1 + max(h[1] for h in scores))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _plain(v: float) -> float | int:
    """0 as Retrieval_Head writes it (an int), other values as floats."""
    return 0 if v == 0 else float(v)
