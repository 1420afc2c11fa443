"""What the training commands (`pretrain`, `finetune`, `distill`, `align`) share: their flags become
config overrides the same way, and a run that did not finish ends the same way."""

from __future__ import annotations

import json


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
