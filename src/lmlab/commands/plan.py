"""`lmlab plan memory MODEL` and `lmlab plan chinchilla`: memory estimates and compute-optimal plans (no weights)."""

from __future__ import annotations

import argparse
import json

from lmlab.scaling.memory import ATTENTION_KERNELS, OPTIMIZERS, PRECISIONS  # plain arithmetic: no torch import


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plan_command", metavar="{memory,chinchilla}", required=True)

    mem = sub.add_parser("memory", help="per-GPU memory for training (single/DDP/ZeRO/FSDP) and inference",
                         description="Per-GPU memory for training (single/DDP/ZeRO/FSDP) and inference, from the config.")
    mem.add_argument("model", help="preset name (lmlab.config.PRESETS) or any source `lmlab info` reads")
    mem.add_argument("--batch", type=int, default=8, help="sequences per GPU (default 8)")
    mem.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's context)")
    mem.add_argument("--precision", default="bf16-mixed", choices=PRECISIONS,
                     help="training precision (default bf16-mixed)")
    mem.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                     help="optimizer whose states are counted (default adamw)")
    mem.add_argument("--strategy", default=",".join(("single", "ddp", "zero1", "zero2", "fsdp")),
                     help="comma-separated rows: single, ddp, zero1, zero2, zero3, fsdp (default: all but zero3)")
    mem.add_argument("--world-size", type=int, default=8, help="data-parallel GPUs (default 8)")
    mem.add_argument("--gpu-memory", default="80GiB", help="memory per GPU, e.g. 80GiB, 24GB (default 80GiB)")
    mem.add_argument("--activation-checkpointing", action="store_true", help="store only each block's input")
    mem.add_argument("--attention", default="flash", choices=ATTENTION_KERNELS,
                     help="flash: fused SDPA (default); eager: stores the a*s^2 attention scores")
    mem.add_argument("--json", action="store_true", help="print the figures as JSON")

    chin = sub.add_parser("chinchilla", help="compute-optimal N, D, C, predicted loss and training time",
                          description="Compute-optimal N, D, C (Hoffmann et al. 2022), predicted loss and training time.")
    given = chin.add_mutually_exclusive_group(required=True)
    given.add_argument("--compute", help="training FLOPs, e.g. 1e21 or 5.76e23")
    given.add_argument("--params", help="parameters, e.g. 125M, 7B")
    given.add_argument("--tokens", help="training tokens, e.g. 2.5B, 1.4T")
    chin.add_argument("--tokens-per-param", type=float, default=20.0, help="D/N ratio (default 20)")
    chin.add_argument("--peak-flops", default="989T", help="peak FLOP/s per device (default 989T, H100 SXM bf16 dense)")
    chin.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    chin.add_argument("--devices", type=int, default=1, help="number of devices (default 1)")
    chin.add_argument("--fit", metavar="RUNS.jsonl", help="plan with the law fitted to your own runs "
                      "(`lmlab scaling fit`) instead of the published one; --tokens-per-param is then ignored")
    chin.add_argument("--json", action="store_true", help="print the figures as JSON")


def model_config(source: str):
    """A preset name (``lmlab.config.PRESETS``, no torch needed) or any source ``lmlab.checkpoints.load_config`` reads."""
    from lmlab.config import PRESETS, ModelConfig

    if source in PRESETS:
        return ModelConfig.from_name(source)
    from lmlab.checkpoints import load_config  # imports torch; only needed for real checkpoints
    from lmlab.errors import CheckpointError

    try:
        return load_config(source)[0]
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; or use a preset: {', '.join(PRESETS)}") from None


def run(args: argparse.Namespace) -> int:
    from lmlab import scaling

    if args.plan_command == "memory":
        cfg = model_config(args.model)
        gpu = scaling.parse_bytes(args.gpu_memory, "--gpu-memory")
        strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
        seq_len = cfg.max_seq_len if args.seq_len is None else args.seq_len
        if args.json:
            rows = {s: scaling.training_memory(cfg, args.batch, seq_len, args.precision, args.optimizer, s,
                                               1 if s == "single" else args.world_size,
                                               args.activation_checkpointing, args.attention).as_dict()
                    for s in strategies}
            inference = {dt: scaling.inference_memory(cfg, dt, args.batch, seq_len, attention=args.attention).as_dict()
                         for dt in ("fp32", "bf16", "int8", "int4")}
            print(json.dumps({"parameters": cfg.num_parameters(), "gpu_bytes": gpu, "training": rows,
                              "inference": inference}, indent=2))
            return 0
        print(scaling.memory_report(cfg, args.batch, seq_len, args.precision, args.optimizer, strategies,
                                    args.world_size, gpu, args.activation_checkpointing, args.attention))
        return 0
    count = {"compute": args.compute, "params": args.params, "tokens": args.tokens}
    name, text = next((k, v) for k, v in count.items() if v is not None)
    value = scaling.parse_count(text, f"--{name}")
    plan = scaling.chinchilla_optimal(**{{"compute": "compute_flops", "params": "n_params",
                                          "tokens": "n_tokens"}[name]: value}, tokens_per_param=args.tokens_per_param)
    peak = scaling.parse_count(args.peak_flops, "--peak-flops")
    if args.fit:
        return _plan_with_fit(args, name, value, peak)
    if args.json:
        seconds = scaling.training_time(plan.flops, peak, args.mfu, args.devices)
        print(json.dumps({**plan.as_dict(), "training_seconds": seconds}, indent=2))
        return 0
    print(scaling.chinchilla_report(plan, peak, args.mfu, args.devices))
    return 0


def _plan_with_fit(args: argparse.Namespace, name: str, value: float, peak: float) -> int:
    """`lmlab plan chinchilla --fit RUNS.jsonl`: the compute-optimal plan under the user's fitted law."""
    from lmlab import scaling
    from lmlab.scaling import fit as scaling_fit

    law = scaling_fit.fit_runs(scaling_fit.read_runs(args.fit), n_boot=0).law
    plan = scaling_fit.plan_with_law(law, **{{"compute": "compute_flops", "params": "n_params",
                                               "tokens": "n_tokens"}[name]: value})
    seconds = scaling.training_time(plan["flops"], peak, args.mfu, args.devices)
    if args.json:
        print(json.dumps({**plan, "training_seconds": seconds, "runs": args.fit}, indent=2))
        return 0
    rows = [
        ("law", f"L = {law.E:.3f} + {law.A:.4g}/N^{law.alpha:.3f} + {law.B:.4g}/D^{law.beta:.3f} (fitted to {args.fit})"),
        ("parameters N", f"{scaling.format_count(plan['n_params'])} ({plan['n_params']:.3g})"),
        ("tokens D", f"{scaling.format_count(plan['n_tokens'])} ({plan['n_tokens']:.3g}; "
                     f"{plan['tokens_per_param']:.3g} per parameter; Chinchilla: 20)"),
        ("compute C = 6ND", scaling.format_flops(plan["flops"])),
        ("predicted loss", f"{plan['loss']:.3f} nats/token (your law; beyond your runs' compute it is an extrapolation)"),
        ("training time", f"{scaling.format_duration(seconds)} on {args.devices} device(s) at "
                          f"{scaling.format_count(peak)} FLOP/s peak, {args.mfu:.0%} MFU"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0
