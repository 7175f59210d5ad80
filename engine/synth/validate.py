"""Output parsers and validators: one check per kind, returning clean text or a reason.

A generated text is kept only if it still does its job in the dataset: a paraphrased
needle must still contain the answer verbatim (the retrieval score needs the answer span in
the context), a fictional paragraph must parse into title/paragraph(/question/answer) with
the answer inside the paragraph (a paragraph asked for without a question may come bare,
without its labels, and is then titled by its entity; a last sentence cut short by max_tokens
is dropped), a split insight must have exactly the asked number of sentences. The returned text is canonical, so tasks parse it with `parse_paragraph` and
`split_lines` below, whether it came from an LLM or from the request's template.

Example:
    >>> from engine.synth.request import make_request
    >>> r = make_request("paraphrase_needle", template="", sentence="Zorb lives in Paris.",
    ...                  answer="Paris")
    >>> check(r, '"Paris is where Zorb lives."')
    Verdict(text='Paris is where Zorb lives.', reason=None)
    >>> check(r, "Zorb lives in France.").reason
    'answer missing'
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from engine.synth.request import SynthRequest

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_LABEL = re.compile(r"^(?:here is[^:\n]*|sentence|rewritten sentence|paraphrase[d]?|rephrased(?: statement)?|"
                    r"simplified(?: sentence)?|statement|output)\s*:\s*", re.IGNORECASE)
_NUMBERING = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s*")
_FIELD = re.compile(r"^\s*(title|paragraph|question|answer)\s*:\s*(.*)$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)]*$")
_SENTENCE_BREAK = re.compile(r"[.!?][\"'\u201d\u2019)]*(?=\s)")
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"


@dataclass(frozen=True)
class Verdict:
    """A validated text (`reason` None) or why the output was rejected (`text` None)."""

    text: str | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class Paragraph:
    """A fictional paragraph as parsed from canonical text."""

    title: str
    paragraph: str
    question: str | None = None
    answer: str | None = None


def format_paragraph(title: str, paragraph: str, question: str | None = None, answer: str | None = None) -> str:
    """Canonical text of a fictional paragraph; templates must use it so tasks parse one form."""
    lines = [f"Title: {title}", f"Paragraph: {paragraph}"]
    if question is not None:
        lines += [f"Question: {question}", f"Answer: {answer}"]
    return "\n".join(lines)


def parse_paragraph(text: str) -> Paragraph:
    """Parses `Title:/Paragraph:/Question:/Answer:` text; raises ValueError if malformed."""
    found: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = _FIELD.match(line)
        if m:
            current = m.group(1).lower()
            if current in found:
                raise ValueError(f"field {current!r} appears twice")
            found[current] = m.group(2).strip()
        elif current is not None and line.strip():
            found[current] = (found[current] + " " + line.strip()).strip()
    for name in ("title", "paragraph"):
        if not found.get(name):
            raise ValueError(f"missing {name}")
    if ("question" in found) != ("answer" in found):
        raise ValueError("question and answer must come together")
    return Paragraph(
        title=_unquote(found["title"]),
        paragraph=found["paragraph"],
        question=found.get("question"),
        answer=_unquote(found["answer"]) if "answer" in found else None,
    )


def split_lines(text: str) -> list[str]:
    """The sentences of a split insight: non-empty lines without their numbering."""
    return [s for s in (_NUMBERING.sub("", line).strip() for line in text.splitlines()) if s]


def _unquote(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s[0] in _QUOTES and s[-1] in _QUOTES:
        s = s[1:-1].strip()
    return s


def clean(raw: str) -> str:
    """Drops reasoning blocks, a leading label and wrapping quotes."""
    text = _THINK.sub("", raw).strip()
    text = _LABEL.sub("", text)
    return _unquote(text)


def _first_line(raw: str) -> str:
    text = clean(raw)
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    return _unquote(_LABEL.sub("", line.strip()))


def _sentence(text: str, source: str, must_contain: tuple[str, ...]) -> Verdict:
    if not text:
        return Verdict(None, "empty")
    if len(text) > 3 * len(source) + 80:
        return Verdict(None, "too long")
    for needle in must_contain:
        if needle not in text:
            return Verdict(None, "answer missing" if needle == must_contain[0] else "entity missing")
    return Verdict(text)


def check_paraphrase_needle(r: SynthRequest, raw: str) -> Verdict:
    text = _first_line(raw)
    verdict = _sentence(text, r.field("sentence"), (r.field("answer"),))
    if verdict.ok and text == r.field("sentence").strip():
        return Verdict(None, "unchanged")
    return verdict


def check_entity_sentence(r: SynthRequest, raw: str) -> Verdict:
    source = f"{r.field('entity')} {r.field('relation')} {r.field('value')}"
    return _sentence(_first_line(raw), source, (r.field("value"), r.field("entity")))


def complete_sentences(text: str) -> str:
    """`text` without a last sentence cut short (a reply stopped by max_tokens); unchanged when
    it ends a sentence or holds no complete one."""
    text = text.strip()
    if _SENTENCE_END.search(text):
        return text
    cuts = [m.end() for m in _SENTENCE_BREAK.finditer(text)]
    return text[: cuts[-1]].strip() if cuts else text


def check_fictional_paragraph(r: SynthRequest, raw: str) -> Verdict:
    want_qa = r.get("qa", "no") == "yes"
    text = clean(raw)
    if not want_qa and not any(_FIELD.match(line) for line in text.splitlines()):
        # a reply of the paragraph alone, without the asked labels (small models often write
        # one): the title is the entity the request is about
        p = Paragraph(title=r.field("entity"), paragraph=complete_sentences(" ".join(text.split())))
        if not p.paragraph:
            return Verdict(None, "empty")
        if p.title not in p.paragraph:  # the title is ours: the text itself must name the entity
            return Verdict(None, "entity missing")
    else:
        try:
            p = parse_paragraph(text)
        except ValueError as e:
            return Verdict(None, f"unparsable: {e}")
        p = Paragraph(p.title, complete_sentences(p.paragraph), p.question, p.answer)
    if want_qa and p.question is None:
        return Verdict(None, "unparsable: missing question")
    entity = r.field("entity")
    if entity not in p.title and entity not in p.paragraph:
        return Verdict(None, "entity missing")
    answer = r.get("answer")
    if want_qa:
        if not p.question or not p.answer:
            return Verdict(None, "empty question or answer")
        if answer is not None and p.answer != answer:
            return Verdict(None, "wrong answer")
        if p.answer not in p.paragraph:
            return Verdict(None, "answer missing")
        if p.answer.lower() in p.question.lower():
            return Verdict(None, "question gives away answer")
        return Verdict(format_paragraph(p.title, p.paragraph, p.question, p.answer))
    if answer is not None and answer not in p.paragraph:
        return Verdict(None, "answer missing")
    return Verdict(format_paragraph(p.title, p.paragraph))


def check_rephrase_insight(r: SynthRequest, raw: str) -> Verdict:
    text = " ".join(clean(raw).split())
    insight = r.field("insight")
    if not text:
        return Verdict(None, "empty")
    if text == " ".join(insight.split()):
        return Verdict(None, "unchanged")
    if not 0.3 * len(insight) <= len(text) <= 3 * len(insight) + 40:
        return Verdict(None, "length out of range")
    return Verdict(text)


def check_simplify_insight(r: SynthRequest, raw: str) -> Verdict:
    text = " ".join(clean(raw).split())
    if len(text) < 8:
        return Verdict(None, "empty")
    if len(text) > 1.5 * len(r.field("insight")) + 20:
        return Verdict(None, "not simpler")
    return Verdict(text)


def check_split_insight(r: SynthRequest, raw: str) -> Verdict:
    n = int(r.field("n"))
    sentences = split_lines(clean(raw))
    if len(sentences) != n:
        return Verdict(None, f"wrong sentence count ({len(sentences)} != {n})")
    if any(len(s) > 1.5 * len(r.field("insight")) + 20 for s in sentences):
        return Verdict(None, "too long")
    return Verdict("\n".join(sentences))


CHECKS: dict[str, Callable[[SynthRequest, str], Verdict]] = {
    "paraphrase_needle": check_paraphrase_needle,
    "fictional_paragraph": check_fictional_paragraph,
    "entity_sentence": check_entity_sentence,
    "rephrase_insight": check_rephrase_insight,
    "simplify_insight": check_simplify_insight,
    "split_insight": check_split_insight,
}


def check(request: SynthRequest, raw: str) -> Verdict:
    """Validates and canonicalizes one generated text for `request`."""
    return CHECKS[request.kind](request, raw)
