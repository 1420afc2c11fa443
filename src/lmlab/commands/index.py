"""`lmlab index build|search|remove`: an embedded vector + BM25 index of your own documents (no server).

Maps flags onto ``lmlab.index.Index`` (build / add / remove / search); the on-disk format is described
in ``lmlab.index.store`` and docs/retrieval.md.
"""

from __future__ import annotations

import argparse
import json
import sys


# lmlab.index.DEFAULT_ENCODER and lmlab.index.MODES, spelled out (tests/test_index.py checks they agree):
# importing lmlab.index loads torch, and building `lmlab index --help` should not
DEFAULT_ENCODER = "all-minilm-l6-v2"
MODES = ("hybrid", "dense", "bm25")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmlab.cli import positive_int

    sub = parser.add_subparsers(dest="index_command", metavar="{build,search,remove}", required=True)
    b = sub.add_parser("build", help="embed and store the records of a JSONL file (adds new, updates changed ones)",
                       description="Chunk each record's text by turns within the encoder's window, embed the chunks, "
                                   "and store them with the text and metadata. Re-running adds new records and "
                                   "updates changed ones only; an interrupted build keeps what it committed.")
    b.add_argument("index", help="the index directory (created if missing)")
    b.add_argument("--data", required=True, metavar="FILE.jsonl", help="the records, one JSON object per line")
    b.add_argument("--text-field", default="dialogue", help="field holding the text (default: %(default)s)")
    b.add_argument("--id-field", default="fname", help="field holding the unique id (default: %(default)s)")
    b.add_argument("--meta-fields", default="", metavar="A,B",
                   help="comma-separated fields stored as metadata (for --filter and the hits), e.g. topic")
    b.add_argument("--encoder", default=None,
                   help=f"encoder model for a new index (default: {DEFAULT_ENCODER}); an existing index keeps its own")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("search", help="the k documents that best match a query (or every query of a JSONL file)",
                       description="Hits are documents (chunks of one document are merged); each reports its id, "
                                   "score and best-matching chunk.")
    s.add_argument("index", help="the index directory")
    s.add_argument("query", nargs="?", default=None, help="the query text (or use --queries)")
    s.add_argument("-k", type=positive_int, default=5, help="documents to return (default: %(default)s)")
    s.add_argument("--mode", choices=MODES, default="hybrid",
                   help="dense (encoder vectors), bm25 (words), or hybrid (reciprocal-rank fusion of both; default)")
    s.add_argument("--filter", action="append", default=None, metavar="FIELD=VALUE",
                   help="keep documents whose metadata FIELD equals VALUE (repeatable: all must hold)")
    s.add_argument("--json", action="store_true", help="print one JSON line {query, hits: [{id, score, text, ...}]}")
    s.add_argument("--queries", default=None, metavar="FILE.jsonl",
                   help="run every query of this JSONL file in one process; prints one JSON line per query")
    s.add_argument("--query-field", default="query", help="with --queries: the field holding the query (default: %(default)s)")

    r = sub.add_parser("remove", help="delete documents by id")
    r.add_argument("index", help="the index directory")
    r.add_argument("ids", nargs="+", metavar="ID", help="document ids to delete")


def _read_queries(path: str, field: str) -> list[str]:
    from pathlib import Path

    from lmlab.errors import DataError
    from lmlab.jsonl import iter_objects

    if not Path(path).is_file():
        raise DataError(f"queries file {path!r} does not exist")
    queries = []
    with open(path, encoding="utf-8") as f:
        for lineno, obj in iter_objects(f, path):
            if not isinstance(obj.get(field), str):
                raise DataError(f"{path}:{lineno}: no string {field!r} field (fields: {', '.join(map(repr, obj))})")
            queries.append(obj[field])
    if not queries:
        raise DataError(f"queries file {path!r} is empty: no queries")
    return queries


def run(args: argparse.Namespace) -> int:
    from lmlab.errors import ConfigError
    from lmlab.index import Index

    if args.index_command == "build":
        meta = [m.strip() for m in args.meta_fields.split(",") if m.strip()]
        _, report = Index.build(args.index, args.data, text_field=args.text_field, id_field=args.id_field,
                                meta_fields=meta, encoder=args.encoder, progress=not args.no_progress)
        print(f"indexed {report}", file=sys.stderr)
        return 0
    if args.index_command == "remove":
        removed = Index(args.index).remove(args.ids)
        print(f"removed {len(removed)} document(s): {', '.join(removed)}", file=sys.stderr)
        return 0
    if (args.query is None) == (args.queries is None):
        raise ConfigError("give either a QUERY or --queries FILE.jsonl (not both)")
    index = Index(args.index)
    queries = _read_queries(args.queries, args.query_field) if args.queries else [args.query]
    results = index.search(queries, k=args.k, mode=args.mode, filter=args.filter)
    for query, hits in zip(queries, results):
        if args.json or args.queries:
            print(json.dumps({"query": query, "hits": [h.to_dict() for h in hits]}, ensure_ascii=False))
            continue
        if not hits:
            print("no matching documents")
        for rank, h in enumerate(hits, 1):
            meta = "  ".join(f"{k}={v}" for k, v in h.meta.items())
            print(f"{rank}. {h.id}  score {h.score:.4f}  chunk {h.chunk}  {meta}".rstrip())
            text = h.text.replace("\n", " / ")
            print(f"   {text[:300]}{'...' if len(text) > 300 else ''}")
    return 0
