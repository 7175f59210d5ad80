"""MDQA distractors: the dense retriever against a torch reference, and the answer filter.

The dense option ranks pool passages by cosine similarity (or, as Contriever scores, the dot
product) of mean-pooled last hidden states of an encoder (tasks/retrieval.py). The reference
here runs a tiny BERT built from a config and saved to disk (no download) on each text alone
(no padding, no batching), pools by hand and ranks every passage by brute force. The answer filter drops a
pool passage only when a gold answer occurs in it as whole SQuAD-normalized tokens.
"""

import json

import pytest
import torch

from tasks import mdqa
from tasks.retrieval import rank_dense
from tasks.text import contains_answer, normalize_answer

WORDS = ("the river stone bridge city north south harbor opened built old new king queen war peace "
         "song novel written painted museum tower island mountain lake forest train station school "
         "church market castle garden road wall gate field village").split()


def _passages(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    # lengths past the encoder's 64 positions: truncation must respect the model's limit
    return [" ".join(rng.choices(WORDS, k=rng.randint(5, 90))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
    """A tiny BERT and a word-level tokenizer, saved the way a local encoder path is."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("encoder")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", ".", "?", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(path)
    return path


def _reference_similarity(path, queries: list[str], corpus: list[str], similarity: str = "cosine") -> torch.Tensor:
    """Cosine (or dot product) of mean-pooled last hidden states, one unpadded text at a time."""
    from transformers import AutoTokenizer, BertModel

    tok, model = AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()
    limit = model.config.max_position_embeddings

    def embed(text: str) -> torch.Tensor:
        ids = tok(text)["input_ids"][:limit]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [pos, d_model]
        return hidden.mean(0)

    q = torch.stack([embed(t) for t in queries])
    c = torch.stack([embed(t) for t in corpus])
    if similarity == "dot":
        return torch.tensor([[float(a @ b) for b in c] for a in q])  # [n_queries, n_corpus]
    return torch.nn.functional.cosine_similarity(q[:, None, :], c[None, :, :], dim=-1)  # [n_queries, n_corpus]


QUERIES = ["who built the old stone bridge", "where is the island museum", "when was the novel written"]


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_rank_dense_matches_brute_force_ranking(dense_model, similarity):
    corpus = _passages(40, seed=1)

    ranked = rank_dense(QUERIES, corpus, k=10, model_path=str(dense_model), batch_size=7, similarity=similarity)

    sims = _reference_similarity(dense_model, QUERIES, corpus, similarity)
    for row, got in zip(sims, ranked):
        want = torch.argsort(row, descending=True)[:10].tolist()
        top = row[want]
        assert (top[:-1] - top[1:]).min() > 1e-5 * top.abs().max()  # no near-ties: the order is well defined
        assert got == want


def test_dot_and_cosine_rank_differently(dense_model):
    # Embedding norms vary with the passage, so the two scorings are distinguishable here and
    # the brute-force test above checks each one, not a shared ordering.
    corpus = _passages(40, seed=1)
    cosine, dot = (rank_dense(QUERIES, corpus, k=10, model_path=str(dense_model), similarity=s)
                   for s in ("cosine", "dot"))
    assert cosine != dot
    with pytest.raises(ValueError, match="dense similarity must be one of cosine, dot"):
        rank_dense(QUERIES, corpus, k=3, model_path=str(dense_model), similarity="l2")


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_mdqa_dense_build_places_the_top_ranked_passages(dense_model, tmp_path, char_tok, similarity):
    pool = _passages(30, seed=2)
    gold = "The old stone bridge was built by the king of the north."
    question = "who built the old stone bridge"
    (tmp_path / "q.jsonl").write_text(json.dumps(
        {"question": question, "answers": ["the king of the north"],
         "ctxs": [{"title": "Bridge", "text": gold, "hasanswer": True, "isgold": True}]}) + "\n")
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"title": "", "text": t}) + "\n" for t in pool))

    res = mdqa.build("real", sources={"train": str(tmp_path / "q.jsonl"), "pool": str(tmp_path / "pool.jsonl")},
                     options={"retriever": "dense", "dense_model": str(dense_model), "gold_position": 0,
                              "dense_similarity": similarity},
                     tokenizer=char_tok, target_tokens=2000, n=1, seed=0, split="train")

    (ex,) = res.examples
    docs = ex.prompt[ex.context_span.start : ex.context_span.end].split("\n")
    shown = [d.split(") ", 1)[1] if d.startswith("Document [") and ") " in d else d.split("] ", 1)[-1]
             for d in docs if d.startswith("Document [")]
    assert shown[0] == gold
    sims = _reference_similarity(dense_model, [question], [f" {t}" for t in pool], similarity)[0]
    order = [pool[i] for i in torch.argsort(sims, descending=True).tolist()]
    distractors = shown[1:]
    assert len(distractors) >= 5
    assert distractors == order[: len(distractors)]


def test_mdqa_dense_options_are_checked(tmp_path, char_tok):
    (tmp_path / "q.jsonl").write_text(json.dumps(
        {"question": "who built it", "answers": ["the king"],
         "ctxs": [{"title": "Bridge", "text": "It was built by the king.", "isgold": True}]}) + "\n")
    sources = {"train": str(tmp_path / "q.jsonl"), "pool": str(tmp_path / "q.jsonl")}
    for options, message in (({"retriever": "dense"}, "needs option dense_model"),
                             ({"retriever": "dense", "dense_model": "x", "dense_similarity": "l2"},
                              "dense_similarity must be one of cosine, dot, got 'l2'")):
        with pytest.raises(mdqa.DataError, match=message):
            mdqa.build("real", sources=sources, options=options, tokenizer=char_tok, target_tokens=200, n=1, seed=0,
                       split="train")


def test_dense_encoder_loads_safetensors_only(dense_model, tmp_path):
    """An encoder that ships only a pickle (pytorch_model.bin) is refused, not unpickled."""
    import shutil

    from transformers import BertModel

    from tasks.build import DataError

    pickled = tmp_path / "encoder"
    shutil.copytree(dense_model, pickled)
    model = BertModel.from_pretrained(dense_model)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(DataError, match=rf"dense_model {pickled}: cannot load a safetensors encoder"):
        rank_dense(["alpha"], ["alpha beta."], k=1, model_path=str(pickled))


def test_contains_answer_is_whole_token():
    text = normalize_answer("Vitamin S is rare, says the U.S. report on buses.")
    assert contains_answer(text, [normalize_answer("S")])
    assert contains_answer(text, [normalize_answer("U.S.")])  # "us" as a token
    assert not contains_answer(normalize_answer("Superman flies; cats purr."), [normalize_answer("S")])
    assert not contains_answer(normalize_answer("The bus left."), [normalize_answer("U.S.")])
    assert contains_answer(normalize_answer("Dr. Moreau-Smith, Jr. spoke."), [normalize_answer("Moreau-Smith, Jr.")])
    assert not contains_answer(normalize_answer("Moreau Smith spoke."), [normalize_answer("Moreau-Smith, Jr.")])
    assert not contains_answer(text, [normalize_answer("the")])  # normalizes to nothing: never matches


def test_distractor_filter_one_letter_and_punctuated_answers(tmp_path, char_tok):
    records = [
        {"question": "which letter names the vitamin", "answers": ["S"],
         "ctxs": [{"title": "Vitamins", "text": "The rare vitamin is called S by chemists.", "isgold": True}]},
        {"question": "who wrote the harbor report", "answers": ["Moreau-Smith, Jr."],
         "ctxs": [{"title": "Report", "text": "The harbor report was written by Moreau-Smith, Jr. in 1990.",
                   "isgold": True}]},
    ]
    pool = {
        "Vitamin S is sold in shops across the harbor.": False,  # states "S": dropped for question 1
        "Ships sail past the harbor walls in summer.": True,  # s only inside words
        "Moreau-Smith, Jr. wrote letters about the harbor.": False,  # states the answer: dropped for question 2
        "Moreau Smith sold fish at the harbor market.": True,  # other tokens once normalized
        "The harbor is calm, and the vitamin shop is closed.": True,
    }
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"title": "", "text": t}) + "\n" for t in pool))

    res = mdqa.build("real", sources={"train": str(tmp_path / "q.jsonl"), "pool": str(tmp_path / "pool.jsonl")},
                     options={}, tokenizer=char_tok, target_tokens=900, n=2, seed=0, split="train")

    assert len(res.examples) == 2
    for ex in res.examples:
        context = ex.prompt[ex.context_span.start : ex.context_span.end]
        dropped = "Vitamin S is sold" if ex.answers == ("S",) else "Moreau-Smith, Jr. wrote"
        for text, kept_by_both in pool.items():
            if text.startswith(dropped):
                assert text not in context
            elif kept_by_both:
                assert text in context
