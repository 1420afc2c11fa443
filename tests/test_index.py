"""lmlab.index: chunking, the store, incremental build, search modes, filters, bad input, a killed build.

Most tests use ``ToyEncoder`` (hashed bag of words, 16-token window) so that they run in milliseconds
and chunking is exercised; the real all-MiniLM-L6-v2 is checked against transformers' mean pooling.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmlab.errors import ConfigError, DataError
from lmlab.index import Index, read_records
from lmlab.index.chunk import chunk_turns
from lmlab.index.store import Store

TESTS = Path(__file__).resolve().parent


class ToyEncoder:
    """Unit vectors of hashed lower-cased words longer than 3 letters (256 dims); a word counts as one token,
    plus 2 specials."""

    name, pooling, dim, max_length = "toy-hash", "mean+l2", 256, 16

    def __init__(self, delay: float = 0.0):
        self.delay, self.embedded = delay, 0

    def count_tokens(self, text: str) -> int:
        return len(text.split()) + 2

    def embed(self, texts):
        time.sleep(self.delay)
        self.embedded += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                if len(word.strip(".,?!:")) <= 3:
                    continue
                out[i, int(hashlib.md5(word.strip(".,?!:").encode()).hexdigest(), 16) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


DOCS = [
    {"fname": "d1", "dialogue": "#Person1#: I would like to order the grilled salmon please.\n#Person2#: Certainly, "
                                "and to drink?\n#Person1#: A glass of lemonade.", "topic": "restaurant"},
    {"fname": "d2", "dialogue": "#Person1#: My laptop screen is broken.\n#Person2#: We can repair it by Friday "
                                "for ninety dollars.", "topic": "repair"},
    {"fname": "d3", "dialogue": "#Person1#: Where is the train station?\n#Person2#: Walk two blocks north and "
                                "turn left at the bakery.", "topic": "directions"},
    {"fname": "d4", "dialogue": "#Person1#: The quarterly budget meeting moved to Monday.\n#Person2#: Then I will "
                                "prepare the sales figures tonight.\n#Person1#: Good, and book the big room."
                                "\n#Person2#: Done.", "topic": "work"},
    {"fname": "d5", "dialogue": "#Person1#: Table for two?\n#Person2#: Yes, near the window, and the pasta menu.",
     "topic": "restaurant"},
]


def _write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def data(tmp_path):
    return _write(tmp_path / "docs.jsonl", DOCS)


def test_chunks_hold_whole_turns_within_the_window():
    enc = ToyEncoder()
    text = "\n".join(f"#P{i % 2}#: " + " ".join(f"w{i}_{j}" for j in range(i + 2)) for i in range(8))
    text += "\n#P0#: " + " ".join(f"long{j}" for j in range(40))  # one turn longer than the window
    chunks = chunk_turns(text, enc.count_tokens, 16)
    assert len(chunks) > 3
    assert all(enc.count_tokens(c) <= 16 for c in chunks)
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())  # nothing lost, nothing repeated
    assert chunk_turns("short text", enc.count_tokens, 16) == ["short text"]


def test_build_search_modes_and_hits_are_documents(tmp_path, data):
    idx, report = Index.build(tmp_path / "idx", data, meta_fields=["topic"], encoder=ToyEncoder())
    assert (report.new, report.updated, report.unchanged) == (5, 0, 0)
    assert report.chunks > 5  # d1 and d4 exceed the 16-token window
    for mode in ("dense", "bm25", "hybrid"):
        hits = idx.search("grilled salmon and lemonade", k=3, mode=mode)
        assert hits[0].id == "d1", mode
        assert len({h.id for h in hits}) == len(hits) <= 3  # chunks of one document are merged
        assert hits[0].text in DOCS[0]["dialogue"] and hits[0].meta == {"topic": "restaurant"}
    hit = idx.search("prepare the sales figures tonight", k=1, mode="dense")[0]
    assert hit.id == "d4" and "sales figures" in hit.text  # the hit reports the chunk that matched
    many = idx.search(["train station bakery", "laptop repair"], k=1)
    assert [h[0].id for h in many] == ["d3", "d2"]


def test_incremental_add_update_remove(tmp_path, data):
    enc = ToyEncoder()
    idx, _ = Index.build(tmp_path / "idx", data, meta_fields=["topic"], encoder=enc)
    before = enc.embedded
    _, again = Index.build(tmp_path / "idx", data, meta_fields=["topic"], encoder=enc)
    assert (again.new, again.updated, again.unchanged) == (0, 0, 5) and enc.embedded == before
    changed = [dict(DOCS[1], dialogue="#Person1#: My phone battery died.")] + [
        {"fname": "d6", "dialogue": "#Person1#: The concert tickets are sold out.", "topic": "music"}]
    _, upd = Index.build(tmp_path / "idx", _write(tmp_path / "more.jsonl", changed), meta_fields=["topic"], encoder=enc)
    assert (upd.new, upd.updated, upd.unchanged) == (1, 1, 0)
    idx = Index(tmp_path / "idx", encoder=enc)
    assert len(idx) == 6
    assert idx.search("phone battery", k=1, mode="bm25")[0].id == "d2"
    assert idx.search("laptop screen", k=6, mode="bm25") == [] or all(
        h.id != "d2" for h in idx.search("laptop screen", k=6, mode="bm25"))
    assert idx.remove(["d6", "d3"]) == ["d6", "d3"]
    assert len(idx) == 4 and "d3" not in {h.id for h in idx.search("train station", k=4, mode="hybrid")}
    with pytest.raises(DataError, match="no document 'nope'"):
        idx.remove(["d1", "nope"])
    assert len(idx) == 4  # nothing removed when one id is unknown


def test_filter(tmp_path, data):
    idx, _ = Index.build(tmp_path / "idx", data, meta_fields=["topic"], encoder=ToyEncoder())
    hits = idx.search("table window pasta salmon", k=5, filter=["topic=restaurant"])
    assert {h.id for h in hits} == {"d1", "d5"}
    with pytest.raises(DataError, match="filter field 'mood'.*topic"):
        idx.search("x", filter=["mood=happy"])
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        idx.search("x", filter=["restaurant"])


def test_bad_input_names_the_value(tmp_path, data):
    with pytest.raises(DataError, match="index '.*missing' does not exist"):
        Index(tmp_path / "missing")
    Index.build(tmp_path / "idx", data, encoder=ToyEncoder())

    class Other(ToyEncoder):
        name, dim = "other-encoder", 32

    with pytest.raises(DataError, match="built with encoder 'toy-hash'.*'other-encoder'"):
        Index(tmp_path / "idx", encoder=Other())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl' is empty"):
        read_records(empty)
    with pytest.raises(DataError, match=r"no\.jsonl:2: no 'dialogue' field"):
        read_records(_write(tmp_path / "no.jsonl", [DOCS[0], {"fname": "x", "text": "hi"}]))
    with pytest.raises(DataError, match=r"noid\.jsonl:1: no 'fname' field"):
        read_records(_write(tmp_path / "noid.jsonl", [{"dialogue": "hi"}]))
    with pytest.raises(DataError, match=r"dup\.jsonl:3: duplicate id 'd1' \(first on line 1\)"):
        read_records(_write(tmp_path / "dup.jsonl", [DOCS[0], DOCS[1], DOCS[0]]))
    with pytest.raises(DataError, match="meta.jsonl:1: no 'topic' field"):
        read_records(_write(tmp_path / "meta.jsonl", [{"fname": "a", "dialogue": "b"}]), meta_fields=["topic"])
    idx = Index(tmp_path / "idx", encoder=ToyEncoder())
    for k in (0, -1):
        with pytest.raises(ConfigError, match=f"k={k}"):
            idx.search("x", k=k)
    with pytest.raises(ConfigError, match="mode='fuzzy'"):
        idx.search("x", mode="fuzzy")


_CHILD = """
import sys, json
sys.path.insert(0, {tests!r})
from test_index import ToyEncoder
from lmlab.index import Index, read_records
idx = Index.create({path!r}, ToyEncoder(delay=0.4))
idx.add(read_records({data!r}), batch_size=2)
"""


def test_killed_build_keeps_committed_batches_and_readers_work_during_it(tmp_path):
    records = [{"fname": f"r{i}", "dialogue": f"#Person1#: record number {i} about topic{i}"} for i in range(40)]
    data = _write(tmp_path / "many.jsonl", records)
    path = tmp_path / "idx"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(TESTS), path=str(path), data=str(data))],
                             env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (Store.exists(path) and len(Store.open(path)) >= 4):
            time.sleep(0.05)
        reader = Index(path, encoder=ToyEncoder())  # a reader while the build runs
        assert reader.search("record number 1 about topic1", k=1, mode="bm25")[0].id == "r1"
        assert child.poll() is None, "the build finished before it could be killed; slow the toy encoder down"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    idx = Index(path, encoder=ToyEncoder())
    kept = len(idx)
    assert 4 <= kept < 40 and kept % 2 == 0  # whole batches of 2, no half-written batch
    snap = idx.store.snapshot()
    assert len(set(snap.row_doc.tolist())) == kept  # every kept document has its chunks
    report = idx.add(read_records(data))
    assert (report.new, report.unchanged) == (40 - kept, kept)
    assert len(idx) == 40


def test_cli_build_search_remove(tmp_path, data, capsys, minilm_path):
    from lmlab.cli import main

    idx = str(tmp_path / "idx")
    assert main(["index", "build", idx, "--data", str(data), "--meta-fields", "topic", "--no-progress"]) == 0
    assert "5 new" in capsys.readouterr().err
    assert main(["index", "search", idx, "a glass of lemonade with salmon", "-k", "2", "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["query"] == "a glass of lemonade with salmon" and line["hits"][0]["id"] == "d1"
    assert set(line["hits"][0]) >= {"id", "score", "text", "chunk"}
    queries = _write(tmp_path / "q.jsonl", [{"q": "broken laptop screen"}, {"q": "train station"}])
    assert main(["index", "search", idx, "--queries", str(queries), "--query-field", "q", "-k", "1",
                 "--mode", "dense"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [o["hits"][0]["id"] for o in out] == ["d2", "d3"]
    assert main(["index", "search", idx, "x", "-k", "0"]) == 2
    assert "-k: 0 must be a positive integer" in capsys.readouterr().err
    assert main(["index", "remove", idx, "d2"]) == 0
    assert main(["index", "search", idx, "broken laptop", "--json", "-k", "5"]) == 0
    assert "d2" not in {h["id"] for h in json.loads(capsys.readouterr().out)["hits"]}
    assert main(["index", "search", str(tmp_path / "nope"), "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope' does not exist" in err[0]


def test_minilm_embeddings_match_transformers_mean_pooling(minilm_path):
    import torch
    import transformers

    from lmlab.index import embed

    texts = ["#Person1#: Hello, how are you doing today?\n#Person2#: I've been having trouble breathing.",
             "A short one.", "word " * 400]  # the last is truncated at 256 tokens, as sentence-transformers does
    ours = embed(texts)
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
    model = transformers.AutoModel.from_pretrained(str(minilm_path)).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()
    cos = (ours * ref).sum(1)
    assert ours.shape == (3, 384) and np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    assert cos.min() >= 0.9999, cos


def test_answer_prompt_has_numbered_sources_within_budget_and_invented_citations_are_dropped(tmp_path, data,
                                                                                          tiny_model_dir):
    import lmlab
    from lmlab.index import answer_with_sources, check_citations

    idx, _ = Index.build(tmp_path / "idx", data, meta_fields=["topic"], encoder=ToyEncoder())
    model, tok = lmlab.load_model(tiny_model_dir), lmlab.load_tokenizer(tiny_model_dir)
    prompt, sources = answer_with_sources(model, tok, idx, "What did the customer order with the salmon?", k=3,
                                          max_new_tokens=64, chat=False)
    assert sources[0].id == "d1" and f"Source [{sources[0].id}]:" in prompt
    assert len(tok.encode(prompt)) <= model.config.max_seq_len - 64
    # a small context budget keeps fewer / shorter sources, never overflows
    model.config.max_seq_len = len(tok.encode(prompt)) - 10 + 64
    small, kept = answer_with_sources(model, tok, idx, "What did the customer order with the salmon?", k=3,
                                      max_new_tokens=64, chat=False)
    assert len(tok.encode(small)) <= model.config.max_seq_len - 64 and len(small) < len(prompt)
    clean, cited, invented = check_citations("Salmon and lemonade [d1], a table [d9] [dev_999].", sources)
    assert cited == ["d1"] and invented == ["d9", "dev_999"]
    assert clean == "Salmon and lemonade [d1], a table ."


def test_the_cli_spells_out_the_library_s_modes_and_encoder():
    """commands/index.py copies two constants so that building its parser needs no torch: they must agree."""
    import lmlab.index
    from lmlab.commands import index as command

    assert command.MODES == lmlab.index.MODES and command.DEFAULT_ENCODER == lmlab.index.DEFAULT_ENCODER
