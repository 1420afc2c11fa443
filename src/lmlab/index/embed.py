"""Sentence embeddings from an lmlab encoder: the vectors the index stores and searches.

Pooling (the sentence-transformers recipe for all-MiniLM-L6-v2, written in its ``1_Pooling`` config):
the encoder's last hidden states are averaged over the real (unpadded) tokens, then L2-normalised, so
the dot product of two vectors is their cosine similarity. Texts longer than ``max_length`` tokens
(256 for MiniLM, as sentence-transformers sets it) are truncated on the right; ``lmlab.index.chunk``
splits documents so that nothing reaches that limit.

Texts are encoded in batches sorted by length (as sentence-transformers does), so a batch pads to
similar lengths and little compute goes to padding; the output keeps the input order.

Shapes: N texts, B batch, T tokens, C hidden size (= D, the vector size).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmlab.errors import ConfigError

DEFAULT_ENCODER = "all-minilm-l6-v2"
POOLING = "mean+l2"  # recorded in every index: vectors from another pooling are not comparable


class Encoder:
    """An lmlab encoder model turned into a text -> unit-vector function.

    ``name`` identifies the encoder in an index (an index refuses queries from another encoder);
    ``dim`` is the vector size; ``max_length`` the tokens one text may hold before truncation.
    """

    def __init__(self, source: str = DEFAULT_ENCODER, max_length: int = 256, batch_size: int = 32):
        import lmlab

        self.model = lmlab.load_model(source)
        self.tokenizer = lmlab.load_tokenizer(source)
        if self.model.config.arch != "encoder":
            raise ConfigError(f"encoder {source!r} has arch={self.model.config.arch!r}; "
                              "embeddings need an encoder model such as all-minilm-l6-v2")
        self.model.eval()
        self.name, self.pooling = str(source), POOLING
        self.max_length = min(max_length, self.model.config.max_seq_len)
        self.batch_size = batch_size
        self.dim = self.model.config.d_model

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes in the encoder, special tokens ([CLS] ... [SEP]) included."""
        return len(self.tokenizer.encode(text, add_special_tokens=True))

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> (N, D) float32 unit vectors, in the order given."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.backend.encode_batch(texts, add_special_tokens=True)
        seqs = [e.ids[:self.max_length - 1] + e.ids[-1:] if len(e.ids) > self.max_length else e.ids
                for e in encodings]  # right-truncate, keeping the final [SEP] as sentence-transformers does
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            T = len(seqs[rows[0]])  # longest first: this batch pads to its first row
            ids = torch.full((len(rows), T), pad, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
            for r, i in enumerate(rows):
                ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, :len(seqs[i])] = 1
            hidden = self.model.encode(ids, mask if not bool(mask.all()) else None)  # (B, T, C)
            m = mask[..., None].to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # (B, C) mean over real tokens
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            out[rows] = pooled.numpy()
        return out


_ENCODERS: dict[str, Encoder] = {}


def get_encoder(source: str = DEFAULT_ENCODER) -> Encoder:
    """The encoder for `source`, loaded once per process."""
    if source not in _ENCODERS:
        _ENCODERS[source] = Encoder(source)
    return _ENCODERS[source]


def embed(texts: Sequence[str], encoder: str = DEFAULT_ENCODER) -> np.ndarray:
    """texts -> (N, D) float32 unit vectors: exactly the vectors ``lmlab index`` stores and searches with.

    This is what an embeddings endpoint should return (``POST /v1/embeddings``)."""
    return get_encoder(encoder).embed(texts)
