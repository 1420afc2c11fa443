"""Retrieval benchmark: quality and speed of ``lmlab index`` on DialogSum dev, the store's search time at 100k
vectors, and lmlab's embeddings against sentence-transformers', all in one run on the same machine.

Sections (all by default, or pick with flags):

* ``--quality``  all 500 dev records indexed (dialogue = the document), each summary the query and its own
  dialogue the target. R@1, R@5, MRR (over the top 100), build records/s, search ms/query (batch 1, k=5)
  for BM25, dense and hybrid (reciprocal-rank fusion). Build: BM25 = building the bm25s index of the 500 dialogues; dense =
  chunking + embedding + writing the store (``Index.add``); hybrid = both.
* ``--store``    100k synthetic unit vectors (384 dims, as MiniLM's) in the SQLite store: search ms at batch 1
  through ``Index.search(mode="dense")`` (the query vector given, so no encoder time), the time to read
  the store into memory once, and the same k-NN in ``sqlite-vec`` (if installed) as the alternative storage.
* ``--embed``    lmlab's ``Encoder`` vs ``sentence-transformers`` on the same model (all-MiniLM-L6-v2), the
  same texts (dev dialogues and summaries), the same threads and batch size: texts/s, interleaved rounds,
  best round each; and the minimum cosine between the two sets of vectors.

    python benchmarks/retrieval.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DEV = REPO.parent / "shared" / "data" / "dialogsum" / "dev.jsonl"


def quality(data: Path) -> None:
    from lmlab.index import Index
    from lmlab.index.retrieve import BM25

    records = [json.loads(line) for line in open(data)]
    queries = [r["summary"] for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        idx, report = Index.build(Path(tmp) / "idx", data, meta_fields=["topic"])
        dense_build = report.seconds
        t = time.perf_counter()
        BM25([r["dialogue"] for r in records])
        bm25_build = time.perf_counter() - t
        idx.search("warm up", k=1)  # the first search builds the BM25 index and reads the store
        builds = {"bm25": bm25_build, "dense": dense_build, "hybrid": bm25_build + dense_build}
        print(f"\nDialogSum dev: {len(records)} records, {report.chunks} chunks "
              f"(dialogues over the encoder's 256-token window are split by turns)\n")
        print("| retriever | R@1 | R@5 | MRR | build records/s | search ms/query |")
        print("|---|---|---|---|---|---|")
        for mode in ("bm25", "dense", "hybrid"):
            results = idx.search(queries, k=100, mode=mode)  # ranks to depth 100 for MRR
            t = time.perf_counter()
            for q in queries:  # timed: batch 1, k=5 (the CLI's default), query embedding included
                idx.search(q, k=5, mode=mode)
            ms = (time.perf_counter() - t) / len(queries) * 1000
            ranks = []
            for r, hits in zip(records, results):
                ids = [h.id for h in hits]
                ranks.append(ids.index(r["fname"]) + 1 if r["fname"] in ids else None)
            n = len(ranks)
            r1 = sum(x == 1 for x in ranks) / n
            r5 = sum(x is not None and x <= 5 for x in ranks) / n
            mrr = sum(1 / x for x in ranks if x) / n
            print(f"| {mode} | {r1:.3f} | {r5:.3f} | {mrr:.3f} | {len(records) / builds[mode]:.1f} | {ms:.1f} |")


class _GivenVector:
    """A stand-in encoder for the store benchmark: 'embeds' a query as a fixed random unit vector."""

    name, pooling, dim, max_length = "synthetic", "mean+l2", 384, 256

    def __init__(self, rng):
        v = rng.standard_normal(self.dim).astype(np.float32)
        self.vector = v / np.linalg.norm(v)

    def count_tokens(self, text):
        return 1

    def embed(self, texts):
        return np.tile(self.vector, (len(texts), 1))


def store(n: int, k: int = 5, reps: int = 50) -> None:
    from lmlab.index import Index
    from lmlab.index.store import Document

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        enc = _GivenVector(rng)
        idx = Index.create(Path(tmp) / "idx", enc)
        t = time.perf_counter()
        for s in range(0, n, 10_000):
            idx.store.write([Document(f"doc{i}", f"text {i}", {}, "h", [f"text {i}"], vecs[i:i + 1])
                             for i in range(s, min(n, s + 10_000))])
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        idx.store.snapshot()
        load_s = time.perf_counter() - t
        idx.search("q", k=k, mode="dense")
        times, floor = [], []
        matrix, q = torch.from_numpy(vecs), torch.from_numpy(enc.vector)
        for _ in range(reps):  # interleaved with the floor: one matrix-vector product over the same vectors
            t = time.perf_counter()
            hits = idx.search("q", k=k, mode="dense")
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.mv(matrix, q)
            floor.append(time.perf_counter() - t)
        exact = np.argsort(-(vecs @ enc.vector))[:k]
        assert [h.id for h in hits] == [f"doc{i}" for i in exact], "dense search is not exact"
        print(f"\nstore: {n} vectors x 384: write {write_s:.1f} s ({n / write_s:.0f} vectors/s), "
              f"read into memory {load_s * 1000:.0f} ms once per generation")
        print(f"  lmlab Index.search dense, batch 1, k={k}: median {np.median(times) * 1000:.1f} ms, "
              f"p95 {np.percentile(times, 95) * 1000:.1f} ms (exact: matches brute force); the bare (R, D) x (D,) "
              f"product alone: median {np.median(floor) * 1000:.1f} ms, so search = "
              f"{np.median(times) / np.median(floor):.2f}x the memory-bound floor")
    try:
        import sqlite3

        import sqlite_vec
    except ImportError:
        print("  sqlite-vec not installed: the alternative store is not measured (pip install sqlite-vec)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "vec.sqlite")
        if not hasattr(db, "enable_load_extension"):
            print("  sqlite-vec: this Python's sqlite3 cannot load extensions (built without them), so a store "
                  "that needs sqlite-vec would not even open here; not measured")
            return
        db.enable_load_extension(True)
        sqlite_vec.load(db)
        db.execute("CREATE VIRTUAL TABLE v USING vec0(embedding float[384] distance_metric=cosine)")
        t = time.perf_counter()
        db.executemany("INSERT INTO v(rowid, embedding) VALUES (?, ?)", ((i, vecs[i].tobytes()) for i in range(n)))
        db.commit()
        write_s = time.perf_counter() - t
        q = enc.vector.tobytes()
        times = []
        for _ in range(max(5, reps // 5)):
            t = time.perf_counter()
            db.execute("SELECT rowid, distance FROM v WHERE embedding MATCH ? AND k = ?", (q, k)).fetchall()
            times.append(time.perf_counter() - t)
        print(f"  sqlite-vec vec0 (brute force in C), batch 1, k={k}: median {np.median(times) * 1000:.1f} ms, "
              f"p95 {np.percentile(times, 95) * 1000:.1f} ms; write {write_s:.1f} s")


def embed_vs_sentence_transformers(data: Path, n: int = 128, rounds: int = 3, batch_size: int = 32) -> None:
    from lmlab.checkpoints.registry import local_path
    from lmlab.index.embed import Encoder

    records = [json.loads(line) for line in open(data)][:n]
    texts = [r["dialogue"] for r in records] + [r["summary"] for r in records]
    ours = Encoder(batch_size=batch_size)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("\nsentence-transformers is not installed: pip install sentence-transformers (no torch pulled)")
        return
    st = SentenceTransformer(str(local_path("all-minilm-l6-v2")), device="cpu")
    a = ours.embed(texts)
    b = st.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    best_ours, best_st = float("inf"), float("inf")
    for _ in range(rounds):  # interleaved: both see the same machine load
        t = time.perf_counter()
        ours.embed(texts)
        best_ours = min(best_ours, time.perf_counter() - t)
        t = time.perf_counter()
        st.encode(texts, batch_size=batch_size, normalize_embeddings=True)
        best_st = min(best_st, time.perf_counter() - t)
    cos = (a * b).sum(1)
    print(f"\nembeddings, all-MiniLM-L6-v2, {len(texts)} texts (dev dialogues + summaries), batch {batch_size}, "
          f"{torch.get_num_threads()} thread(s), best of {rounds} interleaved rounds:")
    print(f"  lmlab {len(texts) / best_ours:.1f} texts/s, sentence-transformers {len(texts) / best_st:.1f} texts/s: "
          f"{best_st / best_ours:.2f}x")
    print(f"  cosine(lmlab, sentence-transformers): min {cos.min():.6f}, mean {cos.mean():.6f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=DEV)
    p.add_argument("--quality", action="store_true")
    p.add_argument("--store", action="store_true")
    p.add_argument("--embed", action="store_true")
    p.add_argument("--vectors", type=int, default=100_000)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    every = not (args.quality or args.store or args.embed)
    if every or args.store:
        store(args.vectors)
    if every or args.embed:
        embed_vs_sentence_transformers(args.data)
    if every or args.quality:
        quality(args.data)


if __name__ == "__main__":
    main()
