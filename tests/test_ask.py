"""lmlab ask: grounded answers with checked citations (streamed and whole), grounded chat messages, the CLI,
and "summarize everything about X". Uses test_index's ToyEncoder and the tiny random decoder."""

from __future__ import annotations

import importlib
import json
import random
import pytest

import lmlab.generation
from lmlab.index import (CitationFilter, Index, check_citations, grounded_answer, grounded_messages, is_not_found,
                         summarize_hits)
from test_index import DOCS, ToyEncoder

embed_module = importlib.import_module("lmlab.index.embed")  # the package's `embed` is the function


@pytest.fixture
def idx(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in DOCS))
    index, _ = Index.build(tmp_path / "idx", path, meta_fields=["topic"], encoder=ToyEncoder())
    return index


def _fake_stream(pieces):
    def stream(model, tokenizer, prompt, config=None, **overrides):
        yield from pieces
    return stream


ANSWER = "He ordered salmon [d1] and lemonade [d1], at a table [d5] by [dev_999] the window [d9]. See [note here]."


def test_citation_filter_streams_what_check_citations_keeps_whatever_the_piece_boundaries():
    sources = [type("S", (), {"id": i})() for i in ("d1", "d5")]
    clean, cited, invented = check_citations(ANSWER, sources)
    assert cited == ["d1", "d5"] and invented == ["dev_999", "d9"]
    assert "[dev_999]" not in clean and "[d9]" not in clean and "[d1]" in clean and "[note here]" in clean
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(ANSWER)), 8))
        pieces = [ANSWER[a:b] for a, b in zip([0] + cuts, cuts + [len(ANSWER)])]
        f = CitationFilter(sources)
        shown = "".join(f.push(p) for p in pieces) + f.flush()
        assert " ".join(shown.split()) == " ".join(clean.split())
        assert (f.cited, f.invented) == (cited, invented)
    f = CitationFilter(sources)
    assert f.push("salmon [dev_") == "salmon " and f.flush() == "[dev_"  # held back until known, then released


def test_grounded_answer_streams_without_invented_citations(idx, tiny_model_dir, monkeypatch):
    import lmlab

    model, tok = lmlab.load_model(tiny_model_dir), lmlab.load_tokenizer(tiny_model_dir)
    monkeypatch.setattr(lmlab.generation, "stream", _fake_stream(["Salmon [d", "1] and tea [dev_9", "99]."]))
    answer, pieces = grounded_answer(model, tok, idx, "What did the customer order with the salmon?", k=2)
    shown = "".join(pieces)
    assert [s.id for s in answer.sources][0] == "d1" and "Source [d1]:" in answer.prompt
    assert shown == "Salmon [d1] and tea ." and answer.text == "Salmon [d1] and tea ."
    assert answer.cited == ["d1"] and answer.invented == ["dev_999"] and not answer.not_found
    assert is_not_found("The answer is NOT FOUND in the indexed dialogues.")


def test_grounded_answer_runs_the_real_decoder(idx, tiny_model_dir):
    import lmlab
    from lmlab.generation import GenerationConfig

    model, tok = lmlab.load_model(tiny_model_dir), lmlab.load_tokenizer(tiny_model_dir)
    answer, pieces = grounded_answer(model, tok, idx, "Where is the train station?", k=2,
                                     config=GenerationConfig(max_new_tokens=8))
    shown = "".join(pieces)
    assert answer.sources[0].id == "d3" and " ".join(shown.split()) == answer.text


def test_grounded_messages_replace_the_last_user_turn_within_the_budget(idx):
    from serving import tiny_tokenizer

    tok = tiny_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "What did the customer order with the salmon?"}]
    grounded, sources = grounded_messages(messages, tok, idx, budget=10_000, k=3)
    assert grounded[:3] == messages[:3] and messages[3]["content"].startswith("What")  # the input is not changed
    assert sources[0].id == "d1" and "Source [d1]:" in grounded[3]["content"]
    assert "Question: What did the customer order with the salmon?\n" in grounded[3]["content"]
    full = len(tok.encode(tok.apply_chat_template(grounded, add_generation_prompt=True)))
    small, kept = grounded_messages(messages, tok, idx, budget=full - 10, k=3)
    assert len(tok.encode(tok.apply_chat_template(small, add_generation_prompt=True))) <= full - 10
    assert sum(len(s.text) for s in kept) < sum(len(s.text) for s in sources)
    with pytest.raises(Exception, match="user message"):
        grounded_messages(messages[:1], tok, idx, budget=1000)


def test_cli_ask_prints_sources_and_drops_invented_citations(idx, tiny_model_dir, monkeypatch, capsys):
    from lmlab.cli import main

    monkeypatch.setitem(embed_module._ENCODERS, "toy-hash", idx.encoder)
    monkeypatch.setattr(lmlab.generation, "stream", _fake_stream(["Salmon and lemonade [d1]", " [dev_42]."]))
    assert main(["ask", str(idx.path), "What did the customer order with the salmon?", "-k", "2",
                 "--model", str(tiny_model_dir), "--show-context"]) == 0
    out, err = capsys.readouterr()
    answer, sources = out.split("\nsources:\n")
    assert answer.strip() == "Salmon and lemonade [d1] ."
    assert "[dev_42]" not in out and "removed citations of sources that were not retrieved: [dev_42]" in err
    assert "Source [d1]:" in err  # --show-context
    lines = sources.splitlines()
    assert lines[0].startswith("* 1. [d1]") and "topic=restaurant" in lines[0]  # * marks a cited source
    assert main(["ask", str(idx.path), "x", "-k", "0"]) == 2
    assert "-k: 0 must be a positive integer" in capsys.readouterr().err
    assert main(["ask", str(idx.path), "x", "--no-adapter"]) == 2
    assert "--no-adapter applies to --summarize" in capsys.readouterr().err
    assert main(["ask", str(idx.path.parent / "nope"), "x", "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope' does not exist" in err[0]


def test_summarize_everything_about_x_one_line_per_dialogue(idx, tiny_model_dir, monkeypatch, capsys):
    seen = []

    def fake(text):
        seen.append(text)
        return f"summary {len(seen)}"

    out = summarize_hits(idx, "restaurant table pasta salmon", fake, k=2)
    assert {d for d, _ in out} == {"d1", "d5"} and [s for _, s in out] == ["summary 1", "summary 2"]
    assert set(seen) == {DOCS[0]["dialogue"], DOCS[4]["dialogue"]}  # whole dialogues, not their best chunks
    assert len(idx.store.chunks_of("d1")) > 1

    from lmlab.cli import main

    monkeypatch.setitem(embed_module._ENCODERS, "toy-hash", idx.encoder)
    assert main(["ask", str(idx.path), "restaurant table pasta salmon", "--summarize", "-k", "2", "--no-adapter",
                 "--model", str(tiny_model_dir), "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("- ") for line in lines)
    assert {line.rsplit(" ", 1)[-1] for line in lines} == {"[d1]", "[d5]"}
