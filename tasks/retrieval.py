"""Ranking distractor passages for a question: BM25 (default) or a dense encoder.

Liu et al. (2024, "Lost in the Middle") build MDQA contexts from passages retrieved for the
question, most relevant first; Zhao et al. (2025) extend MDQA to 32K tokens the same way.
BM25 is `bm25s`; the dense option mean-pools the last hidden states of an HF encoder (any
`AutoModel`: a local directory, or a hub id fetched by transformers where the hub is reachable)
and ranks by cosine similarity or, as Contriever itself scores (Izacard et al. 2022; the
`facebook/contriever` model card: mean pooling, then `embeddings[0] @ embeddings[1]`), by the
dot product of the unnormalized embeddings.

Example:
    >>> rank_bm25(["capital of france"], ["Paris is the capital of France.", "Cats purr."], k=2)
    [[0, 1]]
"""

from __future__ import annotations

import numpy as np

from tasks.build import DataError

SIMILARITIES = ("cosine", "dot")


def rank_bm25(queries: list[str], corpus: list[str], k: int) -> list[list[int]]:
    """Indices of the `k` best corpus passages for each query, best first."""
    import bm25s

    k = min(k, len(corpus))
    if k == 0 or not queries:
        return [[] for _ in queries]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
    # Queries as strings so they map through the index vocabulary (ids would be a new vocabulary).
    qtok = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    qtok = [q if q else ["the"] for q in qtok]
    docs, _ = retriever.retrieve(qtok, k=k, show_progress=False, n_threads=1)
    return [list(map(int, row)) for row in np.asarray(docs)]


def rank_dense(queries: list[str], corpus: list[str], k: int, model_path: str, batch_size: int = 16,
               max_length: int = 512, similarity: str = "cosine", revision: str | None = None) -> list[list[int]]:
    """Like `rank_bm25`, by the similarity of mean-pooled encoder states.

    Args:
        queries: one text per question.
        corpus: the passages to rank.
        k: how many indices to return per query, best first.
        model_path: an HF encoder (`AutoModel` + `AutoTokenizer`): a local directory, or a hub
            id such as "facebook/contriever", which transformers downloads unless the hub is
            offline. Weights load from safetensors only.
        batch_size: texts per forward pass.
        max_length: longest input in tokens; capped by the encoder's own position limit.
        similarity: "cosine" (normalized embeddings) or "dot" (Contriever's inner product).
        revision: the hub revision (branch, tag or commit) of `model_path`, None for the default.

    Returns:
        For each query, the indices of its `k` most similar passages: `similarity` of the mean
        over non-padding positions of the last hidden states.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    if similarity not in SIMILARITIES:
        raise ValueError(f"dense similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    tok = AutoTokenizer.from_pretrained(model_path, revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    try:  # safetensors only: a pickle checkpoint could run code while it loads
        model = AutoModel.from_pretrained(model_path, revision=revision, use_safetensors=True).eval()
    except OSError as err:
        raise DataError(f"dense_model {model_path}: cannot load a safetensors encoder: "
                        f"{str(err).splitlines()[0]}") from None
    # Truncate to what the encoder can position (a tokenizer saved without a limit says ~1e30).
    limits = [max_length, getattr(model.config, "max_position_embeddings", max_length)]
    if tok.model_max_length and tok.model_max_length < 1_000_000:
        limits.append(tok.model_max_length)
    max_length = min(limits)

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # [batch, pos, d_model]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float()  # [batch, d_model]
            out.append(torch.nn.functional.normalize(pooled, dim=-1) if similarity == "cosine" else pooled)
        return torch.cat(out)

    k = min(k, len(corpus))
    sims = embed(queries) @ embed(corpus).T  # [n_queries, n_corpus]
    return sims.topk(k, dim=-1).indices.tolist()
