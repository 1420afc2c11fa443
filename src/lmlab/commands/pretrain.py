"""`lmlab pretrain`: flags -> ``lmlab.training.load_config`` overrides -> ``lmlab.training.pretrain``.

Every config field can be set with ``--set section.key=value`` (repeatable); the common ones also have
their own flags, which are applied after --set.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.commands._training import add_run_flags, add_schedule_flags, flag_overrides, unfinished_exit

# flag -> config key it overrides
_FLAGS = {
    "out": "out_dir", "files": "data.files", "field": "data.field", "tokenizer": "data.tokenizer",
    "seq_len": "data.seq_len", "objective": "train.objective", "steps": "train.steps",
    "batch_size": "train.batch_size", "grad_accum": "train.grad_accum", "lr": "train.lr",
    "precision": "train.precision", "distributed": "train.distributed", "device": "train.device",
    "seed": "train.seed", "stop_after": "train.stop_after",
}


def _preset_names() -> str:
    """The training presets, listed from their YAML files (without importing torch for --help)."""
    presets = Path(__file__).resolve().parents[1] / "training" / "presets"
    return ", ".join(sorted(p.stem for p in presets.glob("*.yaml")))


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help=f"YAML/JSON run config, or a preset: {_preset_names()}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set train.lr=3e-4 --set model.dropout=0.1 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
    parser.add_argument("--out", help="run directory (out_dir)")
    parser.add_argument("--files", nargs="+", help="training data: .txt, .jsonl or hf:DATASET (data.files)")
    parser.add_argument("--field", help="JSONL/datasets field with the text (data.field), e.g. dialogue")
    parser.add_argument("--tokenizer", help="directory with tokenizer.json (default: train one into OUT/tokenizer)")
    parser.add_argument("--seq-len", type=int, help="model input length (data.seq_len)")
    parser.add_argument("--objective", choices=["clm", "mlm", "span"], help="default: by the model's architecture")
    add_schedule_flags(parser, unit="global blocks", epochs_of=None)
    add_run_flags(parser, seed="train.seed: the model's initial weights, data order, masks and dropout; the same "
                               "config and seed give the same model", distributed=True)


def run(args) -> int:
    # lazy: it imports torch, and `lmlab --help` imports every command module for its flags
    from lmlab.training import load_config, pretrain

    overrides = flag_overrides(args, _FLAGS)
    cfg = load_config(args.config, overrides)
    summary = pretrain(cfg, resume=args.resume, show_progress=not args.no_progress)
    if (code := unfinished_exit(summary)) is not None:
        return code
    # a run shorter than one log interval has no train loss or throughput yet: print what exists
    parts = [f"done: {summary['step']} steps"]
    if summary.get("train_loss") is not None:
        parts.append(f"train loss {summary['train_loss']:.4f}")
    if summary.get("val_loss") is not None:
        parts.append(f"validation loss {summary['val_loss']:.4f}")
    if summary.get("tokens_per_s") is not None:
        parts.append(f"{summary['tokens_per_s']:,.0f} tokens/s, MFU {100 * summary['mfu']:.1f}%")
    print(", ".join(parts) + f"; model saved to {summary['out_dir']}")
    return 0
