"""Chat prompts for each kind of synthetic text, in the spirit of Zhao et al. 2025, Appendix.

The paper asks an instruction model to paraphrase needle sentences so the question stays
answerable, to write Wikipedia-style paragraphs about fictional entities (with a question
and answer for MDQA), to write one sentence per fictional fact (MuSiQue), and to rephrase,
simplify and split SummHay insights. Each builder asks for a bare, labelled output that
`engine/synth/validate.py` can parse without guessing.

Example:
    >>> from engine.synth.request import make_request
    >>> chat = build_chat(make_request("entity_sentence", template="Zorb's mother is Ilsa.",
    ...                                entity="Zorb", relation="mother", value="Ilsa"))
    >>> chat[-1]["role"]
    'user'
"""

from __future__ import annotations

from collections.abc import Callable

from engine.synth.request import SynthRequest

SYSTEM = (
    "You are a careful writer of synthetic training data. Follow the output format exactly "
    "and write nothing else: no preamble, no notes, no quotation marks around the output."
)


def paraphrase_needle(r: SynthRequest) -> str:
    question = r.get("question")
    ask = f'It must still answer the question "{question}".\n' if question else ""
    return (
        "Rewrite the sentence below in different words, as one fluent sentence with the same meaning.\n"
        f'{ask}Keep the exact text "{r.field("answer")}" unchanged somewhere in your sentence.\n\n'
        f"Sentence: {r.field('sentence')}\n\n"
        "Reply with the rewritten sentence only."
    )


def fictional_paragraph(r: SynthRequest) -> str:
    facts = r.get("facts")
    answer = r.get("answer")
    lines = [
        f'Write a short encyclopedia paragraph (3 to 6 sentences) about "{r.field("entity")}", '
        "a fictional subject that does not exist, in the neutral style of a Wikipedia article. "
        "Invent plausible details; do not mention that it is fictional.",
    ]
    if r.get("topic"):
        lines.append(f"It is about: {r.field('topic')}.")
    if facts:
        lines.append(f"The paragraph must state these facts: {facts}")
    if r.get("qa", "no") == "yes":
        lines.append(
            "Then write one question that the paragraph answers and its short answer (a few words "
            "copied exactly from the paragraph). The question must not contain the answer."
        )
        if answer:
            lines.append(f'The answer must be exactly "{answer}".')
        fmt = "Title: <title>\nParagraph: <paragraph>\nQuestion: <question>\nAnswer: <answer>"
    else:
        if answer:
            lines.append(f'The paragraph must contain the exact text "{answer}".')
        fmt = "Title: <title>\nParagraph: <paragraph>"
    lines.append(f"Use exactly this format:\n{fmt}")
    return "\n".join(lines)


def entity_sentence(r: SynthRequest) -> str:
    return (
        "Write one natural sentence that states the fact below, as it might appear in an "
        "encyclopedia. Use the names exactly as given.\n\n"
        f"Subject: {r.field('entity')}\nRelation: {r.field('relation')}\nValue: {r.field('value')}\n\n"
        "Reply with the sentence only."
    )


def rephrase_insight(r: SynthRequest) -> str:
    return (
        "Rephrase the statement below with different wording and sentence structure, keeping "
        "every piece of information and adding none.\n\n"
        f"Statement: {r.field('insight')}\n\nReply with the rephrased statement only."
    )


def simplify_insight(r: SynthRequest) -> str:
    return (
        "Rewrite the statement below in plain, simple words, as one short sentence that keeps "
        "its main point.\n\n"
        f"Statement: {r.field('insight')}\n\nReply with the simplified sentence only."
    )


def split_insight(r: SynthRequest) -> str:
    n = int(r.field("n"))
    return (
        f"Split the statement below into exactly {n} short sentences that together say the same "
        "thing. Each sentence must make sense on its own (repeat the subject instead of 'it').\n\n"
        f"Statement: {r.field('insight')}\n\n"
        f"Reply with the {n} sentences, one per line, numbered 1. to {n}."
    )


BUILDERS: dict[str, Callable[[SynthRequest], str]] = {
    "paraphrase_needle": paraphrase_needle,
    "fictional_paragraph": fictional_paragraph,
    "entity_sentence": entity_sentence,
    "rephrase_insight": rephrase_insight,
    "simplify_insight": simplify_insight,
    "split_insight": split_insight,
}


def build_chat(request: SynthRequest) -> list[dict[str, str]]:
    """The OpenAI-style chat messages that ask for `request`'s text."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": BUILDERS[request.kind](request)},
    ]
