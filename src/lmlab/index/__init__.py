"""Retrieval over your own documents: chunking, encoder embeddings, BM25, fusion, and the on-disk store.

Where to look: ``embed.py`` (``Encoder``, ``embed``: text -> unit vectors, mean pooling + L2 norm),
``chunk.py`` (documents split by turns within the encoder's window), ``store.py`` (the SQLite store and
its format: the one class to replace past one machine), ``retrieve.py`` (dense, BM25, reciprocal-rank
fusion), ``index.py`` (``Index``: build / add / remove / search), ``ask.py`` (prompts with numbered sources).
"""

from lmlab.index.ask import answer_with_sources, check_citations
from lmlab.index.embed import DEFAULT_ENCODER, Encoder, embed
from lmlab.index.index import MODES, AddReport, Hit, Index, read_records

__all__ = ["DEFAULT_ENCODER", "MODES", "AddReport", "Encoder", "Hit", "Index", "answer_with_sources",
           "check_citations", "embed", "read_records"]
