"""training.job.run_job: the one outline every training job runs (check, resume, build, record, fit, save, summary)."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, ConfigError
from lmlab.model import Transformer
from lmlab.objectives.sft import SupervisedFineTuning
from lmlab.training.config import FinetuneSection
from lmlab.training.job import Built, JobSpec, run_job
from lmlab.training.sft_data import SFTBatches, Tokenized


def _train(**kw) -> FinetuneSection:
    base = dict(steps=3, batch_size=2, grad_accum=1, lr=1e-2, warmup_steps=0, eval_every=0, ckpt_every=0,
                log_every=1, precision="fp32", device="cpu")
    return FinetuneSection(**{**base, **kw})


def _builder(calls: list, *, evaluate: bool = False):
    """A build function over a tiny decoder and 5 (prompt, response) examples, recording what run_job calls."""
    def build(env) -> Built:
        calls.append("build")
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=40)).train()
        objective = SupervisedFineTuning("decoder", pad_token_id=0)
        examples = [Tokenized(f"e{i}", [3, 4, 5 + i], [6 + i, 1], False) for i in range(5)]
        batches = SFTBatches([(examples, 1.0)], objective, batch_size=2, seed=0, env=env)

        def save(directory, metrics=None):
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "saved.json").write_text(json.dumps({"metrics": metrics}))
            calls.append(f"save {directory.name}")

        return Built(name="test", model=model, objective=objective, batches=batches, save=save,
                     evaluate=(lambda m: {"score": 1.0}) if evaluate else None, select="score",
                     finish=lambda summary, wrapped: calls.append("finish") or {"extra": 7},
                     summary={"examples": len(examples)})
    return build


def test_a_job_trains_saves_final_and_best_and_writes_its_summary(tmp_path):
    calls: list = []
    out = tmp_path / "run"
    t = _train(steps=1, epochs=2.0)  # 5 examples in batches of 2: 3 batches per epoch -> 6 steps
    summary = run_job(JobSpec(out, t, {"what": "test"}, {"job": "a"}, show_progress=False), _builder(calls))
    assert t.steps == 6 and summary["step"] == 6 and summary["finished"]
    assert calls == ["build", "save final", "save best", "finish"]  # no evaluation: the final weights are the best
    assert json.loads((out / "run_config.json").read_text()) == {"what": "test"}
    written = json.loads((out / "summary.json").read_text())
    assert written["examples"] == 5 and written["extra"] == 7 and written["final_dir"] == str(out / "final")
    assert "wrapped" not in written


def test_an_evaluated_job_saves_best_when_selected_and_final_with_its_metrics(tmp_path):
    calls: list = []
    out = tmp_path / "run"
    run_job(JobSpec(out, _train(), {}, {}, show_progress=False), _builder(calls, evaluate=True))
    assert calls == ["build", "save best", "save final", "finish"]  # the final evaluation chose best first
    assert json.loads((out / "final" / "saved.json").read_text()) == {"metrics": {"score": 1.0}}


def test_nothing_is_written_when_the_build_fails(tmp_path):
    out = tmp_path / "run"

    def build(env):
        raise ConfigError("bad data")

    with pytest.raises(ConfigError, match="bad data"):
        run_job(JobSpec(out, _train(), {}, {}, show_progress=False), build)
    assert not out.exists()


def test_a_resume_of_another_job_is_refused_before_the_build(tmp_path):
    calls: list = []
    out = tmp_path / "run"
    run_job(JobSpec(out, _train(stop_after=1), {}, {"job": "a"}, show_progress=False), _builder(calls))
    calls.clear()
    with pytest.raises(CheckpointError, match="job was 'a', now 'b'"):
        run_job(JobSpec(out, _train(), {}, {"job": "b"}, resume=True, show_progress=False), _builder(calls))
    assert calls == []  # refused before anything was loaded
    summary = run_job(JobSpec(out, _train(), {}, {"job": "a"}, resume=True, show_progress=False), _builder(calls))
    assert summary["step"] == 3 and calls == ["build", "save final", "save best", "finish"]


def test_a_build_may_stop_the_job_with_its_own_summary(tmp_path):
    summary = run_job(JobSpec(tmp_path / "run", _train(), {}, {}, show_progress=False), lambda env: {"stopped": True})
    assert summary == {"stopped": True} and not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "train.batch_size=0 must be an integer >= 1"),
    ("lr", 0.0, "train.lr=0.0 must be > 0"),
    ("epochs", -1.0, "train.epochs=-1.0 must be > 0"),
    ("precision", "fp8", "train.precision"),
])
def test_the_training_section_is_checked_before_anything(tmp_path, field, value, message):
    def build(env):
        raise AssertionError("built")

    with pytest.raises(ConfigError, match=message):
        run_job(JobSpec(tmp_path / "run", _train(**{field: value}), {}, {}, show_progress=False), build)
