"""``Index``: documents in, documents out. Chunks and embeds records, keeps them in a ``Store``, and searches
them by dense vectors, BM25 or both fused.

    idx = Index.build("archive", "dev.jsonl", text_field="dialogue", id_field="fname", meta_fields=["topic"])
    idx.search("a customer orders food at a restaurant", k=5)          # -> [Hit(id, score, text, chunk, meta)]
    idx.add([{"fname": "new_1", "dialogue": "..."}]); idx.remove(["dev_3"])

Adding is incremental: a record whose text and metadata are unchanged (same hash) is skipped, a changed one
replaces its old chunks, a new one is added. Records are written in batches, each one transaction, so an
interrupted build keeps every batch it committed and a re-run continues from there.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import ConfigError, DataError, choices_error
from lmlab.index.chunk import chunk_turns
from lmlab.index.embed import DEFAULT_ENCODER, get_encoder
from lmlab.index.retrieve import BM25, FUSION_DEPTH, best_chunk_by_terms, dense_rank, rrf
from lmlab.index.store import Document, Store
from lmlab.jsonl import iter_objects

MODES = ("hybrid", "dense", "bm25")


@dataclass
class Hit:
    """One retrieved document: its id, score (cosine, BM25 or fused), the best-matching chunk and its metadata."""

    id: str
    score: float
    text: str
    chunk: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AddReport:
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    chunks: int = 0
    seconds: float = 0.0

    @property
    def records(self) -> int:
        return self.new + self.updated + self.unchanged

    def __str__(self) -> str:
        rate = self.records / self.seconds if self.seconds > 0 else float("inf")
        return (f"{self.records} records ({self.new} new, {self.updated} updated, {self.unchanged} unchanged; "
                f"{self.chunks} chunks embedded) in {self.seconds:.1f} s: {rate:.1f} records/s")


def read_records(path: str | Path, text_field: str = "dialogue", id_field: str = "fname",
                 meta_fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A JSONL file -> records ``{"id", "text", "meta"}``; every bad line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    records, first_line = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, obj in iter_objects(f, str(path)):
            records.append(normalize_record(obj, text_field, id_field, meta_fields, f"{path}:{lineno}"))
            doc_id = records[-1]["id"]
            if doc_id in first_line:
                raise DataError(f"{path}:{lineno}: duplicate id {doc_id!r} (first on line {first_line[doc_id]})")
            first_line[doc_id] = lineno
    if not records:
        raise DataError(f"data file {str(path)!r} is empty: no records to index")
    return records


def normalize_record(obj: dict[str, Any], text_field: str, id_field: str, meta_fields: Sequence[str],
                     where: str) -> dict[str, Any]:
    """One input object -> ``{"id", "text", "meta"}``; `where` names it in errors (``file:line``)."""
    for name in (id_field, text_field, *meta_fields):
        if name not in obj:
            raise DataError(f"{where}: no {name!r} field (fields: {', '.join(map(repr, obj)) or 'none'})")
    doc_id, text = obj[id_field], obj[text_field]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id) == "":
        raise DataError(f"{where}: id field {id_field!r} is {doc_id!r}; it must be a non-empty string or an integer")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: text field {text_field!r} is {str(text)[:40]!r}; it must be a non-empty string")
    return {"id": str(doc_id), "text": text, "meta": {m: obj[m] for m in meta_fields}}


def parse_filter(items: Sequence[str] | dict[str, Any] | None) -> dict[str, str]:
    """``["topic=see a doctor", ...]`` (or a dict) -> {field: value}; every item needs a '='."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): str(v) for k, v in items.items()}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"filter {item!r} must be FIELD=VALUE (e.g. topic=see a doctor)")
        out[name.strip()] = value.strip()
    return out


class Index:
    """An on-disk index of documents (a directory; see ``lmlab.index.store`` for the format).

    ``Index(path)`` opens an existing index with the encoder it was built with; ``Index.create`` /
    ``Index.build`` make one. `encoder` may be a registry name or an object with ``name``, ``pooling``,
    ``dim``, ``max_length``, ``count_tokens(text)`` and ``embed(texts) -> (N, D)`` (``lmlab.index.Encoder``).
    """

    def __init__(self, path: str | Path, encoder=None):
        self.store = Store.open(path)
        self.path = Path(path)
        info = self.store.info()
        self.encoder = _resolve_encoder(encoder or info["encoder"])
        _check_encoder(self.path, info, self.encoder)
        self.max_tokens = int(info["max_tokens"])
        self._bm25: tuple[int, BM25] | None = None

    # --- making ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, encoder=DEFAULT_ENCODER) -> "Index":
        """An empty index at `path` (an existing one is opened instead, if its encoder matches)."""
        enc = _resolve_encoder(encoder)
        if not Store.exists(path):
            Store.create(path, {"encoder": enc.name, "pooling": enc.pooling, "dim": enc.dim,
                                "max_tokens": enc.max_length}).close()
        return cls(path, enc)

    @classmethod
    def build(cls, path: str | Path, data: str | Path | Iterable[dict[str, Any]], text_field: str = "dialogue",
              id_field: str = "fname", meta_fields: Sequence[str] = (), encoder=None,
              progress: bool = False) -> tuple["Index", AddReport]:
        """Create (or open) the index at `path` and add the records of `data` (a JSONL file or dicts)."""
        if isinstance(data, (str, Path)):
            records = read_records(data, text_field, id_field, meta_fields)
        else:
            records = [normalize_record(obj, text_field, id_field, meta_fields, f"record {i}")
                       for i, obj in enumerate(data)]
            if not records:
                raise DataError("no records to index")
        index = cls.create(path, encoder or DEFAULT_ENCODER) if not Store.exists(path) else cls(path, encoder)
        report = index.add(records, progress=progress)
        return index, report

    # --- writing ---------------------------------------------------------------------------------
    def _hash(self, record: dict[str, Any]) -> str:
        payload = json.dumps([record["text"], record["meta"], self.max_tokens], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def add(self, records: Iterable[dict[str, Any]], progress: bool = False, batch_size: int = 32) -> AddReport:
        """Add new records and update changed ones -> counts. Records are ``{"id", "text", "meta"}`` dicts
        (``read_records`` makes them); each batch of `batch_size` documents is one committed transaction."""
        from tqdm.auto import tqdm

        start = time.perf_counter()
        records = list(records)
        seen: dict[str, int] = {}
        for i, r in enumerate(records):
            if r["id"] in seen:
                raise DataError(f"duplicate id {r['id']!r} (records {seen[r['id']]} and {i})")
            seen[r["id"]] = i
        old = self.store.hashes()
        report = AddReport()
        todo = []
        for r in records:
            h = self._hash(r)
            if old.get(r["id"]) == h:
                report.unchanged += 1
            else:
                todo.append((r, h, r["id"] in old))
        bar = tqdm(total=len(records), desc="indexing", unit="rec", disable=not progress, dynamic_ncols=True)
        bar.update(report.unchanged)
        enc = self.encoder
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            chunked = [chunk_turns(r["text"], enc.count_tokens, self.max_tokens) for r, _, _ in batch]
            vectors = enc.embed([c for chunks in chunked for c in chunks])  # (sum of chunks, D)
            docs, at = [], 0
            for (r, h, _), chunks in zip(batch, chunked):
                docs.append(Document(r["id"], r["text"], r["meta"], h, chunks, vectors[at:at + len(chunks)]))
                at += len(chunks)
            self.store.write(docs)
            report.chunks += at
            report.updated += sum(1 for _, _, was in batch if was)
            report.new += sum(1 for _, _, was in batch if not was)
            bar.update(len(batch))
        bar.close()
        report.seconds = time.perf_counter() - start
        return report

    def remove(self, ids: Iterable[str]) -> list[str]:
        """Delete documents by id -> the ids removed. An id not in the index is an error (nothing is removed)."""
        ids = [str(i) for i in ids]
        if not ids:
            raise DataError("remove needs at least one document id")
        present = self.store.hashes()
        missing = [i for i in ids if i not in present]
        if missing:
            raise DataError(f"index {str(self.path)!r} has no document {missing[0]!r}"
                            + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.store.write(remove_ids=list(dict.fromkeys(ids)))
        return list(dict.fromkeys(ids))

    def __len__(self) -> int:
        return len(self.store)

    def document(self, doc_id: str) -> str:
        """The whole text of document `doc_id` (a hit's ``text`` is only its best chunk)."""
        snap = self.store.snapshot()
        try:
            return snap.doc_texts[snap.doc_index(str(doc_id))]
        except KeyError:
            raise DataError(f"index {str(self.path)!r} has no document {doc_id!r}") from None

    def metadata(self, doc_id: str) -> dict[str, Any]:
        """The metadata stored with document `doc_id` (``--meta-fields``)."""
        snap = self.store.snapshot()
        try:
            return snap.doc_meta[snap.doc_index(str(doc_id))]
        except KeyError:
            raise DataError(f"index {str(self.path)!r} has no document {doc_id!r}") from None

    # --- searching -------------------------------------------------------------------------------
    def _bm25_for(self, snap) -> BM25:
        if self._bm25 is None or self._bm25[0] != snap.generation:
            self._bm25 = (snap.generation, BM25(snap.doc_texts))
        return self._bm25[1]

    def _allowed(self, snap, filters: dict[str, str]) -> np.ndarray | None:
        if not filters:
            return None
        fields = set().union(*(meta.keys() for meta in snap.doc_meta))
        for name in filters:
            if name not in fields:
                raise DataError(f"filter field {name!r} is not in the index's metadata "
                                f"(fields: {', '.join(sorted(fields)) or 'none; build with --meta-fields'})")
        return np.array([all(str(meta.get(k)) == v for k, v in filters.items()) for meta in snap.doc_meta],
                        dtype=bool)

    def search(self, query: str | Sequence[str], k: int = 5, mode: str = "hybrid",
               filter: Sequence[str] | dict[str, Any] | None = None) -> list[Hit] | list[list[Hit]]:
        """Documents for `query` -> ``k`` hits, best first (a list of queries -> a list of hit lists).

        mode: ``dense`` (cosine of the query's vector with each chunk's; a document scores its best chunk),
        ``bm25`` (whole documents), or ``hybrid`` (reciprocal-rank fusion of the two rankings, each read to
        depth 100). `filter` keeps documents whose metadata equal every ``FIELD=VALUE`` given.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k={k!r} must be a positive integer (the number of documents to return)")
        if mode not in MODES:
            raise choices_error("mode", mode, MODES)
        single = isinstance(query, str)
        queries = [query] if single else list(query)
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise DataError(f"query {q!r} is empty; give some text to search for")
        snap = self.store.snapshot()
        allowed = self._allowed(snap, parse_filter(filter))
        qvecs = self.encoder.embed(queries) if mode != "bm25" else None  # (Q, D)
        bm25 = self._bm25_for(snap) if mode != "dense" else None
        out = []
        for qi, q in enumerate(queries):
            depth = max(k, FUSION_DEPTH) if mode == "hybrid" else k
            dense = dense_rank(snap, qvecs[qi], depth, allowed) if qvecs is not None else []
            lexical = bm25.rank(q, depth, allowed) if bm25 is not None else []
            chunk_of = {doc: ord for doc, _, ord in dense}
            if mode == "dense":
                ranked = [(doc, score) for doc, score, _ in dense]
            elif mode == "bm25":
                ranked = lexical
            else:
                ranked = rrf([[doc for doc, _, _ in dense], [doc for doc, _ in lexical]])
            hits = []
            for doc, score in ranked[:k]:
                doc_id = snap.doc_ids[doc]
                if doc in chunk_of:
                    ord = chunk_of[doc]
                    text = self.store.chunk_text(doc_id, ord)
                else:
                    chunks = self.store.chunks_of(doc_id)
                    ord = best_chunk_by_terms(q, chunks)
                    text = chunks[ord]
                hits.append(Hit(doc_id, round(float(score), 6), text, ord, snap.doc_meta[doc]))
            out.append(hits)
        return out[0] if single else out


def _resolve_encoder(encoder):
    if isinstance(encoder, str):
        return get_encoder(encoder)
    for attr in ("name", "pooling", "dim", "max_length", "count_tokens", "embed"):
        if not hasattr(encoder, attr):
            raise ConfigError(f"encoder {encoder!r} has no {attr!r}; pass a registry name or an lmlab.index.Encoder")
    return encoder


def _check_encoder(path: Path, info: dict[str, str], encoder) -> None:
    built = (info.get("encoder"), info.get("pooling"), info.get("dim"))
    given = (encoder.name, encoder.pooling, str(encoder.dim))
    if built != given:
        raise DataError(f"index {str(path)!r} was built with encoder {built[0]!r} (pooling {built[1]}, dim {built[2]}); "
                        f"it cannot be searched or extended with encoder {given[0]!r} (pooling {given[1]}, "
                        f"dim {given[2]}): rebuild it, or use {built[0]!r}")
