"""The text `lmlab plan memory` and `lmlab plan chinchilla` print: tables over the estimates in this package."""

from __future__ import annotations

from lmlab.config import ModelConfig
from lmlab.scaling.chinchilla import CHINCHILLA_ALPHA, CHINCHILLA_BETA, ChinchillaPlan, chinchilla_loss_optimal, training_time
from lmlab.scaling.memory import STRATEGIES, inference_memory, training_memory
from lmlab.scaling.units import check_choice, format_bytes, format_count, format_duration, format_flops

TABLE_STRATEGIES = ("single", "ddp", "zero1", "zero2", "fsdp")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def memory_report(cfg: ModelConfig, batch: int = 8, seq_len: int | None = None, precision: str = "bf16-mixed",
                  optimizer: str = "adamw", strategies=TABLE_STRATEGIES, world_size: int = 8,
                  gpu_bytes: float = 80 * 2 ** 30, activation_checkpointing: bool = False,
                  attention: str = "flash", inference_dtypes=("fp32", "bf16", "int8", "int4")) -> str:
    """The tables `lmlab plan memory` prints: per-rank training memory per strategy, then inference memory."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    for s in strategies:
        check_choice("strategy", s, STRATEGIES)
    n = cfg.num_parameters()
    lines = [f"model      {cfg.name or cfg.arch}: {cfg.arch}, {n:,} parameters ({format_count(n)})",
             f"training   batch {batch} x {seq_len} tokens per rank, {precision}, {optimizer}, world size {world_size}, "
             f"activation checkpointing {'on' if activation_checkpointing else 'off'}, {attention} attention",
             f"device     {format_bytes(gpu_bytes)} per GPU", ""]
    rows = []
    for s in strategies:
        m = training_memory(cfg, batch, seq_len, precision, optimizer, s, 1 if s == "single" else world_size,
                            activation_checkpointing, attention)
        rows.append([s if s != "single" else "single (1 GPU)", format_bytes(m.parameters), format_bytes(m.gradients),
                     format_bytes(m.optimizer), format_bytes(m.gathered), format_bytes(m.activations),
                     format_bytes(m.total), "yes" if m.fits(gpu_bytes) else "NO"])
    lines.append(_table(["strategy (per rank)", "params", "grads", "optimizer", "gathered", "activations", "total",
                         "fits"], rows))
    if inference_dtypes:
        lines += ["", f"inference  batch {batch} x {seq_len} tokens, KV cache in the activation dtype"]
        rows = []
        for dt in inference_dtypes:
            m = inference_memory(cfg, dt, batch, seq_len, attention=attention)
            rows.append([dt, format_bytes(m.weights), format_bytes(m.kv_cache), format_bytes(m.activations),
                         format_bytes(m.total), "yes" if m.fits(gpu_bytes) else "NO"])
        lines.append(_table(["weights dtype", "weights", "kv cache", "activations", "total", "fits"], rows))
    return "\n".join(lines)


def chinchilla_report(plan: ChinchillaPlan, peak_flops: float = 989e12, mfu: float = 0.4, n_devices: int = 1) -> str:
    """The summary `lmlab plan chinchilla` prints."""
    seconds = training_time(plan.flops, peak_flops, mfu, n_devices)
    best = chinchilla_loss_optimal(plan.flops)
    rows = [
        ("parameters N", f"{format_count(plan.n_params)} ({plan.n_params:.3g})"),
        ("tokens D", f"{format_count(plan.n_tokens)} ({plan.n_tokens:.3g}; {plan.tokens_per_param:g} per parameter)"),
        ("compute C = 6ND", format_flops(plan.flops)),
        ("predicted loss", f"{plan.loss:.3f} nats/token (E + A/N^{CHINCHILLA_ALPHA} + B/D^{CHINCHILLA_BETA}, "
                           "Hoffmann et al. 2022 fit)"),
        ("fit's own optimum", "{} params, {} tokens, loss {:.3f} (minimum of L(N, D) at this C)".format(
            format_count(best.n_params), format_count(best.n_tokens), best.loss)),
        ("training time", f"{format_duration(seconds)} on {n_devices} device(s) at {format_count(peak_flops)} FLOP/s "
                          f"peak, {mfu:.0%} MFU ({seconds * n_devices / 3600:.3g} device-hours)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
