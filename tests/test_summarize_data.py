"""Dialogue data: the bundled sample, DialogSum JSONL / Hugging Face CSV loaders, and bad input."""

from __future__ import annotations

import json
import re

import pytest

from lmlab.errors import DataError
from lmlab.tasks.summarize.data import load_dialogues, require_references


def test_bundled_sample_is_complete_and_dialogsum_style():
    ds = load_dialogues()  # default source: the bundled sample, read through importlib.resources
    assert ds.source == "sample (bundled)" and len(ds) >= 24 and not ds.skipped
    assert len({d.id for d in ds.records}) == len(ds)
    assert len({d.topic for d in ds.records}) >= 20  # everyday topics, not one repeated scene
    for d in ds.records:
        turns = d.dialogue.splitlines()
        assert 4 <= len(turns) <= 12, d.id
        assert all(t.startswith(("#Person1#: ", "#Person2#: ")) for t in turns), d.id
        assert turns[0].startswith("#Person1#: ")
        assert len(d.references) == 1 and d.topic
        one_or_two = re.sub(r"\b(Dr|Mr|Mrs|Ms)\. ", "", d.references[0]).count(".")  # sentences, not titles
        assert 1 <= one_or_two <= 2 and len(d.references[0].split()) <= 45, d.id
        assert "#Person" in d.references[0] or d.references[0].split()[0][0].isupper(), d.id
    assert load_dialogues("sample").fingerprint == ds.fingerprint


def test_dialogsum_dev(dialogsum_dev):
    ds = load_dialogues(dialogsum_dev)
    assert len(ds) == 500 and ds.records[0].id == "dev_0" and ds.records[0].topic == "see a doctor"
    assert ds.records[0].references[0].startswith("#Person2# has trouble breathing")
    require_references(ds.records, ds.source)


def test_jsonl_several_references_and_id_field(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"id": "t1", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.",
                                "summary1": "A.", "summary2": "B.", "summary3": "C.", "topic": "greeting"}) + "\n\n")
    (d,) = load_dialogues(path).records
    assert (d.id, d.references, d.topic, d.n_turns) == ("t1", ["A.", "B.", "C."], "greeting", 2)


def test_hf_csv_format(tmp_path):
    path = tmp_path / "validation.csv"
    path.write_text('id,dialogue,summary,topic\ntrain_0,"#Person1#: Hi.\r\n#Person2#: Hello, you.",'
                    '#Person1# greets #Person2#.,greeting\n', newline="")
    (d,) = load_dialogues(path).records
    assert d.id == "train_0" and d.dialogue == "#Person1#: Hi.\n#Person2#: Hello, you."
    assert d.references == ["#Person1# greets #Person2#."]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,hello\n")
    with pytest.raises(DataError, match=r"bad.csv:1: missing column 'dialogue'"):
        load_dialogues(bad)


def test_missing_field_names_field_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"fname": "a", "dialogue": "x", "summary": "y"}) + "\n"
                    + json.dumps({"fname": "b", "summary": "y"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: missing field 'dialogue'"):
        load_dialogues(path)
    path.write_text(json.dumps({"dialogue": "x"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'fname' \(or 'id'\)"):
        load_dialogues(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: not valid JSON"):
        load_dialogues(path)


def test_empty_dialogue_is_a_reported_skip(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"fname": "a", "dialogue": "  ", "summary": "y"}) + "\n"
                    + json.dumps({"fname": "b", "dialogue": "#Person1#: Hi.", "summary": "y"}) + "\n")
    ds = load_dialogues(path)
    assert [d.id for d in ds.records] == ["b"]
    assert len(ds.skipped) == 1 and "d.jsonl:1" in ds.skipped[0] and "a: empty dialogue" in ds.skipped[0]


def test_non_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"fname": "a", "dialogue": "caf"}).encode()
    path.write_bytes(good[:-2] + b"\xe9" + good[-2:])  # 'café' in Latin-1 inside the JSON string
    with pytest.raises(DataError, match=rf"latin1.jsonl is not valid UTF-8: byte 0xe9 at byte offset {len(good) - 2}"):
        load_dialogues(path)


def test_hidden_test_without_summaries_loads_but_cannot_be_scored(tmp_path):
    path = tmp_path / "hidden.jsonl"
    path.write_text(json.dumps({"fname": "h0", "dialogue": "#Person1#: Hi."}) + "\n")
    ds = load_dialogues(path)
    assert ds.records[0].references == []
    with pytest.raises(DataError, match=r"cannot score .*hidden.jsonl: 1 of 1 dialogues have no reference summary \(first: 'h0'\)"):
        require_references(ds.records, ds.source)


def test_duplicate_ids_and_bad_paths(tmp_path):
    path = tmp_path / "dup.jsonl"
    row = json.dumps({"fname": "a", "dialogue": "#Person1#: Hi."})
    path.write_text(row + "\n" + row + "\n")
    with pytest.raises(DataError, match="duplicate id 'a'"):
        load_dialogues(path)
    with pytest.raises(DataError, match="does not exist"):
        load_dialogues(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown extension '.txt'"):
        load_dialogues(tmp_path / "x.txt")


def test_hf_dataset_offline_is_a_clear_error():
    # `datasets` is optional; without it (or offline) the error names the id and suggests a local file
    with pytest.raises(DataError, match=r"knkarthick/dialogsum.*local \.jsonl/\.csv file"):
        load_dialogues("hf:knkarthick/dialogsum")
