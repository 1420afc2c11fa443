"""lmlab lab's report.html shades each fine-tuned row's dialogue turns by its summary's attention (on by default;
--no-turns leaves it out)."""

from __future__ import annotations

import re
import shutil

import pytest

import lmlab
from lmlab.adapt.recipe import Recipe
from lmlab.inspect import turns as turns_module
from lmlab.tasks.summarize.data import load_dialogues
from lmlab.tasks.summarize.experiments import INSTRUCTION
from lmlab.tasks.summarize.lab import TURNS, LabSettings, run_lab

QUIET = {"echo": lambda text: None, "progress": False}


@pytest.fixture
def tuned_dir(tiny_model_dir, tmp_path):
    """The tiny model as a "fully fine-tuned" model: its recipe beside the weights makes it the finetuned experiment's."""
    path = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, path)
    Recipe(template="instruction", instruction=INSTRUCTION, chat=False, prompt_field="dialogue",
           response_field="summary").save(path)
    return path


def test_lab_turns_shade_the_fine_tuned_rows_and_are_reused(tuned_dir, tmp_path, monkeypatch):
    out = tmp_path / "lab"
    settings = LabSettings(model=str(tuned_dir), experiments="zero-shot-instruction,finetuned", limit=3,
                           max_new_tokens=8, precision="fp32", out=out)
    assert settings.turns  # the default
    result = run_lab(settings, **QUIET)
    assert "turn shading: 3 fine-tuned row(s)" in result.text
    page = (out / "report.html").read_text()
    assert page.count("turns</td>") == 3  # one shaded block per fine-tuned row, none for zero-shot-instruction
    # the shares are turn_attention's on the row's own prompt + summary, with the fine-tuned model
    model, tok = lmlab.load_model(tuned_dir), lmlab.load_tokenizer(tuned_dir)
    dialogues = {d.id: d.dialogue for d in load_dialogues().records}
    for row in result.rows:
        if row["experiment"] != "finetuned":
            continue
        if not row["summary"].strip():
            assert "no turn shading" in page
            continue
        want = turns_module.turn_attention(model, tok, row["prompt"], row["summary"], dialogues[row["id"]])
        for share in want["share"]:
            assert f"data-share='{share:.4f}'" in page
    assert len((out / TURNS).read_text().splitlines()) == 3

    # a resumed run reuses turns.jsonl: no recorded pass at all
    def fail(*args, **kwargs):
        raise AssertionError("turn_attention ran again")

    monkeypatch.setattr(turns_module, "turn_attention", fail)
    again = run_lab(settings, **QUIET)
    shares = lambda text: re.findall(r"data-share='([0-9.]+)'", text)  # noqa: E731
    assert again.new_rows == 0 and shares((out / "report.html").read_text()) == shares(page) != []

    # without --turns: the same report, no shading
    plain = run_lab(LabSettings(**{**settings.__dict__, "turns": False}), **QUIET)
    assert "turn shading" not in plain.text and "class='turn'" not in (out / "report.html").read_text()


def test_lab_without_fine_tuned_rows_skips_turn_shading_and_the_flag_turns_it_off(tiny_model_dir, tmp_path):
    import argparse

    from lmlab.commands.lab import add_arguments

    result = run_lab(LabSettings(model=str(tiny_model_dir), experiments="zero-shot-instruction", limit=2,
                                 max_new_tokens=4, out=tmp_path / "lab"), **QUIET)
    assert "turn shading" not in result.text and (tmp_path / "lab" / "report.html").exists()
    assert not (tmp_path / "lab" / TURNS).exists()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).turns and not parser.parse_args(["--no-turns"]).turns
