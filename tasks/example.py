"""The example record every task writes and every later stage reads.

One row of `runs/<exp>/data/<task>/<variant>/{train,val,eval}.parquet`. Spans are character
offsets into `prompt` (end exclusive); the decoder maps them to token positions with the
tokenizer's offset mapping, since the same text tokenizes differently in context and output.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pyarrow as pa

SPAN = pa.struct([("start", pa.int64()), ("end", pa.int64())])
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task", pa.string()),
        ("variant", pa.string()),
        ("prompt", pa.string()),
        ("target", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("context_span", SPAN),
        ("answer_spans", pa.list_(SPAN)),
        ("needle_spans", pa.list_(SPAN)),
        ("needles", pa.list_(pa.string())),
        ("n_tokens", pa.int64()),
        ("meta", pa.string()),
    ]
)


@dataclass(frozen=True)
class Span:
    start: int
    end: int  # exclusive

    def text(self, s: str) -> str:
        return s[self.start : self.end]


@dataclass(frozen=True)
class Example:
    """One prompt with its gold answer and the spans scoring needs.

    Attributes:
        prompt: the full model input (instructions, context, question), ending where the
            answer begins.
        target: the text the model is trained to produce (the answer, or `[3][7]`).
        answers: gold answers for F1, aliases included.
        context_span: where the documents lie inside `prompt`.
        answer_spans: occurrences of the answer inside the needle(s) in the context: y* of
            the retrieval score (Eq. 1).
        needle_spans: the needles in the context (gold paragraph, hop sentences, insight
            sentences): f* of the insight score (Eq. 2).
        n_tokens: prompt length in the model's tokens.
    """

    id: str
    task: str
    variant: str
    prompt: str
    target: str
    answers: tuple[str, ...]
    context_span: Span
    answer_spans: tuple[Span, ...]
    needle_spans: tuple[Span, ...]
    needles: tuple[str, ...]
    n_tokens: int = 0
    meta: dict = field(default_factory=dict)

    def to_row(self) -> dict:
        row = asdict(self)
        row["answers"] = list(self.answers)
        row["needles"] = list(self.needles)
        row["meta"] = json.dumps(self.meta, sort_keys=True)
        return row

    @classmethod
    def from_row(cls, row: dict) -> "Example":
        return cls(
            id=row["id"],
            task=row["task"],
            variant=row["variant"],
            prompt=row["prompt"],
            target=row["target"],
            answers=tuple(row["answers"]),
            context_span=Span(**row["context_span"]),
            answer_spans=tuple(Span(**s) for s in row["answer_spans"]),
            needle_spans=tuple(Span(**s) for s in row["needle_spans"]),
            needles=tuple(row["needles"]),
            n_tokens=int(row["n_tokens"]),
            meta=json.loads(row["meta"]) if row["meta"] else {},
        )


def to_table(examples: list[Example]) -> pa.Table:
    return pa.Table.from_pylist([e.to_row() for e in examples], schema=SCHEMA)


def from_table(table: pa.Table) -> list[Example]:
    return [Example.from_row(r) for r in table.to_pylist()]
