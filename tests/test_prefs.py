"""Preference pairs: the JSONL reader/writer, `lmlab prefs build` and `lmlab prefs label`."""

from __future__ import annotations

import json

import pytest

from lmlab.align.prefs import PreferencePair, append_preference, read_preferences
from lmlab.errors import DataError


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_read_round_trip_keeps_source_and_line_numbers(tmp_path):
    path = tmp_path / "p.jsonl"
    pairs = [PreferencePair("d1", "good", "bad", "dev_0 human>base"), PreferencePair("d2", "yes", "no", None)]
    for pair in pairs:
        append_preference(path, pair)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")  # a blank line is skipped but still counts for later line numbers
    append_preference(path, PreferencePair("d3", "a", "b"))
    back = read_preferences(path)
    assert [(p.prompt, p.chosen, p.rejected, p.source) for p in back] == [
        ("d1", "good", "bad", "dev_0 human>base"), ("d2", "yes", "no", None), ("d3", "a", "b", None)]
    assert [p.line for p in back] == [1, 2, 4]
    assert "source" not in json.loads(path.read_text().splitlines()[1])


def test_append_after_a_partial_last_line_starts_a_new_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}', encoding="utf-8")  # no newline
    append_preference(path, PreferencePair("q", "c2", "r2"))
    assert [p.prompt for p in read_preferences(path)] == ["p", "q"]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "rejected": "r"}, "missing 'chosen'"),
    ({"prompt": "p", "chosen": "c"}, "missing 'rejected'"),
    ({"chosen": "c", "rejected": "r"}, "missing 'prompt'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are the same"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "'chosen' must be a string"),
    ({"prompt": "p", "chosen": "c", "rejected": "  "}, "'rejected' is empty"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "source": 5}, "'source' must be a string"),
])
def test_bad_records_name_the_line(tmp_path, record, message):
    path = tmp_path / "p.jsonl"
    _write(path, [json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}), "", json.dumps(record)])
    with pytest.raises(DataError) as err:
        read_preferences(path)
    assert f"{path}:3:" in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_preferences(tmp_path / "nope.jsonl")
    path = tmp_path / "p.jsonl"
    _write(path, ["{not json"])
    with pytest.raises(DataError, match=r"p\.jsonl:1: not valid JSON"):
        read_preferences(path)


def test_append_refuses_an_invalid_pair(tmp_path):
    with pytest.raises(DataError, match="same text"):
        append_preference(tmp_path / "p.jsonl", PreferencePair("p", "x", "x"))
    assert not (tmp_path / "p.jsonl").exists()
