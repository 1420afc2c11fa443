"""Minimum Bayes risk selection: the consensus sample is kept, in best-of-n, the lab and summarize."""

from __future__ import annotations

import pytest

from lmlab.align.mbr import MBRScorer
from lmlab.cli import main
from lmlab.errors import ConfigError


def test_the_consensus_candidate_wins_and_an_outlier_loses():
    candidates = [
        "#Person1# asks the way to the station and #Person2# says two blocks north.",
        "The cat sat on the mat all day long.",  # the outlier: shares almost nothing with the others
        "#Person1# asks #Person2# the way to the station. It is two blocks north.",
        "#Person1# asks the way to the station; #Person2# says it is two blocks north.",
    ]
    scores = MBRScorer().score_candidates("dialogue", candidates)
    assert len(scores) == 4
    assert scores.index(min(scores)) == 1
    assert scores.index(max(scores)) in (0, 3)
    # each score is the mean utility against the other three (by hand, with the pairwise utility)
    u = MBRScorer()
    for i, c in enumerate(candidates):
        expected = sum(u.pair(c, d) for j, d in enumerate(candidates) if j != i) / 3
        assert scores[i] == pytest.approx(expected)


def test_repeated_and_empty_candidates():
    scorer = MBRScorer("rouge1")
    scores = scorer.score_candidates("x", ["a b c", "a b c", "d e f", ""])
    # the text written twice agrees fully with its copy: (1 + 0 + 0) / 3
    assert scores[0] == scores[1] == pytest.approx(1 / 3)
    assert scores[3] == 0.0  # empty agrees with nothing
    assert scorer.score_candidates("x", ["only one"]) == [0.0]
    assert MBRScorer("rougeL").pair("a b c d", "a c") == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    with pytest.raises(ConfigError, match="'bleu'"):
        MBRScorer("bleu")


def test_best_of_n_with_mbr_keeps_the_highest_expected_rouge(tiny_model_dir):
    import lmlab
    from lmlab.align.best_of_n import best_of_n
    from lmlab.generation import GenerationConfig

    policy, tokenizer = lmlab.load_model(tiny_model_dir), lmlab.load_tokenizer(tiny_model_dir)
    config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.0)
    dialogue = "#Person1#: Where is the station?\n#Person2#: Two blocks north."
    picked = best_of_n(policy, tokenizer, ["Summarize:\n" + dialogue], [dialogue], 5, config, MBRScorer(),
                       seeds=[5])[0]
    expected = MBRScorer().score_candidates(dialogue, picked.candidates)
    assert picked.scores == pytest.approx(expected)
    assert picked.index == max(range(5), key=lambda k: (expected[k], -k))
    assert picked.text == picked.candidates[picked.index]


def test_lab_mbr_experiment_needs_no_reward_model(tiny_model_dir, tmp_path):
    from lmlab.tasks.summarize.experiments import EXPERIMENTS, spec_hash
    from lmlab.tasks.summarize.lab import LabSettings, run_lab
    import lmlab
    import torch
    from lmlab.adapt.lora import LoraConfig, apply_lora
    from lmlab.adapt.peft import save_adapter

    model = lmlab.load_model(tiny_model_dir)  # an adapter with large random weights: samples that differ
    lora = LoraConfig(r=2, alpha=4, targets=("q", "v", "up", "down"))
    apply_lora(model, lora)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=3.0)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, lora, base_model=str(tiny_model_dir))
    result = run_lab(LabSettings(model=str(tiny_model_dir), limit=2, max_new_tokens=5, adapter=adapter, batch_size=2,
                                 experiments="finetuned-mbr-8", out=tmp_path / "lab"), echo=lambda t: None,
                     progress=False)
    rows = [r for r in result.rows if r["experiment"] == "finetuned-mbr-8"]
    assert len(rows) == 2
    for row in rows:
        cands = row["candidates"]
        assert len(cands) == 8 and "reward" not in row
        expected = MBRScorer().score_candidates("", [c["summary"] for c in cands])
        assert [c["mbr"] for c in cands] == pytest.approx(expected)
        best = max(range(8), key=lambda k: (expected[k], -k))
        assert row["summary"] == cands[best]["summary"]
    # the selection method is part of the rows' identity; reward experiments keep their old hash
    assert spec_hash(EXPERIMENTS["finetuned-mbr-8"], "a", "r1") == spec_hash(EXPERIMENTS["finetuned-mbr-8"], "a", "r2")
    assert EXPERIMENTS["finetuned-best-of-4"].select == "reward"


def test_summarize_mbr_cli(tiny_model_dir, capsys):
    dialogue = "#Person1#: Where is the station?\n#Person2#: Two blocks north."
    argv = ["summarize", dialogue, "--model", str(tiny_model_dir), "--no-adapter", "--max-new-tokens", "5"]
    assert main(argv + ["--best-of", "4", "--mbr", "--do-sample", "--seed", "2"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line[2:].startswith("mbr ")]
    assert len(lines) == 4
    scores = [float(line[2:].split()[1]) for line in lines]
    starred = [k for k, line in enumerate(lines) if line[0] == "*"]
    assert len(starred) == 1 and scores[starred[0]] == max(scores)
    for extra, message in [(["--best-of", "3", "--do-sample"], "or --mbr"),
                           (["--mbr", "--do-sample"], "--mbr picks among --best-of N samples; N is 1"),
                           (["--best-of", "3", "--mbr"], "--best-of 3 needs --do-sample"),
                           (["--best-of", "3", "--mbr", "--reward", "x", "--do-sample"], "choose one")]:
        assert main(argv + extra) == 2
        assert message in capsys.readouterr().err
