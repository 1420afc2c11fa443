"""Run metrics: a JSONL log, the loss-curve PNG, and model-FLOPs utilisation.

MFU = achieved model FLOP/s / peak FLOP/s. Achieved FLOP/s is the standard 6·N·tokens/s estimate
(forward 2N + backward 4N multiply-adds per token, attention scores ignored), with N the parameters
that take part in matrix multiplies (embedding tables that are only looked up are excluded; a tied
output head counts once, as the head). For encoder-decoder models `tokens` counts encoder input
positions, so the figure is an approximation there. Peak FLOP/s is measured once per process by a
short square matmul in the training dtype on the training device (not a datasheet number), so on a
CPU it reflects the threads actually in use.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

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


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                       seconds: float = 0.5) -> float:
    """Sustained FLOP/s of a square matmul on `device` (cached per device/dtype/size)."""
    size = size or (4096 if device.type == "cuda" else 1024)
    key = (str(device), dtype, size, torch.get_num_threads())
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    g = torch.Generator(device=device).manual_seed(0)  # own generator: never touch the training RNG
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):  # warm-up (allocator, kernel selection, clocks)
        a @ b
    sync()
    n, start = 0, time.perf_counter()
    while True:
        a @ b
        n += 1
        if n % 4 == 0:
            sync()
            if time.perf_counter() - start > seconds:
                break
    elapsed = time.perf_counter() - start
    _PEAK_CACHE[key] = 2 * size**3 * n / elapsed
    return _PEAK_CACHE[key]


class MetricsLog:
    """Append-only JSONL metrics (one object per line: step, kind, values)."""

    def __init__(self, path: str | Path, fresh: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()

    def write(self, **record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss_curve(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Train (and validation) loss against step as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
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
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
