"""One outline for every training job: a job is a short build function handed to ``run_job``.

Pre-training, fine-tuning, alignment, distillation and reward training differ in what they load and
train; the steps around that are the same, and they live here once. ``run_job(spec, build)``::

    check     the training section's ranges                       (before anything is loaded)
    resume    read OUT/checkpoint.pt (--resume); refuse one made for another job (``spec.identity``)
    build     the job's own function: load models, read and tokenize all data, check that the result
              can be saved -> ``Built`` (a Job's parts and how to save). Nothing is written before it
              returns, so a bad file or setting fails fast and leaves no run directory behind.
    steps     ``train.epochs`` -> ``train.steps`` from the batches per epoch
    record    OUT/run_config.json
    fit       ``loop.fit``: the one loop (AdamW, checkpoints, exact resume, signals, best selection)
    save      OUT/final, and OUT/best when no evaluation chose one (``Built.save``, rank 0)
    finish    the job's own after-training step (e.g. alignment's final ROUGE), on every rank
    summary   OUT/summary.json; the ranks leave together

A build function may also return a dict instead of a ``Built``: the job stops there (distillation's
``--pseudo-only``) and that dict is the summary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lmlab.errors import ConfigError, choices_error
from lmlab.objectives.base import Objective
from lmlab.training import distributed as dist
from lmlab.training.loop import PRECISIONS, BatchSource, Job, check_identity, fit, read_resume_state


@dataclass
class JobSpec:
    """What ``run_job`` needs before a job is built."""

    out_dir: str | Path
    train: Any  # a TrainSection (a FinetuneSection when the job counts epochs)
    config: dict[str, Any]  # the resolved config, written to OUT/run_config.json
    identity: dict[str, Any]  # must match the checkpoint's on resume; checked before the build
    resume: bool = False
    show_progress: bool = True


@dataclass
class Built:
    """What a job's build function hands back: the loop's ``Job`` parts and how to save the result."""

    name: str  # progress bar and plot title
    model: nn.Module
    objective: Objective
    batches: BatchSource  # with ``batches_per_epoch`` when train.epochs sets the length
    save: Callable[[Path, dict | None], None] | None = None  # writes a result directory (OUT/best, OUT/final)
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    select: str | None = None
    patience: int | None = None
    trainable_only: bool = False
    identity: dict[str, Any] = field(default_factory=dict)  # what is only known once built (pre-training's model)
    announce: Callable[[], str] | None = None  # one line before training (rank 0), once train.steps is known
    finish: Callable[[dict, nn.Module], dict] | None = None  # (summary, wrapped model) -> more summary entries
    summary: dict[str, Any] = field(default_factory=dict)  # facts for summary.json (pairs, parameters, ...)


def check_schedule(t) -> None:
    """The ranges of a training section, one line naming the value."""
    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "ckpt_every"):
        value = getattr(t, name)
        if isinstance(value, float) and value.is_integer():  # "--set train.steps=1e3" reads as a float
            setattr(t, name, int(value))
    for name in ("batch_size", "grad_accum", "log_every"):
        value = getattr(t, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.{name}={value!r} must be an integer >= 1")
    if not t.lr > 0:
        raise ConfigError(f"train.lr={t.lr!r} must be > 0")
    epochs = getattr(t, "epochs", None)
    if epochs is not None and not epochs > 0:
        raise ConfigError(f"train.epochs={epochs!r} must be > 0")
    if epochs is None and not (isinstance(t.steps, int) and t.steps >= 1):
        raise ConfigError(f"train.steps={t.steps!r} must be an integer >= 1")
    if t.stop_after is not None and t.stop_after < 1:
        raise ConfigError(f"train.stop_after={t.stop_after!r} must be >= 1")
    if t.precision not in PRECISIONS:
        raise choices_error("train.precision", t.precision, PRECISIONS)


def run_job(spec: JobSpec, build: Callable[[dist.DistEnv], Built | dict]) -> dict:
    """Run (or resume) one training job: the outline in the module doc -> the summary dict."""
    t, out = spec.train, Path(spec.out_dir)
    check_schedule(t)
    with dist.session(t) as env:
        saved = read_resume_state(out, spec.resume)
        if saved is not None:
            check_identity(saved, spec.identity, out / "checkpoint.pt")
        built = build(env)
        if isinstance(built, dict):  # the job stopped before training (e.g. distillation's --pseudo-only)
            dist.barrier(env)
            return built
        if saved is not None and built.identity:
            check_identity(saved, built.identity, out / "checkpoint.pt")
        if getattr(t, "epochs", None) is not None:
            t.steps = max(1, math.ceil(t.epochs * built.batches.batches_per_epoch / t.grad_accum))
        if env.is_main:
            if spec.show_progress and built.announce is not None:
                print(built.announce())
            out.mkdir(parents=True, exist_ok=True)
            (out / "run_config.json").write_text(json.dumps(spec.config, indent=2, default=str) + "\n")

        best, final = out / "best", out / "final"
        save = built.save
        job = Job(name=built.name, model=built.model, objective=built.objective, batches=built.batches,
                  evaluate=built.evaluate, select=built.select if built.evaluate is not None else None,
                  on_best=(lambda step, metrics: save(best, metrics)) if save is not None else None,
                  patience=built.patience, trainable_only=built.trainable_only,
                  identity={**spec.identity, **built.identity})
        summary = fit(job, t, env, out, saved, spec.show_progress)
        wrapped = summary.pop("wrapped")
        if summary["finished"]:
            if save is not None and env.is_main:
                save(final, summary["metrics"] or None)
                if not best.exists():  # nothing was selected (no evaluation): the final weights are the best
                    save(best, None)
            if built.finish is not None:
                summary.update(built.finish(summary, wrapped))
        summary.update(built.summary)
        if save is not None:
            summary.update(best_dir=str(best), final_dir=str(final))
        if env.is_main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        dist.barrier(env)  # ranks leave together: one tearing down gloo while another still writes can abort it
        return summary
