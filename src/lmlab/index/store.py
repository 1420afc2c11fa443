"""The on-disk store of an index: one SQLite file holding documents, chunks and their vectors.

Format (``INDEX/index.sqlite``, SQLite in WAL mode; ``FORMAT`` below is its version)::

    meta(key TEXT PRIMARY KEY, value TEXT)       format, encoder, pooling, dim, max_tokens, generation
    docs(id TEXT PRIMARY KEY, hash TEXT,          one row per document: its text, its metadata as JSON,
         text TEXT, meta TEXT)                    and a hash of both (to skip unchanged records)
    chunks(row INTEGER PRIMARY KEY, doc_id TEXT,  one row per chunk: its document, position, text and
           ord INTEGER, text TEXT, vector BLOB)   vector (float32 little-endian, ``dim`` values, unit norm)

Why this layout (measured in ``benchmarks/retrieval.py --storage``): exact search over 100k vectors is one
(R, D) x (D,) matrix-vector product in NumPy, well under the 50 ms budget, so the store only has to hand
the vectors over as one float32 matrix; SQLite gives that, the documents, transactions and concurrent
readers in one file and the standard library. The matrix is read once per generation and kept in memory.

Atomicity: every write (a batch of documents added, updated or removed) is one SQLite transaction that
also bumps ``generation``. A killed writer leaves the last committed transaction in place; committed
batches are never lost. In WAL mode readers keep reading the last committed state while a writer runs,
and notice a new generation on their next search. One writer at a time: a second one waits, then fails
with a clear error.

The rest of lmlab talks to the store through ``Store``'s methods only; a vector database server
(past one machine) is one more class with the same methods.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import DataError

FORMAT = "lmlab-index-1"
DB_NAME = "index.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (id TEXT PRIMARY KEY, hash TEXT NOT NULL, text TEXT NOT NULL, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (row INTEGER PRIMARY KEY AUTOINCREMENT, doc_id TEXT NOT NULL, ord INTEGER NOT NULL,
                                   text TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
"""


@dataclass
class Document:
    """One document to store: its chunks (texts) and their vectors (n_chunks, D)."""

    id: str
    text: str
    meta: dict[str, Any]
    hash: str
    chunks: list[str]
    vectors: np.ndarray


@dataclass
class Snapshot:
    """What searches read, as of one generation: the chunk matrix and where each row comes from."""

    generation: int
    vectors: np.ndarray  # (R, D) float32 unit rows
    row_doc: np.ndarray  # (R,) int: index into doc_ids
    row_ord: np.ndarray  # (R,) int: the chunk's position in its document
    doc_ids: list[str]
    doc_meta: list[dict[str, Any]]
    doc_texts: list[str]
    _doc_index: dict[str, int] = field(default_factory=dict)

    def doc_index(self, doc_id: str) -> int:
        if not self._doc_index:
            self._doc_index.update((d, i) for i, d in enumerate(self.doc_ids))
        return self._doc_index[doc_id]


class Store:
    """The one class between an index and its storage: an SQLite file in directory `path`.

    ``create``/``open`` it; ``info`` (the encoder and format it was built with), ``hashes`` (id -> hash),
    ``write(documents, remove_ids)`` (one atomic transaction), ``snapshot()`` (vectors + documents as of
    the last commit, cached per generation) and ``chunk_text(doc_id, ord)``.
    """

    def __init__(self, path: str | Path, connection: sqlite3.Connection):
        self.path = Path(path)
        self._db = connection
        self._snapshot: Snapshot | None = None

    # --- opening ---------------------------------------------------------------------------------
    @staticmethod
    def _connect(db_path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        return (Path(path) / DB_NAME).is_file()

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        path = Path(path)
        if not cls.exists(path):
            what = "is not an lmlab index (no index.sqlite in it)" if path.exists() else "does not exist"
            raise DataError(f"index {str(path)!r} {what}; build one with: lmlab index build {path} --data FILE.jsonl")
        store = cls(path, cls._connect(path / DB_NAME))
        fmt = store.info().get("format")
        if fmt != FORMAT:
            raise DataError(f"index {str(path)!r} has format {fmt!r}; this lmlab reads {FORMAT!r}")
        return store

    @classmethod
    def create(cls, path: str | Path, info: dict[str, str]) -> "Store":
        """A new, empty store whose meta table holds `info` (encoder, pooling, dim, max_tokens)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise DataError(f"index path {str(path)!r} is a file; an index is a directory")
        path.mkdir(parents=True, exist_ok=True)
        # made under a temporary name and renamed into place: a reader never sees a half-created index
        tmp = path / f"{DB_NAME}.creating-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        db = sqlite3.connect(tmp, isolation_level=None)
        for statement in _SCHEMA.strip().split(";"):
            if statement.strip():
                db.execute(statement)
        rows = {"format": FORMAT, "generation": "0", **{k: str(v) for k, v in info.items()}}
        db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", rows.items())
        db.close()
        if cls.exists(path):  # another process created it meanwhile: keep theirs
            tmp.unlink()
        else:
            os.replace(tmp, path / DB_NAME)
        return cls.open(path)

    def close(self) -> None:
        self._db.close()

    # --- reading ---------------------------------------------------------------------------------
    def info(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def generation(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def hashes(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT id, hash FROM docs").fetchall())

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]

    def snapshot(self) -> Snapshot:
        """Vectors and documents as of the last commit (re-read only when the generation changed)."""
        gen = self.generation()
        if self._snapshot is not None and self._snapshot.generation == gen:
            return self._snapshot
        db = self._db
        db.execute("BEGIN")  # one read transaction: documents and chunks from the same commit
        try:
            gen = self.generation()
            docs = db.execute("SELECT id, text, meta FROM docs ORDER BY id").fetchall()
            rows = db.execute("SELECT doc_id, ord, vector FROM chunks ORDER BY row").fetchall()
        finally:
            db.execute("COMMIT")
        dim = int(self.info()["dim"])
        doc_ids = [d[0] for d in docs]
        index = {d: i for i, d in enumerate(doc_ids)}
        vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), dim)
        self._snapshot = Snapshot(
            generation=gen, vectors=np.ascontiguousarray(vectors, dtype=np.float32),
            row_doc=np.fromiter((index[r[0]] for r in rows), dtype=np.int64, count=len(rows)),
            row_ord=np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows)),
            doc_ids=doc_ids, doc_meta=[json.loads(d[2]) for d in docs], doc_texts=[d[1] for d in docs],
            _doc_index=index)
        return self._snapshot

    def chunk_text(self, doc_id: str, ord: int) -> str:
        row = self._db.execute("SELECT text FROM chunks WHERE doc_id=? AND ord=?", (doc_id, ord)).fetchone()
        if row is None:
            raise DataError(f"index {str(self.path)!r} has no chunk {ord} of document {doc_id!r}")
        return row[0]

    def chunks_of(self, doc_id: str) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT text FROM chunks WHERE doc_id=? ORDER BY ord", (doc_id,))]

    # --- writing ---------------------------------------------------------------------------------
    def write(self, documents: Sequence[Document] = (), remove_ids: Iterable[str] = ()) -> int:
        """Add or replace `documents` and delete `remove_ids`, in one transaction -> rows of docs changed."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")  # the write lock: a second writer waits (timeout), then fails
        except sqlite3.OperationalError as exc:
            raise DataError(f"index {str(self.path)!r} is being written by another process ({exc}); "
                            "try again when it has finished") from None
        try:
            changed = 0
            for doc_id in remove_ids:
                db.execute("DELETE FROM chunks WHERE doc_id=?", (doc_id,))
                changed += db.execute("DELETE FROM docs WHERE id=?", (doc_id,)).rowcount
            for doc in documents:
                db.execute("DELETE FROM chunks WHERE doc_id=?", (doc.id,))
                db.execute("INSERT OR REPLACE INTO docs(id, hash, text, meta) VALUES (?, ?, ?, ?)",
                           (doc.id, doc.hash, doc.text, json.dumps(doc.meta, ensure_ascii=False)))
                vectors = np.ascontiguousarray(doc.vectors, dtype="<f4")
                db.executemany("INSERT INTO chunks(doc_id, ord, text, vector) VALUES (?, ?, ?, ?)",
                               [(doc.id, i, text, vectors[i].tobytes()) for i, text in enumerate(doc.chunks)])
                changed += 1
            db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return changed
