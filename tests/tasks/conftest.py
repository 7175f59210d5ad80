import gzip
import json
from pathlib import Path

import pytest

DATA = Path(__file__).parents[2] / "data"
NQ = DATA / "nq-open-oracle.jsonl.gz"
FIXTURES = Path(__file__).parents[1] / "fixtures"


def train_bpe(texts, vocab_size=4000):
    """A byte-level BPE tokenizer trained offline on `texts` (a realistic subword tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    with gzip.open(NQ, "rt") as f:
        texts = [c["text"] for line in f for c in json.loads(line)["ctxs"]][:600]
    return train_bpe(texts)


@pytest.fixture(scope="session")
def char_tok():
    from tiny import char_tokenizer

    return char_tokenizer()
