"""Run metrics: a JSONL log, the loss-curve PNG, and model-FLOPs utilisation.

MFU = achieved model FLOP/s / peak FLOP/s. Achieved FLOP/s is the standard 6·N·tokens/s estimate
(forward 2N + backward 4N multiply-adds per token, attention scores ignored), with N the parameters
that take part in matrix multiplies (embedding tables that are only looked up are excluded; a tied
output head counts once, as the head). For encoder-decoder models `tokens` counts encoder input
positions, so the figure is an approximation there. Peak FLOP/s is measured once per process on the
training device, in the training dtype, with the threads in use (not a datasheet number): the best
rate over several timed runs of a square matmul and of the training's own matmul shapes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from lmlab.errors import DataError

_PEAK_CACHE: dict[tuple, float] = {}


def matmul_params(model: nn.Module) -> int:
    """Parameters used in matmuls: all parameters minus look-up-only embedding tables."""
    cfg = model.config
    n = model.num_parameters()
    for name in ("pos_embed", "type_embed"):
        if getattr(model, name, None) is not None:
            n -= getattr(model, name).weight.numel()
    for stack in (model.encoder, model.decoder):
        if stack is not None and stack.rel_bias is not None:
            n -= stack.rel_bias.weight.numel()
    if not (cfg.tie_embeddings and model.lm_head is not None):
        n -= model.tok_embed.weight.numel()  # untied (or no head): the table is only looked up
    return n


def training_matmul_shapes(config, tokens: int, cap: int = 2048) -> list[tuple[int, int, int]]:
    """(M, K, N) of a training step's big matmuls for `tokens` positions per micro-batch on one rank:
    the FFN in and out projections and the output head (the attention projections are d_model x d_model,
    smaller than these). Each side is capped at `cap`: beyond a couple of thousand the rate hardly changes
    with the length, while the time and memory of the measurement would (GPT-2's head at 12 x 1024
    tokens is a 2.4 GB fp32 output)."""
    d_model, d_ff, vocab = (min(d, cap) for d in (config.d_model, config.d_ff, config.vocab_size))
    rows = min(tokens, cap)
    return [(rows, d_model, d_ff), (rows, d_ff, d_model), (rows, d_model, vocab)]


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                       shapes: Sequence[tuple[int, int, int]] | None = None, repeats: int = 5,
                       seconds: float = 0.6) -> float:
    """Peak matmul FLOP/s on `device` in `dtype` with the current thread count (cached per process).

    Each (M, K, N) in `shapes` plus a square one (1024 on CPU, 4096 on CUDA) is timed `repeats` times
    for about ``seconds / (shapes * repeats)`` each, and the best rate of all wins. The best and not the
    mean, because everything that disturbs a timing (another process on a shared CPU, a clock still
    ramping up, a page fault) only slows it: the fastest run is the closest to what the hardware does,
    and a peak that reads low would push MFU over 100%. Including the training's own shapes matters
    because MKL's rate depends on the shape; a small model's matmuls can beat a square one.
    """
    square = 4096 if device.type == "cuda" else 1024
    all_shapes = [(square, square, square), *(tuple(int(d) for d in s) for s in shapes or ())]
    key = (str(device), dtype, tuple(all_shapes), torch.get_num_threads(), repeats)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    g = torch.Generator(device=device).manual_seed(0)  # own generator: never touch the training RNG

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    per_run = seconds / (len(all_shapes) * repeats)
    best = 0.0
    for m, k, n in all_shapes:
        a = torch.randn(m, k, device=device, dtype=dtype, generator=g)
        b = torch.randn(k, n, device=device, dtype=dtype, generator=g)
        for _ in range(2):  # warm-up (allocator, kernel selection, clocks)
            a @ b
        sync()
        best = max(best, best_rate(lambda: a @ b, 2 * m * k * n, repeats, per_run, sync))
    _PEAK_CACHE[key] = best
    return best


def best_rate(run: Callable[[], object], flops_per_call: float, repeats: int, seconds: float,
              sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter) -> float:
    """The highest FLOP/s over `repeats` timed runs, each calling `run` until `seconds` have passed."""
    best = 0.0
    for _ in range(repeats):
        calls, start = 0, clock()
        while True:
            run()
            calls += 1
            sync()
            elapsed = clock() - start
            if elapsed >= seconds:
                break
        best = max(best, flops_per_call * calls / elapsed)
    return best


def model_flops_utilization(flop_params: int, tokens_per_s: float, peak_flops: float) -> float:
    """6·N·tokens/s as a fraction of the measured peak, never above 1.0.

    The ratio is an estimate, and it can come out above 1 although no run beats the hardware: 6·N
    counts every matmul parameter for every input token, which overcounts an encoder-decoder (its
    decoder sees fewer positions than the encoder), while the peak is measured on a few shapes at one
    moment and a busy machine or an untimed shape can make it read below what the training kernels
    reach. A value above 1 says nothing true, so it is reported as 1.0 (100%).
    """
    return min(1.0, 6 * flop_params * tokens_per_s / peak_flops)


class MetricsLog:
    """Append-only JSONL metrics (one object per line: step, kind, values).

    A run killed in the middle of a write can leave a torn last line: ``read`` skips it. A run resumed
    from a checkpoint at step S calls ``truncate(S)`` first, so the steps logged after that checkpoint
    by the killed run are not in the log twice.
    """

    def __init__(self, path: str | Path, fresh: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()

    def write(self, **record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """Every record; a last line that is not valid JSON (torn by a kill) is skipped."""
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    break  # the write of this record never finished
                raise DataError(f"{str(self.path)!r} line {number} is not JSON: {line[:60]!r}") from None
        return records

    def truncate(self, step: int) -> int:
        """Keep only records with step <= `step` (and a torn last line dropped) -> how many were dropped.

        The file is rewritten atomically (temporary file + os.replace): a kill during the rewrite
        leaves the old log, never a half-written one.
        """
        if not self.path.exists():
            return 0
        records = self.read()
        kept = [r for r in records if r.get("step", 0) <= step]
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(records) - len(kept)


def plot_loss_curve(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Train (and validation) loss against step as a PNG (matplotlib, Agg backend).

    When evaluations also measured ROUGE (fine-tuning), ROUGE-1/2/L are drawn on a second axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    val = [(r["step"], r["val_loss"]) for r in evals if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    rouge = {m: [(r["step"], 100 * r[m]) for r in evals if m in r] for m in ("rouge1", "rouge2", "rougeL")}
    if any(rouge.values()):
        ax2 = ax.twinx()
        for (metric, points), style, color in zip(rouge.items(), ("s--", "^--", "v--"), ("C2", "C3", "C4")):
            if points:
                ax2.plot(*zip(*points), style, color=color, label=f"validation {metric}", linewidth=1, markersize=4)
        ax2.set_ylabel("ROUGE (F1 x 100)")
        more_handles, more_labels = ax2.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
