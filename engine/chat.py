"""Prompts through the tokenizer's chat template, with spans kept exact and the answer as the reply.

Instruct models (Llama-3-8B-Instruct, Mistral-7B-Instruct, SmolLM2-Instruct) answer through
their chat template: a raw prompt often gets no answer at all. A task's prompt becomes the
user turn; the rendered text opens the assistant turn (`add_generation_prompt=True`), and
the model's reply ends with the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`),
which the tokenizer and generation config name as EOS. The template is the tokenizer's own
(`apply_chat_template`), so whatever the model was trained with is what it is prompted with.

Spans (`tasks.example.Example`) are character offsets into the raw prompt; the prompt appears
verbatim inside the rendered text, so a span moves by the length of the text before it
(`Rendered.offset`). A template that changes the prompt's text is an error, never a silent
shift.

Training uses the same template: the completion is what the template renders after the
prompt when the answer is the assistant's message (TRL's prompt-completion recipe), and the
loss is on those tokens only.

Example:
    >>> rendered = render_prompt(tokenizer, "Question: 2+2?\\nAnswer:")
    >>> rendered.text[rendered.offset:].startswith("Question")
    True
    >>> render_completion(tokenizer, "Question: 2+2?\\nAnswer:", " 4")
    '4<|im_end|>\\n'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

_PLACEHOLDER = "\x00needlework-prompt\x00"


class ChatTemplateError(ValueError):
    """A chat template that cannot be used as asked (missing, or one that rewrites the prompt)."""


@dataclass(frozen=True)
class Rendered:
    """A prompt rendered through a chat template; the raw prompt starts at `offset` in `text`."""

    text: str
    offset: int


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _messages(prompt: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def render_prompt(tokenizer, prompt: str) -> Rendered:
    """The prompt as the user turn, followed by the opening of the assistant turn.

    Raises:
        ChatTemplateError: the tokenizer has no chat template, or the template does not
            insert the prompt verbatim (so spans could not be shifted exactly).
    """
    if not has_chat_template(tokenizer):
        raise ChatTemplateError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: no chat template")
    text = tokenizer.apply_chat_template(_messages(prompt), tokenize=False, add_generation_prompt=True)
    frame = tokenizer.apply_chat_template(_messages(_PLACEHOLDER), tokenize=False, add_generation_prompt=True)
    before, found, after = frame.partition(_PLACEHOLDER)
    if found and text == before + prompt + after:
        return Rendered(text, len(before))
    # A template that trims its content (Llama-3's) still holds the prompt verbatim once.
    offset = text.find(prompt)
    if offset < 0 or text.find(prompt, offset + 1) >= 0:
        raise ChatTemplateError("the chat template does not hold the prompt verbatim; its answer and needle "
                                "spans cannot be located in the rendered text")
    return Rendered(text, offset)


def render_completion(tokenizer, prompt: str, answer: str) -> str:
    """What the template renders after `render_prompt(prompt).text` when the model says `answer`.

    The answer is the assistant message without surrounding whitespace (a raw prompt's target
    starts with a space, after "Answer:"; a chat reply does not); the completion ends with the
    template's end-of-turn text.

    Raises:
        ChatTemplateError: the conversation does not start with the rendered prompt, so the
            prompt's tokens at training time would differ from those at evaluation time.
    """
    prompt_text = render_prompt(tokenizer, prompt).text
    full = tokenizer.apply_chat_template(_messages(prompt, answer.strip()), tokenize=False)
    if not full.startswith(prompt_text):
        raise ChatTemplateError("the chat template renders the prompt differently once the assistant's answer "
                                "follows it; a prompt/answer split for training cannot be made")
    return full[len(prompt_text):]


def shift_spans(spans: Sequence[tuple[int, int]], offset: int) -> tuple[tuple[int, int], ...]:
    """Character spans of the raw prompt as spans of the rendered text."""
    return tuple((start + offset, end + offset) for start, end in spans)
