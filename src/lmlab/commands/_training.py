"""What the training commands (`pretrain`, `finetune`, `distill`, `align`) share: the same schedule and run
flags, data sources written the same way (``FILE[:START:STOP][@WEIGHT]``), flags that become config
overrides the same way, and a run that did not finish ends the same way."""

from __future__ import annotations

import json

from lmlab.errors import ConfigError


def flag_overrides(args, flags: dict[str, str]) -> list[str]:
    """``--set`` overrides first, then each given flag as ``key=<json value>`` (flags win over --set).

    ``--steps`` without ``--epochs`` also clears ``train.epochs``: a config's default epoch count would
    otherwise decide the length instead of the steps the user asked for."""
    overrides = list(args.set)
    for flag, key in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if "epochs" in flags and getattr(args, "steps", None) is not None and getattr(args, "epochs", None) is None:
        overrides.append("train.epochs=null")
    return overrides


def unfinished_exit(summary: dict) -> int | None:
    """The exit code of a run that did not finish (printing where its checkpoint is), else None.

    Under torchrun only rank 0 reports; a run stopped by a signal exits 128 + the signal's number, one
    stopped by ``--stop-after`` exits 0."""
    interrupted = summary["interrupted"]
    if summary["rank"] != 0:
        return 128 + int(interrupted) if interrupted is not None else 0
    if interrupted is not None:
        print(f"interrupted at step {summary['step']}; checkpoint saved to {summary['checkpoint']} "
              "(continue with --resume)")
        return 128 + int(interrupted)
    if not summary["finished"]:
        print(f"stopped at step {summary['step']}; checkpoint saved to {summary['checkpoint']} (continue with --resume)")
        return 0
    return None


def add_schedule_flags(parser, *, unit: str, epochs_of: str | None) -> None:
    """--epochs (when the job counts passes over `epochs_of`), --steps, --batch-size (`unit` per micro-step),
    --grad-accum, --lr."""
    if epochs_of is not None:
        parser.add_argument("--epochs", type=float, help=f"passes over {epochs_of} (sets the steps)")
        steps_help = "optimizer steps (when --epochs is not given)"
    else:
        steps_help = "optimizer steps (train.steps)"
    parser.add_argument("--steps", type=int, help=steps_help)
    parser.add_argument("--batch-size", type=int, help=f"{unit} per micro-step (train.batch_size)")
    parser.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (train.grad_accum)")
    parser.add_argument("--lr", type=float, help="peak learning rate (train.lr)")


def add_run_flags(parser, *, seed: str, distributed: bool) -> None:
    """--precision, --distributed (jobs that run under torchrun), --device, --seed (`seed`: what it seeds),
    --stop-after, --no-progress."""
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 where the CPU or GPU has it natively, else fp32")
    if distributed:
        parser.add_argument("--distributed", choices=["none", "ddp", "fsdp"],
                            help="data parallelism (launch with torchrun)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train")
    parser.add_argument("--seed", type=int, help=seed)
    parser.add_argument("--stop-after", type=int, help="stop with a checkpoint after this many steps (resume later)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def data_source(spec: str) -> dict:
    """FILE[:START:STOP][@WEIGHT] -> {path, records, weight}."""
    spec, _, weight = spec.partition("@")
    path, records = spec, None
    parts = spec.rsplit(":", 2)
    if len(parts) == 3 and all(p.isdigit() or p == "" for p in parts[1:]):
        path, records = parts[0], f"{parts[1]}:{parts[2]}"
    source = {"path": path, "records": records}
    if weight:
        try:
            source["weight"] = float(weight)
        except ValueError:
            raise ConfigError(f"data source {spec + '@' + weight!r}: the weight after @ must be a number") from None
    return source
