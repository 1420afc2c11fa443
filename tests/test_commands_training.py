"""The training commands' shared plumbing: flags -> config overrides, and how an unfinished run exits."""

from __future__ import annotations

import argparse

import pytest

from lmlab.commands._training import flag_overrides, unfinished_exit

FLAGS = {"epochs": "train.epochs", "steps": "train.steps", "lr": "train.lr", "out": "out_dir"}


def test_flags_override_after_set_and_steps_clear_the_default_epochs():
    args = argparse.Namespace(set=["train.lr=0.1"], epochs=None, steps=7, lr=0.001, out="runs/x")
    assert flag_overrides(args, FLAGS) == ["train.lr=0.1", "train.steps=7", "train.lr=0.001", 'out_dir="runs/x"',
                                           "train.epochs=null"]
    both = argparse.Namespace(set=[], epochs=2.0, steps=7, lr=None, out=None)
    assert flag_overrides(both, FLAGS) == ["train.epochs=2.0", "train.steps=7"]  # --epochs decides
    no_epochs_flag = argparse.Namespace(set=[], steps=7)
    assert flag_overrides(no_epochs_flag, {"steps": "train.steps"}) == ["train.steps=7"]


def test_unfinished_runs_exit_with_their_reason(capsys):
    done = {"rank": 0, "interrupted": None, "finished": True, "step": 9, "checkpoint": "c"}
    assert unfinished_exit(done) is None
    assert unfinished_exit({**done, "interrupted": 15}) == 128 + 15
    assert "interrupted at step 9; checkpoint saved to c (continue with --resume)" in capsys.readouterr().out
    assert unfinished_exit({**done, "finished": False}) == 0
    assert "stopped at step 9" in capsys.readouterr().out
    assert unfinished_exit({**done, "rank": 1, "interrupted": 2}) == 130
    assert unfinished_exit({**done, "rank": 1, "finished": False}) == 0 and capsys.readouterr().out == ""


def test_data_source_reads_a_file_a_record_range_and_a_weight():
    from lmlab.commands._training import data_source
    from lmlab.errors import ConfigError

    assert data_source("dev.jsonl") == {"path": "dev.jsonl", "records": None}
    assert data_source("dev.jsonl:0:400") == {"path": "dev.jsonl", "records": "0:400"}
    assert data_source("C:/data/dev.jsonl:400:@0.5") == {"path": "C:/data/dev.jsonl", "records": "400:", "weight": 0.5}
    with pytest.raises(ConfigError, match=r"'dev.jsonl@half': the weight after @ must be a number"):
        data_source("dev.jsonl@half")
