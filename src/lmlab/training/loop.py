"""The one training loop. Pre-training, fine-tuning (full or LoRA) and every later objective run here.

A job describes *what* to train as a ``Job``: the model, an objective (a batch transform + a loss), a
resumable source of batches, and how to evaluate. ``fit(job, settings, ...)`` owns *how*: AdamW with
warm-up + cosine, gradient accumulation, clipping, mixed precision, DDP/FSDP, progress, metrics,
atomic checkpoints, exact resume, SIGINT/SIGTERM, best-checkpoint selection and early stopping.
It reads top to bottom as the steps of a run::

    setup      optimizer, schedule, restore a checkpoint            (``_setup``)
    step       accumulate micro-batches -> clip -> AdamW -> schedule (``_train_step``)
    log        loss, lr, tokens/s, MFU to the bar and metrics.jsonl (``_log_step``)
    evaluate   the job's metrics; keep the best; early stopping     (``_evaluate``)
    checkpoint model + optimizer + schedule + data + RNG, atomically (``_checkpoint``)

Per optimizer step the job's batch source yields `grad_accum` micro-batches for this rank (prepared
with generators seeded from seed/step/micro-step/rank, so no hidden RNG state needs saving). Each
micro-batch's mean loss is scaled by its share of the step's counted tokens *over all ranks*, so the
gradient is the token-mean over the whole global batch whatever the accumulation or world size. (What
counts is the objective's ``count(batch)``: labelled tokens, or pairs for DPO, whose loss is a mean
over pairs; its ``train_metrics()`` are logged beside the loss.)

A checkpoint (``OUT/checkpoint.pt``) holds the loop's counters, the optimizer, schedule, batch-source
and RNG states and either the whole model or, for jobs that train only some parameters (LoRA), just
those. Resuming restores all of it, so an interrupted run (even by SIGKILL) continues exactly.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmlab.errors import CheckpointError, ConfigError, LmlabError
from lmlab.objectives.base import IGNORE_INDEX, Objective
from lmlab.training import distributed as dist
from lmlab.training.state import (CHECKPOINT_FORMAT, load_checkpoint, restore_rank_rng_state, save_checkpoint,
                                       seed_rank_stream)
from lmlab.training.metrics import (MetricsLog, matmul_params, measure_peak_flops, model_flops_utilization,
                                    plot_loss_curve, training_matmul_shapes)
from lmlab.training.optim import build_optimizer, build_scheduler

PRECISIONS = ("auto", "fp32", "bf16")


class TrainingError(LmlabError):
    """Training cannot go on (e.g. the loss became NaN/inf)."""


# --- what a job plugs in ---------------------------------------------------------------------
class BatchSource(Protocol):
    """Yields this rank's micro-batches, step by step, and can be saved and restored exactly."""

    def next_micro_batches(self, step: int, n: int) -> list[dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Job:
    """Everything a training job hands the loop; the loop knows nothing else about it.

    ``evaluate(model) -> {"val_loss": ..., ...}`` is called in eval mode under no_grad (and on every
    rank: it must all-reduce what it measures). With ``select`` set (a metric name, ``"-name"`` when
    lower is better), each evaluation that improves it calls ``on_best(step, metrics)`` on rank 0,
    and ``patience`` evaluations without improvement stop the run early.
    """

    name: str  # progress bar and plot title
    model: nn.Module  # the unwrapped model
    objective: Objective
    batches: BatchSource
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    select: str | None = None
    on_best: Callable[[int, dict[str, float]], None] | None = None
    patience: int | None = None
    trainable_only: bool = False  # checkpoint only the parameters that train (LoRA), not the frozen base
    identity: dict[str, Any] = field(default_factory=dict)  # must match on resume (e.g. the model config)


@dataclass
class LoopState:
    """The loop's own counters, saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    best_score: float | None = None  # of job.select, as stored (higher is better after the sign flip)
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: bool = False


@dataclass
class _Run:
    """What ``_setup`` builds for one call of ``fit``."""

    job: Job
    settings: Any  # a TrainSection
    env: dist.DistEnv
    out: Path
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: LoopState
    autocast_dtype: torch.dtype | None
    peak_flops: float | None  # measured at the first log, once the micro-batch shape is known
    flop_params: int
    log: MetricsLog | None
    sharded: bool
    last: dict = field(default_factory=dict)  # the latest logged train metrics
    micro_tokens: int = 0  # input positions in one micro-batch on this rank (for the peak's matmul shapes)
    metrics: dict = field(default_factory=dict)  # the latest evaluation


# --- helpers ---------------------------------------------------------------------------------
def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for precision `name`, or None for plain fp32 (see ``lmlab.precision``)."""
    if name not in PRECISIONS:
        raise ConfigError(f"train.precision={name!r} is not valid; choose one of: {', '.join(PRECISIONS)}")
    from lmlab.precision import resolve_precision

    dtype = resolve_precision(name, device)
    return None if dtype == torch.float32 else dtype



def _counted(objective, batch: dict[str, torch.Tensor]) -> int:
    """What the objective's mean loss averages over in `batch` (labelled tokens; pairs for DPO)."""
    count = getattr(objective, "count", None)
    return int(count(batch)) if count is not None else int((batch["labels"] != IGNORE_INDEX).sum())


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _Signals:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (then it saves and returns)."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def read_resume_state(out: Path, resume: bool) -> dict | None:
    """The checkpoint to resume from (read early, so a bad file fails before any work), or None."""
    path = out / "checkpoint.pt"
    if path.exists() and not resume:
        raise ConfigError(f"{str(out)!r} already holds a checkpoint; pass --resume to continue it or choose another out_dir")
    if resume and not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {str(path)!r}")
    if not resume:
        return None
    state = load_checkpoint(path)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {state.get('format')!r}; this lmlab reads format "
                              f"{CHECKPOINT_FORMAT}: start the run again in a new out_dir")
    return state


def check_identity(state: dict, identity: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint made for another model or job (names what differs)."""
    saved = state.get("identity", {})
    for key, value in identity.items():
        if saved.get(key) == value:
            continue
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            diff = sorted(k for k in set(value) | set(old) if value.get(k) != old.get(k))
            what = f"{key} differs in: {', '.join(diff)}"
        else:
            what = f"{key} was {old!r}, now {value!r}"
        raise CheckpointError(f"checkpoint {str(path)!r} was made for another model or job ({what}); it cannot be "
                              f"resumed with this config: use the original config or a new out_dir")


# --- the loop --------------------------------------------------------------------------------
def fit(job: Job, settings, env: dist.DistEnv, out: Path, resume_state: dict | None = None,
        show_progress: bool = True) -> dict:
    """Train `job` for ``settings.steps`` optimizer steps (``settings`` a TrainSection) -> summary dict."""
    from tqdm.auto import tqdm

    from lmlab.precision import describe_precision

    run = _setup(job, settings, env, out, resume_state)
    t, state = settings, run.state
    if show_progress and env.is_main:
        tqdm.write(f"{job.name}: precision {describe_precision(t.precision, env.device)}, "
                   f"{sum(p.numel() for p in job.model.parameters() if p.requires_grad):,} trainable parameters")
    stop_at = t.steps if t.stop_after is None else min(t.steps, state.step + t.stop_after)
    bar = tqdm(total=t.steps, initial=state.step, desc=job.name, unit="step",
               disable=not (show_progress and env.is_main), dynamic_ncols=True)
    window = {"tokens": 0, "time": 0.0}
    interrupted = None
    with _Signals() as signals:
        while state.step < stop_at and not state.stopped_early:
            tokens, seconds, loss, lr, grad_norm = _train_step(run)
            state.step += 1
            state.tokens_seen += tokens
            window["tokens"] += tokens
            window["time"] += seconds
            if state.step % t.log_every == 0 or state.step == stop_at:
                _log_step(run, bar, loss, lr, grad_norm, window["tokens"] / window["time"])
                window = {"tokens": 0, "time": 0.0}
            bar.update(1)
            if t.eval_every and state.step % t.eval_every == 0 and state.step < t.steps:
                _evaluate(run, bar)
            if t.ckpt_every and state.step % t.ckpt_every == 0 and state.step < stop_at:
                _checkpoint(run)
            if signals.received is not None:
                interrupted = signals.received
                break
    bar.close()
    finished = state.step >= t.steps or state.stopped_early
    if finished and not state.stopped_early:
        _evaluate(run, None)  # the final evaluation (an early stop has just evaluated)
    _checkpoint(run)
    _plot(run)
    return {"step": state.step, "finished": finished, "interrupted": interrupted,
            "stopped_early": state.stopped_early, "train_loss": run.last.get("loss"),
            "val_loss": run.metrics.get("val_loss"), "metrics": dict(run.metrics),
            "best_step": state.best_step, "best_score": _unsigned(job.select, state.best_score),
            "tokens_seen": state.tokens_seen, "tokens_per_s": run.last.get("tokens_per_s"),
            "mfu": run.last.get("mfu"), "peak_flops": run.peak_flops, "out_dir": str(out),
            "checkpoint": str(out / "checkpoint.pt"), "rank": env.rank, "world_size": env.world_size,
            "wrapped": run.wrapped}


# --- setup -----------------------------------------------------------------------------------
def _setup(job: Job, t, env: dist.DistEnv, out: Path, resume_state: dict | None) -> _Run:
    """Wrap the model for DDP/FSDP, build AdamW + schedule over the trainable parameters, restore state."""
    model = job.model
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"job {job.name!r} has no trainable parameters")
    flop_params = _flop_params(model)
    # wrap first: FSDP2 replaces the parameters by sharded ones, and the optimizer must hold those
    wrapped = dist.wrap(model, env)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2))
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
    state = LoopState()
    sharded = bool(getattr(t, "sharded_checkpoint", False)) and env.mode == "fsdp"
    # the weights are initialised alike on every rank; from here on each rank draws its own dropout masks
    seed_rank_stream(t.seed, env.rank)
    if resume_state is not None:
        _restore(resume_state, job, wrapped, optimizer, scheduler, state, env, out, t.seed)
    dtype = autocast_dtype(t.precision, env.device)
    log = MetricsLog(out / "metrics.jsonl", fresh=resume_state is None) if env.is_main else None
    if log is not None and resume_state is not None:
        log.truncate(state.step)  # a killed run logged steps after its last checkpoint: they will run again
    return _Run(job, t, env, out, wrapped, optimizer, scheduler, state, dtype, None, flop_params, log, sharded)


def _flop_core(model: nn.Module) -> nn.Module | None:
    """The lmlab Transformer whose matmuls a step runs: the model, or the backbone of a wrapper such as
    the reward model (backbone + scalar head), which has no ``config`` of its own."""
    for candidate in (model, getattr(model, "backbone", None)):
        if candidate is not None and hasattr(candidate, "config") and hasattr(candidate, "num_parameters"):
            return candidate
    return None


def _flop_params(model: nn.Module) -> int:
    """Matmul parameters for MFU: the Transformer's (embedding look-up tables excluded) plus a wrapper's own
    layers; without a Transformer inside, every parameter."""
    core = _flop_core(model)
    if core is None:
        return sum(p.numel() for p in model.parameters())
    own = {id(p) for p in core.parameters()}
    return matmul_params(core) + sum(p.numel() for p in model.parameters() if id(p) not in own)


def _restore(saved: dict, job: Job, wrapped, optimizer, scheduler, state: LoopState, env, out: Path,
             seed: int) -> None:
    if "sharded" in saved:
        if env.mode != "fsdp":
            raise CheckpointError(f"{str(out / 'checkpoint.pt')!r} points to a sharded (DCP) checkpoint; resume it "
                                  f"with --distributed fsdp")
        dist.load_sharded(wrapped, optimizer, out / "checkpoint_dcp" / saved["sharded"])
    else:
        if job.trainable_only:
            _load_trainable(job.model, saved["model"])
        else:
            dist.load_model_state(wrapped, saved["model"], env)
        dist.load_optimizer_state(wrapped, optimizer, saved["optimizer"], env)
    scheduler.load_state_dict(saved["scheduler"])
    job.batches.load_state_dict(saved["data"])
    for key, value in saved["loop"].items():
        setattr(state, key, value)
    if not restore_rank_rng_state(saved["rng"], env.rank, env.world_size, seed, state.step) and env.is_main:
        warnings.warn(f"the checkpoint holds the random states of {len(saved['rng'])} rank(s), this run has "
                      f"{env.world_size}: each rank starts a fresh stream, so dropout differs from an "
                      f"uninterrupted run", stacklevel=2)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(saved):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise CheckpointError(f"the checkpoint's trainable parameters do not match the model "
                              f"(missing: {missing[:3]}, unexpected: {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


# --- one optimizer step ----------------------------------------------------------------------
def _train_step(run: _Run) -> tuple[int, float, float, float, float | None]:
    """Accumulate grad_accum micro-batches, clip, step -> (tokens, seconds, loss, lr, grad norm)."""
    t, env, wrapped, job = run.settings, run.env, run.wrapped, run.job
    start = time.perf_counter()
    micro = job.batches.next_micro_batches(run.state.step, t.grad_accum)
    run.micro_tokens = int(micro[0]["input_ids"].numel())
    counts = [_counted(job.objective, b) for b in micro]
    total = dist.all_reduce_sum(sum(counts), env)  # counted tokens in the global batch
    step_loss = torch.zeros((), device=env.device)  # summed on the device: one sync per step
    for m, (batch, n) in enumerate(zip(micro, counts)):
        batch = _to(batch, env.device)
        last_micro = m == len(micro) - 1
        sync = wrapped.no_sync() if env.mode == "ddp" and not last_micro else contextlib.nullcontext()
        with sync, _autocast(run):
            loss, _ = job.objective.loss(wrapped, batch)
        with sync:
            # DDP/FSDP average gradients over ranks; the world_size factor turns that into a sum
            (loss * (n * env.world_size / max(total, 1))).backward()
        step_loss += loss.detach().float() * n
    loss_value = dist.all_reduce_sum(step_loss.item(), env) / max(total, 1)
    if not math.isfinite(loss_value):
        raise TrainingError(f"loss became {loss_value} at step {run.state.step + 1}; the weights were not updated "
                            f"and the last checkpoint is intact (try a lower train.lr={t.lr} or check the data)")
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip) if t.grad_clip > 0 else None
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    # no device synchronize here: the loss .item() above already bounds how far the host runs ahead
    tokens = sum(int(b["input_ids"].numel()) for b in micro) * env.world_size
    return tokens, time.perf_counter() - start, loss_value, lr, (float(grad_norm) if grad_norm is not None else None)


def _autocast(run: _Run):
    return torch.autocast(run.env.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None)


# --- logging ---------------------------------------------------------------------------------
def _log_step(run: _Run, bar, loss: float, lr: float, grad_norm: float | None, tokens_per_s: float) -> None:
    if run.peak_flops is None:  # the best of several timed runs, at this run's matmul shapes (metrics.py)
        core = _flop_core(run.job.model)
        shapes = training_matmul_shapes(core.config, run.micro_tokens) if core is not None else ()
        run.peak_flops = measure_peak_flops(run.env.device, run.autocast_dtype or torch.float32,
                                            shapes) * run.env.world_size
    mfu = model_flops_utilization(run.flop_params, tokens_per_s, run.peak_flops)  # an estimate, at most 1.0
    run.last = {"loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu}
    extra = getattr(run.job.objective, "train_metrics", dict)()  # e.g. DPO's reward accuracy (this rank's)
    if run.log is not None:
        run.log.write(kind="train", step=run.state.step, loss=loss, lr=lr, tokens=run.state.tokens_seen,
                      tokens_per_s=tokens_per_s, mfu=mfu, grad_norm=grad_norm, **extra)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{100 * mfu:.1f}%")


def _plot(run: _Run) -> None:
    if run.log is not None:
        plot_loss_curve(run.log.read(), run.out / "loss.png", title=run.job.name)


# --- evaluation, best checkpoint, early stopping ------------------------------------------------
def _signed(select: str | None, metrics: dict[str, float]) -> float | None:
    """The selection score, higher is better ("-val_loss" flips the sign of val_loss)."""
    if not select:
        return None
    name, sign = (select[1:], -1.0) if select.startswith("-") else (select, 1.0)
    value = metrics.get(name)
    return None if value is None else sign * value


def _unsigned(select: str | None, score: float | None) -> float | None:
    if select is None or score is None:
        return None
    return -score if select.startswith("-") else score


def _evaluate(run: _Run, bar) -> None:
    job, state = run.job, run.state
    if job.evaluate is None:
        return
    run.wrapped.eval()
    # the evaluation may draw random numbers (sampling, calibrations): it gets a copy of the RNG state, so the
    # training's stream continues exactly as if no evaluation had run (exact resume does not depend on it)
    devices = [run.env.device] if run.env.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), _autocast(run):
        metrics = job.evaluate(run.wrapped)
    run.wrapped.train()
    run.metrics = metrics
    if run.log is not None and metrics:
        run.log.write(kind="eval", step=state.step, **metrics)
    if bar is not None and not bar.disable and metrics:
        bar.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    score = _signed(job.select, metrics)
    if score is not None:
        if state.best_score is None or score > state.best_score:
            state.best_score, state.best_step, state.evals_since_best = score, state.step, 0
            if job.on_best is not None and run.env.is_main:
                job.on_best(state.step, metrics)
        else:
            state.evals_since_best += 1
            if job.patience is not None and state.evals_since_best >= job.patience:
                state.stopped_early = True
                if bar is not None and not bar.disable:
                    bar.write(f"step {state.step}: no improvement of {job.select.lstrip('-')} in {job.patience} "
                              f"evaluations; stopping early (best at step {state.best_step})")
    _plot(run)


# --- checkpoints -----------------------------------------------------------------------------
def _checkpoint(run: _Run) -> None:
    """Full (or trainable-only) state in checkpoint.pt; or, sharded, a DCP directory that checkpoint.pt names."""
    env, job, out = run.env, run.job, run.out
    payload = {"format": CHECKPOINT_FORMAT, "loop": asdict(run.state), "scheduler": run.scheduler.state_dict(),
               "data": job.batches.state_dict(), "rng": dist.gather_rng_states(env), "identity": job.identity,
               "world_size": env.world_size}
    dcp_root = out / "checkpoint_dcp"
    if run.sharded:
        # each rank writes its shards into a fresh step directory; checkpoint.pt is replaced only once
        # the directory is complete, so it always names a whole DCP checkpoint
        name = f"step_{run.state.step:08d}"
        dist.save_sharded(run.wrapped, run.optimizer, dcp_root / name)
        dist.barrier(env)
        payload["sharded"] = name
    else:
        payload["model"] = (_trainable_state(job.model) if job.trainable_only
                            else dist.model_state_dict(run.wrapped, env))
        payload["optimizer"] = dist.optimizer_state_dict(run.wrapped, run.optimizer, env)
    if env.is_main:
        save_checkpoint(payload, out / "checkpoint.pt")
        if run.sharded:
            for old in dcp_root.glob("step_*"):
                if old.name != payload["sharded"]:
                    shutil.rmtree(old, ignore_errors=True)
    dist.barrier(env)
