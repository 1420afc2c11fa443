"""Retrieval over a store snapshot: dense (cosine over chunk vectors), BM25 (over whole documents), and their
reciprocal-rank fusion. Every function ranks *documents*: a document's dense score is its best chunk's.

Shapes: R chunk rows, D vector size, N documents, Q queries.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from lmlab.index.store import Snapshot

RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009): score = sum over rankings of 1 / (RRF_K + rank)
FUSION_DEPTH = 100  # how many documents of each ranking the fusion reads


def dense_rank(snap: Snapshot, query: np.ndarray, depth: int, allowed: np.ndarray | None = None
               ) -> list[tuple[int, float, int]]:
    """query (D,) unit vector -> up to `depth` documents as (doc index, cosine, best chunk ord), best first.

    `allowed` (N,) bool masks documents out (filters). Only the top chunk rows are sorted: candidates
    double until they hold `depth` distinct documents (or every row).
    """
    R = snap.vectors.shape[0]
    if R == 0 or depth <= 0:
        return []
    # (R,) cosine of each chunk: torch's matrix-vector product (MKL/oneDNN) is ~1.3x NumPy's here
    scores = torch.mv(torch.from_numpy(snap.vectors), torch.from_numpy(np.ascontiguousarray(query, np.float32))).numpy()
    if allowed is not None:
        scores = np.where(allowed[snap.row_doc], scores, -np.inf)
    m = min(R, 4 * depth)
    while True:
        top = np.argpartition(-scores, m - 1)[:m] if m < R else np.arange(R)
        top = top[np.argsort(-scores[top], kind="stable")]
        out, seen = [], set()
        for row in top:
            if not np.isfinite(scores[row]):
                break
            doc = int(snap.row_doc[row])
            if doc not in seen:
                seen.add(doc)
                out.append((doc, float(scores[row]), int(snap.row_ord[row])))
                if len(out) == depth:
                    return out
        if m == R or (len(top) and not np.isfinite(scores[top[-1]])):
            return out
        m = min(R, 2 * m)


_TOKEN = re.compile(r"(?u)\b\w\w+\b")


class BM25:
    """BM25 (``bm25s``, its default Lucene variant, English stop words) over whole documents: unlike the
    encoder, BM25 has no window, so a document is scored as one text and no chunk boundary splits a match."""

    def __init__(self, texts: list[str]):
        import bm25s

        self._bm25s = bm25s
        self.n = len(texts)
        self.retriever = None
        if texts:
            tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False)
            self.retriever = bm25s.BM25()
            self.retriever.index(tokens, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """query -> (N,) BM25 score of every document (0 where no query term occurs)."""
        if self.retriever is None:
            return np.zeros(0, dtype=np.float32)
        words = self._bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        vocab = self.retriever.vocab_dict
        ids = [vocab[w] for w in words if w in vocab]
        if not ids:
            return np.zeros(self.n, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(ids), dtype=np.float32)

    def rank(self, query: str, depth: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """-> up to `depth` (doc index, score) with a positive score, best first."""
        scores = self.scores(query)
        if allowed is not None and len(scores):
            scores = np.where(allowed, scores, 0.0)
        n = min(depth, int((scores > 0).sum()))
        if n == 0:
            return []
        top = np.argpartition(-scores, n - 1)[:n]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(i), float(scores[i])) for i in top]


def best_chunk_by_terms(query: str, chunks: list[str]) -> int:
    """The chunk sharing the most query words (BM25 hits report a chunk too); ties: the first."""
    words = {w.lower() for w in _TOKEN.findall(query)}
    counts = [sum(1 for w in _TOKEN.findall(c) if w.lower() in words) for c in chunks]
    return int(np.argmax(counts)) if counts else 0


def rrf(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of several rankings (doc indices, best first) -> (doc, fused score), best first."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, 1):
            fused[doc] = fused.get(doc, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))
