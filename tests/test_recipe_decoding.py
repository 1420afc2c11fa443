"""Decoding settings of a fine-tune: Recipe.generation, the lab's --num-beams & co. (and its spec hash), and
lmlab summarize applying the recipe's decoding for flags not given."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from lmlab.adapt.recipe import RECIPE_FILE, Recipe
from lmlab.cli import main
from lmlab.commands.summarize import recipe_decoding
from lmlab.errors import ConfigError
from lmlab.generation import GenerationConfig
from lmlab.tasks.summarize import lab as lab_mod
from lmlab.tasks.summarize.experiments import EXPERIMENTS, INSTRUCTION, spec_hash
from lmlab.tasks.summarize.lab import LabSettings, run_lab

QUIET = {"echo": lambda text: None, "progress": False}


def recipe(**generation) -> Recipe:
    return Recipe(template="instruction", instruction=INSTRUCTION, chat=False, prompt_field="dialogue",
                  response_field="summary", generation=generation)


# --- the recipe ----------------------------------------------------------------------------------
def test_recipe_generation_round_trip_and_old_files(tmp_path):
    recipe(num_beams=4, length_penalty=0.6).save(tmp_path)
    assert Recipe.load(tmp_path).generation == {"num_beams": 4, "length_penalty": 0.6}
    old = json.loads((tmp_path / RECIPE_FILE).read_text())
    del old["generation"]  # written before decoding settings existed
    (tmp_path / RECIPE_FILE).write_text(json.dumps(old))
    loaded = Recipe.load(tmp_path)
    assert loaded.generation == {} and loaded.template == "instruction"
    assert Recipe.load(tmp_path / "nowhere") is None


@pytest.mark.parametrize("change, message", [
    ({"temperature_schedule": 1}, r"unknown recipe field\(s\) temperature_schedule"),
    ({"generation": {"num_beam": 4}}, r"generation: num_beam are not decoding settings"),
    ({"generation": {"num_beams": 0}}, r"num_beams=0 must be an integer >= 1"),
])
def test_bad_recipe_files_name_the_bad_field(tmp_path, change, message):
    recipe().save(tmp_path)
    data = {**json.loads((tmp_path / RECIPE_FILE).read_text()), **change}
    (tmp_path / RECIPE_FILE).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        Recipe.load(tmp_path)


def test_generation_config_precedence():
    base = GenerationConfig(max_new_tokens=20)
    r = recipe(num_beams=4, length_penalty=0.6)
    c = r.generation_config(base, num_beams=2, length_penalty=None)
    assert (c.num_beams, c.length_penalty, c.max_new_tokens) == (2, 0.6, 20)  # override > recipe > base
    c = r.generation_config(base)
    assert (c.num_beams, c.length_penalty) == (4, 0.6)
    assert recipe().generation_config(base) is base
    assert recipe().generation_config(base, num_beams=None) is base


# --- lmlab summarize -----------------------------------------------------------------------------
def args(**given) -> argparse.Namespace:
    flags = {"num_beams": None, "length_penalty": None, "no_repeat_ngram_size": None, "min_new_tokens": None}
    return argparse.Namespace(**{**flags, **given})


def test_summarize_applies_the_recipe_for_flags_not_given(capsys):
    r = recipe(num_beams=4, length_penalty=0.6, no_repeat_ngram_size=3)
    c = recipe_decoding(GenerationConfig(max_new_tokens=30), r, args())
    assert (c.num_beams, c.length_penalty, c.no_repeat_ngram_size, c.max_new_tokens) == (4, 0.6, 3, 30)
    assert "decoding from the recipe: --num-beams 4" in capsys.readouterr().err
    # a flag given on the command line wins over the recipe
    c = recipe_decoding(GenerationConfig(num_beams=2), r, args(num_beams=2))
    assert (c.num_beams, c.length_penalty, c.no_repeat_ngram_size) == (2, 0.6, 3)
    # a sampled request keeps its own decoding (beams and sampling do not mix)
    sampled = GenerationConfig(do_sample=True, temperature=0.7)
    assert recipe_decoding(sampled, r, args(do_sample=True)) is sampled
    assert recipe_decoding(GenerationConfig(), None, args()).num_beams == 1


@pytest.fixture
def beam_model(tiny_model_dir, tmp_path):
    """The tiny model as a fully fine-tuned model whose recipe decodes with 2 beams."""
    path = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, path)
    recipe(num_beams=2, no_repeat_ngram_size=3).save(path)
    return path


def test_summarize_end_to_end_decodes_as_the_recipe_says(beam_model, capsys, monkeypatch):
    import lmlab.prompting as prompting

    seen = []
    real = prompting.summarize

    def spy(*a, **kw):
        seen.append(kw.get("config"))
        return real(*a, **kw)

    monkeypatch.setattr(prompting, "summarize", spy)
    dialogue = "#Person1#: Hi, how are you?\n#Person2#: Fine, thanks."
    assert main(["summarize", dialogue, "--model", str(beam_model), "--max-new-tokens", "4"]) == 0
    assert "decoding from the recipe: --num-beams 2, --no-repeat-ngram-size 3" in capsys.readouterr().err
    assert (seen[0].num_beams, seen[0].no_repeat_ngram_size) == (2, 3)
    assert main(["summarize", dialogue, "--model", str(beam_model), "--max-new-tokens", "4", "--do-sample"]) == 0
    assert "decoding from the recipe" not in capsys.readouterr().err
    assert seen[1].do_sample and seen[1].num_beams == 1


# --- the lab -------------------------------------------------------------------------------------
@pytest.fixture
def configs(monkeypatch) -> list:
    """The GenerationConfig of every batched generate call the lab makes."""
    seen = []
    real = lab_mod._generate

    def capture(model, tokenizer, prompts, config):
        seen.append(config)
        return real(model, tokenizer, prompts, config)

    monkeypatch.setattr(lab_mod, "_generate", capture)
    return seen


def settings(model, out, **kw) -> LabSettings:
    return LabSettings(model=str(model), experiments="finetuned,zero-shot-instruction", limit=2, batch_size=2,
                       max_new_tokens=4, precision="fp32", out=out, examples=0, turns=False, device="cpu", **kw)


def test_lab_finetuned_rows_decode_as_the_recipe_says(beam_model, tmp_path, configs):
    out = tmp_path / "lab"
    run_lab(settings(beam_model, out), **QUIET)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["experiment"] for r in rows} == {"finetuned", "zero-shot-instruction"}
    by_beams = sorted((c.num_beams, c.no_repeat_ngram_size) for c in configs)
    assert by_beams == [(1, 0), (2, 3)]  # zero-shot: greedy; finetuned: the recipe's 2 beams
    # --num-beams on top of the recipe: a different decoding, so finetuned rows from before are refused
    with pytest.raises(ConfigError, match="earlier definition"):
        run_lab(settings(beam_model, out, decoding={"num_beams": 3}), **QUIET)
    configs.clear()
    run_lab(settings(beam_model, tmp_path / "lab3", decoding={"num_beams": 3}), **QUIET)
    assert sorted((c.num_beams, c.no_repeat_ngram_size) for c in configs) == [(1, 0), (3, 3)]


def test_spec_hash_without_decoding_is_unchanged():
    e = EXPERIMENTS["finetuned"]
    assert spec_hash(e, "ad1") == spec_hash(e, "ad1", decoding=None) == spec_hash(e, "ad1", decoding={})
    assert spec_hash(e, "ad1", decoding={"num_beams": 2}) != spec_hash(e, "ad1")
    assert spec_hash(e, "ad1", decoding={"num_beams": 2}) != spec_hash(e, "ad1", decoding={"num_beams": 4})
    assert lab_mod._uses_recipe_decoding(e) and not lab_mod._uses_recipe_decoding(EXPERIMENTS["one-shot"])
    assert lab_mod._decoding(recipe(num_beams=4), {"num_beams": 2, "length_penalty": None}) == {"num_beams": 2}
    assert lab_mod._decoding(None, None) == {}


@pytest.mark.parametrize("argv, message", [
    (["--num-beams", "0"], "num_beams=0 must be an integer >= 1"),
    (["--device", "cuda"], "--device cuda: torch sees no CUDA GPU"),
])
def test_lab_bad_decoding_or_device_fails_before_the_model_loads(beam_model, tmp_path, capsys, monkeypatch,
                                                                 argv, message):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    monkeypatch.setattr(lab_mod, "load_model", lambda *a, **k: pytest.fail("the model loaded"), raising=False)
    import lmlab.checkpoints

    monkeypatch.setattr(lmlab.checkpoints, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    rc = main(["lab", "--model", str(beam_model), "--experiments", "finetuned", "--limit", "1",
               "--out", str(tmp_path / "o")] + argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_lab_runs_on_device_cpu(tiny_model_dir, tmp_path):
    out = tmp_path / "cpu"
    assert main(["lab", "--model", str(tiny_model_dir), "--experiments", "zero-shot-bare", "--limit", "1",
                 "--max-new-tokens", "3", "--device", "cpu", "--no-turns", "--examples", "0", "--out", str(out)]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
