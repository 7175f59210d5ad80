"""A word-level tokenizer for the miniature world, saved as an HF fast tokenizer.

Every word the world writes is one token, so a needle's answer is a single context token
the retrieval score can match. Strings it has never seen (the 4-character symbols of the
synthetic variants, "xq7b") fall back to characters, never to <unk>: the model is WordPiece
over a vocabulary of whole words plus every printable ASCII character, as a word start
and as a "##" continuation. Bracketed document ids ("[3]") stay whole.

Example:
    >>> tokenizer = build_tokenizer(build_world(seed=0), Path("/tmp/tok"))
    >>> tokenizer.tokenize("Tavor was born in Kesrith. xq7b [3]")
    ['Tavor', 'was', 'born', 'in', 'Kesrith', '.', 'x', '##q', '##7', '##b', '[3]']
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from .world import FILLER, WORD_PATTERN, World

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
DOCUMENT_IDS = tuple(f"[{i}]" for i in range(1, 21))
NUMBERS = tuple(str(i) for i in range(101))
CHARACTERS = tuple(c for c in string.printable if not c.isspace())
# Words of the prompts the tasks and the pretraining corpus wrap around the world's text.
PROMPT_WORDS = (
    "Write a high-quality answer for the given question using only the provided search results "
    "( some of which might be irrelevant ). Document Title : Question Answer Answer the question "
    "based on the given passages . Only give me the answer and do not output any other words . "
    "The following are given passages . Which two documents contain the following insight ? "
    "Insight Documents Copy Text Key Value Query Find What Who is are of the and or key value "
    "Below below some documents about each with an id ids numbers give list retrieve repeat "
    "paragraphs passage passages context dictionary lookup symbol symbols string strings list lists"
)


def vocabulary(world: World, extra_texts: tuple[str, ...] = ()) -> list[str]:
    """Whole words first (world, prompts, extra texts), then the character fallback."""
    words = list(world.words()) + re.findall(WORD_PATTERN, PROMPT_WORDS + " " + FILLER)
    for text in extra_texts:
        words += re.findall(WORD_PATTERN, text)
    ordered = list(SPECIALS) + list(DOCUMENT_IDS) + list(NUMBERS) + list(CHARACTERS)
    ordered += [f"##{c}" for c in CHARACTERS] + sorted(set(words))
    return list(dict.fromkeys(ordered))


def build_tokenizer(world: World, out_dir: Path | None = None, extra_texts: tuple[str, ...] = ()):
    """Builds the world's tokenizer; saves it with `save_pretrained` when `out_dir` is given.

    Args:
        world: the world whose words become whole tokens.
        out_dir: where to save (loadable by `engine.models.load_tokenizer`).
        extra_texts: more text whose words should be whole tokens (task prompts).

    Returns:
        A `PreTrainedTokenizerFast` that prepends <s> and never emits <unk> on ASCII text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(world, extra_texts))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix="##",
                                     max_input_chars_per_word=1000))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", model_max_length=1 << 20)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
