"""Retrieval over your own documents: chunking, encoder embeddings, BM25, fusion, and the on-disk store.

Where to look: ``embed.py`` (``Encoder``, ``embed``: text -> unit vectors, mean pooling + L2 norm),
``chunk.py`` (documents split by turns within the encoder's window), ``store.py`` (the SQLite store and
its format: the one class to replace past one machine), ``retrieve.py`` (dense, BM25, reciprocal-rank
fusion), ``index.py`` (``Index``: build / add / remove / search), ``ask.py`` (grounded answers with numbered
sources and checked citations, grounded chat messages, summaries of each hit).
"""

from lmlab.index.ask import (NOT_FOUND, Answer, CitationFilter, answer_with_sources, check_citations,
                             grounded_answer, grounded_messages, is_not_found, summarize_hits)
from lmlab.index.embed import DEFAULT_ENCODER, Encoder, embed
from lmlab.index.index import MODES, AddReport, Hit, Index, read_records

__all__ = ["DEFAULT_ENCODER", "MODES", "NOT_FOUND", "AddReport", "Answer", "CitationFilter", "Encoder", "Hit", "Index",
           "answer_with_sources", "check_citations", "embed", "grounded_answer", "grounded_messages", "is_not_found",
           "read_records", "summarize_hits"]
