"""engine/chat.py: prompts through chat templates, spans shifted exactly, answer-only training labels.

References: the rendered text itself (where the raw prompt sits in it, found by `str.index`),
the template's own rendering of the whole conversation, and decoding the rendered text
without a template.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.chat import ChatTemplateError, render_completion, render_prompt, shift_spans
from engine.decode import ScoreSpans, greedy_decode, token_spans
from engine.train_worker import IGNORE_INDEX, tokenize_example
from tiny import char_tokenizer, tiny_model

# The char tokenizer has no newline, so the templates mark turns with brackets.
CHATML_LIKE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[end]{% endfor %}"
               "{% if add_generation_prompt %}[assistant]{% endif %}")
# Llama-3's shape: BOS first, content trimmed, a header before each turn.
LLAMA3_LIKE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}|{% endfor %}"
               "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPT = "Doc: the key of door 7 is q4zx. Key of door 7? Answer:"


def templated(template: str):
    tok = char_tokenizer()
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [CHATML_LIKE, LLAMA3_LIKE])
def test_prompt_sits_verbatim_at_the_offset(template):
    tok = templated(template)
    rendered = render_prompt(tok, PROMPT)
    assert rendered.offset == rendered.text.index(PROMPT) > 0
    assert rendered.text.endswith("[assistant]" if template == CHATML_LIKE else "<assistant>")
    start = PROMPT.index("q4zx")
    (s, e), = shift_spans([(start, start + 4)], rendered.offset)
    assert rendered.text[s:e] == "q4zx"


def test_template_that_rewrites_the_prompt_is_an_error():
    tok = templated("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="verbatim"):
        render_prompt(tok, PROMPT)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_prompt(char_tokenizer(), PROMPT)


def test_completion_is_the_reply_after_the_rendered_prompt():
    tok = templated(CHATML_LIKE)
    assert render_completion(tok, PROMPT, " q4zx") == "q4zx[end]"
    # a template that opens the assistant turn one way and renders it another breaks the split
    odd = templated("{% for m in messages %}({{ m['content'] }}){% endfor %}{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(ChatTemplateError, match="differently"):
        render_completion(odd, PROMPT, " q4zx")


@pytest.mark.parametrize("template", [CHATML_LIKE, LLAMA3_LIKE])
def test_training_labels_cover_the_reply_only(template):
    tok = templated(template)
    example = tokenize_example(tok, PROMPT, " q4zx", max_length=512, chat_template=True)
    full = tok.apply_chat_template([{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "q4zx"}],
                                   tokenize=False)
    # the sequence is exactly the template's conversation, and the prompt part is what decoding sees
    assert tok.decode(example["input_ids"]) == full
    prompt_ids = tok(render_prompt(tok, PROMPT).text, add_special_tokens=False)["input_ids"]
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    labels = example["labels"]
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert tok.decode(labels[len(prompt_ids):]) == full[len(render_prompt(tok, PROMPT).text):]
    assert tok.decode(labels[len(prompt_ids):]).startswith("q4zx")
    raw = tokenize_example(tok, PROMPT, " q4zx", max_length=512)
    assert raw["input_ids"] == tok(PROMPT)["input_ids"] + tok(" q4zx", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]


def test_chat_decoding_equals_decoding_the_rendered_text():
    """Templated decoding = raw decoding of the rendered text with spans moved by hand."""
    tok = templated(CHATML_LIKE)
    assert tok("ab")["input_ids"] == tok("ab", add_special_tokens=False)["input_ids"]  # no BOS to differ by
    model = tiny_model("llama", tie_word_embeddings=True)
    prompts = [PROMPT, "zz q4 q4 q4 zz. q?"]
    spans = [ScoreSpans(((26, 30),), ((10, 31),)), ScoreSpans(((3, 5), (6, 8)), ((0, 14),))]
    chat = greedy_decode(model, tok, prompts, max_new_tokens=6, spans=spans, batch_size=2, keep_argmax=True,
                         chat_template=True)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    moved = []
    for text, prompt, s in zip(texts, prompts, spans):
        shift = text.index(prompt)
        moved.append(ScoreSpans(tuple((a + shift, b + shift) for a, b in s.answer_spans),
                                tuple((a + shift, b + shift) for a, b in s.needle_spans)))
    raw = greedy_decode(model, tok, texts, max_new_tokens=6, spans=moved, batch_size=2, keep_argmax=True)
    for c, r in zip(chat, raw):
        assert c.token_ids == r.token_ids and c.text == r.text
        np.testing.assert_array_equal(c.argmax, r.argmax)
        np.testing.assert_array_equal(c.retrieval, r.retrieval)
        np.testing.assert_array_equal(c.insight, r.insight)
    # the answer spans point at the answer's characters of the rendered prompt
    enc = tok(texts[0], return_offsets_mapping=True, add_special_tokens=False)
    (first, last), = token_spans(enc["offset_mapping"], moved[0].answer_spans)
    assert tok.decode(enc["input_ids"][first:last]) == "q4zx"
