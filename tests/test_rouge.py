"""ROUGE against hand-computed values, multi-reference aggregation, degenerate inputs, and file scoring."""

from __future__ import annotations

import json

import pytest

from lmlab.errors import DataError
from lmlab.tasks.summarize.rouge import is_looping
from lmlab.tasks.summarize.rouge import (
    METRICS, corpus_score, format_scores_table, read_predictions, read_references, score_example, score_files,
    split_sentences,
)


def test_hand_computed_unigram_bigram_lcs():
    # pred: the cat sat on the mat   (6 tokens)     ref: the cat lay on the mat   (6 tokens)
    # unigrams, clipped: the x2, cat, on, mat -> 5 matches; P = R = 5/6 -> F1 = 5/6
    # bigrams: pred {the cat, cat sat, sat on, on the, the mat}, ref {the cat, cat lay, lay on, on the, the mat}
    #          -> 3 matches of 5; F = 3/5
    # LCS: "the cat on the mat" = 5 -> P = R = 5/6
    s = score_example("the cat sat on the mat", ["the cat lay on the mat"])
    assert s.best["rouge1"] == pytest.approx(5 / 6)
    assert s.best["rouge2"] == pytest.approx(3 / 5)
    assert s.best["rougeL"] == pytest.approx(5 / 6)
    assert s.best["rougeLsum"] == pytest.approx(5 / 6)  # one sentence each: Lsum == L


def test_precision_recall_asymmetry():
    # pred "the cat" (2), ref "the cat sat down" (4): 2 unigram matches -> P = 1, R = 1/2, F = 2PR/(P+R) = 2/3
    # bigrams: pred {the cat} matches 1 of ref's 3 -> P = 1, R = 1/3, F = 1/2
    s = score_example("the cat", "the cat sat down")
    assert s.best["rouge1"] == pytest.approx(2 / 3)
    assert s.best["rouge2"] == pytest.approx(1 / 2)
    assert s.best["rougeL"] == pytest.approx(2 / 3)


def test_stemmer_is_on():
    # Porter: dogs -> dog, running -> run, runs -> run; every token matches after stemming
    assert score_example("dogs running", "dog runs").best["rouge1"] == pytest.approx(1.0)


def test_rouge_lsum_uses_our_sentence_split():
    # pred "a b. c d." vs ref "c d. a b."
    # ROUGE-L over the whole text: LCS(a b c d, c d a b) = 2 -> 2/4 = 0.5
    # ROUGE-Lsum, sentences split: ref sentence "c d" has LCS 2 with pred sentence "c d", "a b" with "a b"
    #   -> union hits 4 of 4 reference tokens, 4 of 4 prediction tokens -> 1.0
    s = score_example("Alpha beta. Gamma delta.", "Gamma delta. Alpha beta.")
    assert s.best["rougeL"] == pytest.approx(0.5)
    assert s.best["rougeLsum"] == pytest.approx(1.0)


def test_split_sentences():
    assert split_sentences("Hi there. How are you? Fine!  Bye") == ["Hi there.", "How are you?", "Fine!", "Bye"]
    assert split_sentences("He said \"go.\" Then left.\nNew line") == ['He said "go."', "Then left.", "New line"]
    assert split_sentences("  ") == []
    assert split_sentences("3.5 kg of flour") == ["3.5 kg of flour"]  # no split without whitespace after the dot


def test_multi_reference_best_and_mean():
    # ref 1 identical -> 1.0 on every metric; ref 2 shares nothing -> 0.0; best = 1.0, mean = 0.5
    s = score_example("the cat sat", ["the cat sat", "a dog ran"])
    for m in METRICS:
        assert s.best[m] == pytest.approx(1.0)
        assert s.mean[m] == pytest.approx(0.5)
    assert len(s.per_reference) == 2


def test_empty_and_identical():
    for m in METRICS:
        assert score_example("", ["a summary here."]).best[m] == 0.0
        assert score_example("   ", ["a summary here."]).best[m] == 0.0
        assert score_example("#Person1# buys a lamp. It is red.", "#Person1# buys a lamp. It is red.").best[m] == 1.0
    with pytest.raises(DataError, match="without references"):
        score_example("x", [])


def test_corpus_score_is_mean_over_examples():
    a = score_example("the cat sat", ["the cat sat"])  # 1.0
    b = score_example("zzz", ["the cat sat"])  # 0.0
    c = score_example("the cat sat", ["the cat sat", "qqq"])  # best 1.0, mean 0.5
    assert corpus_score([a, b])["rouge1"] == pytest.approx(0.5)
    assert corpus_score([a, c], "best")["rouge1"] == pytest.approx(1.0)
    assert corpus_score([a, c], "mean")["rouge1"] == pytest.approx(0.75)
    assert corpus_score([a.to_dict(), c.to_dict()], "mean")["rouge1"] == pytest.approx(0.75)
    with pytest.raises(Exception, match="aggregation"):
        corpus_score([a], "median")


def test_score_files_text_and_jsonl(tmp_path):
    preds = tmp_path / "p.txt"
    preds.write_text("the cat sat\n\n")  # second prediction empty
    refs = tmp_path / "r.jsonl"
    refs.write_text(json.dumps({"summary1": "the cat sat", "summary2": "a dog"}) + "\n"
                    + json.dumps({"summary": "anything"}) + "\n")
    assert read_predictions(preds) == ["the cat sat", ""]
    assert read_references(refs) == [["the cat sat", "a dog"], ["anything"]]
    out = score_files(preds, refs)
    assert out.n == 2 and out.n_references == 2
    assert out.best["rouge1"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert out.mean["rouge1"] == pytest.approx(0.25)  # ((1 + 0) / 2 + 0) / 2
    assert out.mean_words == pytest.approx(1.5)
    jp = tmp_path / "p.jsonl"
    jp.write_text(json.dumps({"prediction": "x"}) + "\n" + json.dumps({"id": 3}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:2: missing field 'prediction'"):
        read_predictions(jp)


def test_score_files_count_mismatch(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    (tmp_path / "r.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"3 predictions .* 2 references"):
        score_files(tmp_path / "p.txt", tmp_path / "r.txt")


def test_rouge_cli(tmp_path, capsys):
    from lmlab.cli import main

    (tmp_path / "p.txt").write_text("the cat sat on the mat\n")
    (tmp_path / "r.txt").write_text("the cat lay on the mat\n")
    assert main(["rouge", str(tmp_path / "p.txt"), str(tmp_path / "r.txt")]) == 0
    out = capsys.readouterr().out
    assert "83.33" in out and "60.00" in out  # R1 = 5/6, R2 = 3/5 (see the hand-computed test)
    (tmp_path / "r2.txt").write_text("a\nb\n")
    assert main(["rouge", str(tmp_path / "p.txt"), str(tmp_path / "r2.txt")]) == 2
    assert "1 predictions" in capsys.readouterr().err


def test_format_table():
    text = format_scores_table([("exp", {m: 0.5 for m in METRICS})])
    assert "50.00" in text and "rougeLsum" in text


def test_is_looping():
    assert is_looping("#Person1# wants to buy a car. #Person1# wants to buy a car. #Person1# wants to buy a car.")
    assert is_looping("the the the the the")
    honest = ("#Person1# asks #Person2# about the new job. #Person2# says it pays well, and #Person1# "
              "congratulates #Person2#, so #Person1# invites #Person2# to dinner.")
    assert honest.count("#Person1#") == 3 and not is_looping(honest)
    assert not is_looping("") and not is_looping("a car a car")
