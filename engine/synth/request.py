"""One text that a task wants written: what kind, from which inputs, and its template.

A task describes each piece of LLM-written text (a paraphrased needle, a fictional
paragraph, an insight split into sentences) as a `SynthRequest`. The synthesizer turns
the request into a chat prompt, generates, validates, and returns one text per request;
`template` is the deterministic text used without an LLM and as the explicit fallback.

Fields per kind (required; [optional]) and what the returned text is:
    paraphrase_needle    sentence, answer, [question]   one sentence containing `answer` verbatim
    fictional_paragraph  entity, [topic], [facts], [qa="yes"], [answer]
                         "Title: ..\\nParagraph: .." (+ "\\nQuestion: ..\\nAnswer: .." with qa=yes);
                         parse it with `parse_paragraph`, build templates with `format_paragraph`
    entity_sentence      entity, relation, value        one sentence containing entity and value
    rephrase_insight     insight                        the insight reworded
    simplify_insight     insight                        one simpler sentence
    split_insight        insight, n                     n lines (read with `split_lines`)

Example:
    >>> r = make_request("paraphrase_needle", template="Zorb lives in Paris.",
    ...                  sentence="Zorb lives in Paris.", answer="Paris")
    >>> r.field("answer")
    'Paris'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.store import write_parquet

REQUEST_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("fields", pa.map_(pa.string(), pa.string())),
        ("template", pa.string()),
        ("seed", pa.int64()),
    ]
)
KINDS = (
    "paraphrase_needle",
    "fictional_paragraph",
    "entity_sentence",
    "rephrase_insight",
    "simplify_insight",
    "split_insight",
)


@dataclass(frozen=True)
class SynthRequest:
    """A generation request; frozen and hashable so it can key caches and sets.

    Attributes:
        kind: one of `KINDS`; selects the prompt builder and the validator.
        fields: structured inputs as sorted (name, value) pairs, e.g. sentence, answer,
            question, entity, insight.
        template: deterministic text without an LLM; the template backend returns it and
            an output still invalid after all retries falls back to it.
        seed: sampling seed of the first attempt; retries derive new seeds from it.
    """

    kind: str
    fields: tuple[tuple[str, str], ...]
    template: str
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"SynthRequest.kind {self.kind!r} is not one of {', '.join(KINDS)}")

    def field(self, name: str) -> str:
        """The value of input `name`; a KeyError names the kind and the missing field."""
        for key, value in self.fields:
            if key == name:
                return value
        raise KeyError(f"{self.kind} request has no field {name!r} (has: {[k for k, _ in self.fields]})")

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of input `name`, or `default` when the request does not carry it."""
        for key, value in self.fields:
            if key == name:
                return value
        return default


def make_request(kind: str, template: str, seed: int = 0, **fields: object) -> SynthRequest:
    """Builds a request with its fields in canonical (sorted) order, values as strings."""
    return SynthRequest(
        kind=kind,
        fields=tuple(sorted((str(k), str(v)) for k, v in fields.items())),
        template=template,
        seed=int(seed),
    )


def write_requests(path, requests: list[SynthRequest]) -> None:
    """Writes requests as Parquet (fields as a string map), atomically."""
    path = Path(path)
    table = pa.table(
        {
            "kind": [r.kind for r in requests],
            "fields": [list(r.fields) for r in requests],
            "template": [r.template for r in requests],
            "seed": [r.seed for r in requests],
        },
        schema=REQUEST_SCHEMA,
    )
    write_parquet(table, path)


def read_requests(path) -> list[SynthRequest]:
    """Reads a Parquet file written by `write_requests`; a bad row names file and row."""
    table = pq.read_table(path)
    missing = set(REQUEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; need {REQUEST_SCHEMA.names}")
    out = []
    for i, row in enumerate(table.to_pylist()):
        try:
            out.append(SynthRequest(row["kind"], tuple(sorted((str(k), str(v)) for k, v in row["fields"])),
                                    row["template"], int(row["seed"])))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: row {i}: {e}") from e
    return out

