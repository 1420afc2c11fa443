"""Fail fast: a training job refuses a bad configuration before its first expensive step.

Each test makes that step explode if it is reached (loading the base model, the teacher, the fit loop),
checks the one-line error, that nothing was written (no run_config.json), and that it took under 5 s:
the issue's bound for "before hours of work" (the tiny model loads in well under a second).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import lmlab
from lmlab.cli import main
from lmlab.errors import ConfigError, DataError
from lmlab.tasks.summarize.data import load_dialogues
from lmlab.training import align as align_module
from lmlab.training import distill as distill_module
from lmlab.training import job as job_module
from lmlab.training.align import align, load_align_config
from lmlab.training.finetune import finetune, load_finetune_config

FAST = 5.0  # seconds


@pytest.fixture
def dialogues(tmp_path) -> Path:
    path = tmp_path / "dialogues.jsonl"
    path.write_text("".join(json.dumps({"fname": d.id, "dialogue": d.dialogue, "summary": d.references[0]}) + "\n"
                            for d in load_dialogues().records[:8]))
    return path


def _explode(what: str):
    def boom(*args, **kwargs):
        raise AssertionError(f"{what} was reached: the configuration should have been refused before it")
    return boom


def _fails_fast(fn, error, match):
    """Calls `fn`, which must raise `error` matching `match` within FAST seconds -> the exception."""
    start = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        fn()
    assert time.perf_counter() - start < FAST
    return info.value


# --- align ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("holdout", [0, 32])
def test_align_with_an_empty_preferences_file_names_the_file(tiny_model_dir, tmp_path, monkeypatch, holdout):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    monkeypatch.setattr(lmlab, "load_model", _explode("loading the base model"))
    cfg = load_align_config(None, [f"base_model={tiny_model_dir}", f"data.train={empty}", f"data.holdout={holdout}",
                                   f"out_dir={out}"])
    err = _fails_fast(lambda: align(cfg, show_progress=False), DataError, "empty.jsonl' holds no preference pairs")
    assert "holdout" not in str(err)  # the file is at fault, not data.holdout
    assert not out.exists()  # no run_config.json left behind


def test_align_with_a_missing_preferences_file_fails_before_anything_loads(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(align_module, "run_job", _explode("the job"))
    cfg = load_align_config(None, [f"base_model={tiny_model_dir}", f"data.train={tmp_path / 'nope.jsonl'}"])
    _fails_fast(lambda: align(cfg, show_progress=False), DataError,
                "data.train: preferences file .*nope.jsonl' does not exist")


# --- LoRA targets that PEFT's format cannot hold ---------------------------------------------------
def test_finetune_refuses_a_tied_lm_head_target_before_training(tiny_model_dir, dialogues, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(job_module, "fit", _explode("training"))
    cfg = load_finetune_config(None, [f"base_model={tiny_model_dir}", f"data.train=[{{path: {dialogues}}}]",
                                      "data.task=dialogsum", "lora.targets=[q, lm_head]", f"out_dir={out}",
                                      "train.steps=2", "eval.rouge_examples=0"])
    _fails_fast(lambda: finetune(cfg, show_progress=False), ConfigError,
                "LoRA layer 'lm_head' cannot be saved in PEFT format")
    assert not (out / "run_config.json").exists()


def test_align_refuses_a_tied_lm_head_target_before_training(tiny_model_dir, dialogues, tmp_path, monkeypatch):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"#Person1#: hi {i}", "chosen": "A greets B.",
                                         "rejected": "#Person1#: hi"}) + "\n" for i in range(4)))
    monkeypatch.setattr(job_module, "fit", _explode("training"))
    cfg = load_align_config(None, [f"base_model={tiny_model_dir}", f"data.train={prefs}", "data.holdout=0",
                                   "lora.targets=[q, lm_head]", f"out_dir={tmp_path / 'run'}"])
    _fails_fast(lambda: align(cfg, show_progress=False), ConfigError, "'lm_head' cannot be saved in PEFT format")
    assert not (tmp_path / "run" / "run_config.json").exists()


# --- distill ---------------------------------------------------------------------------------------
def test_distill_keep_layers_out_of_range_fails_before_the_teacher_loads(tiny_model_dir, dialogues, tmp_path,
                                                                         monkeypatch, capsys):
    monkeypatch.setattr(distill_module, "load_teacher", _explode("loading the teacher"))
    monkeypatch.setattr(distill_module, "generate_pseudo_labels", _explode("the teacher's labelling"))
    out = tmp_path / "run"
    start = time.perf_counter()
    code = main(["distill", "--teacher", str(tiny_model_dir), "--no-teacher-adapter", "--data", str(dialogues),
                 "--no-holdout", "--keep-layers", "9", "--out", str(out), "--no-progress"])
    assert time.perf_counter() - start < FAST
    err = capsys.readouterr().err
    assert code == 2
    assert "student.keep_layers='9': layer 9 does not exist; the model has layers 0..1" in err
    assert "9.0" not in err
    assert not out.exists()


def test_distill_a_student_of_another_vocabulary_fails_before_the_teacher_loads(tiny_model_dir, dialogues, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(distill_module, "load_teacher", _explode("loading the teacher"))
    cfg = distill_module.load_distill_config(None, [
        f"teacher={tiny_model_dir}", "teacher_adapter=null", f"data.train=[{{path: {dialogues}}}]", "data.holdout=null",
        "student.model=tiny-decoder", f"out_dir={tmp_path / 'run'}"])
    _fails_fast(lambda: distill_module.distill(cfg, show_progress=False), ConfigError,
                "student 'tiny-decoder' has a vocabulary of")


# --- lab -------------------------------------------------------------------------------------------
def test_lab_with_an_empty_data_file_says_it_has_no_dialogues(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    start = time.perf_counter()
    assert main(["lab", "--data", str(empty), "--out", str(tmp_path / "lab")]) == 2
    assert time.perf_counter() - start < FAST
    err = capsys.readouterr().err
    assert "empty.jsonl holds no dialogues" in err and "--pool-size" not in err
    assert not (tmp_path / "lab").exists()
