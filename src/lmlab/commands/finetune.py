"""`lmlab finetune`: flags -> ``lmlab.training.finetune.load_finetune_config`` overrides -> ``finetune``.

Every config field can be set with ``--set section.key=value`` (repeatable); the common ones also have
their own flags, applied after --set.
"""

from __future__ import annotations

import json

from lmlab.cli import add_engine_argument
from lmlab.commands._training import (add_run_flags, add_schedule_flags, data_source, flag_overrides,
                                       unfinished_exit)

# flag -> config key it overrides
_FLAGS = {
    "base": "base_model", "method": "method", "out": "out_dir", "task": "data.task", "epochs": "train.epochs",
    "steps": "train.steps", "batch_size": "train.batch_size", "grad_accum": "train.grad_accum", "lr": "train.lr",
    "rank": "lora.r", "alpha": "lora.alpha", "targets": "lora.targets", "max_seq_len": "data.max_seq_len",
    "precision": "train.precision", "distributed": "train.distributed", "device": "train.device",
    "seed": "train.seed", "stop_after": "train.stop_after",
}


def add_arguments(parser) -> None:
    add_engine_argument(parser)
    parser.add_argument("--config", default=None, help="YAML/JSON fine-tuning config "
                        "(e.g. configs/finetune-smollm2-dialogsum-lora.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set lora.dropout=0.1 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
    parser.add_argument("--base", help="the model to fine-tune: registry name, .gguf, HF or lmlab directory")
    parser.add_argument("--method", choices=["lora", "full"], help="LoRA adapters on a frozen base, or every weight")
    parser.add_argument("--data", nargs="+", metavar="FILE[:START:STOP][@WEIGHT]",
                        help="training JSONL files, each optionally with a record range and a mixing weight, "
                             "e.g. dev.jsonl:0:400 other.jsonl@0.5")
    parser.add_argument("--validation", metavar="FILE[:START:STOP]", help="validation JSONL (loss, ROUGE, best checkpoint)")
    parser.add_argument("--task", choices=["dialogsum"], help="field/prompt preset (dialogue -> summary)")
    parser.add_argument("--prompt-field", help="JSONL field with the input (data.prompt_field)")
    parser.add_argument("--response-field", help="JSONL field with the target (data.response_field)")
    parser.add_argument("--out", help="run directory (out_dir)")
    add_schedule_flags(parser, unit="examples", epochs_of="the training data")
    parser.add_argument("--rank", type=int, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, help="LoRA alpha (scale alpha/r, or alpha/sqrt(r) with rsLoRA)")
    parser.add_argument("--targets", help="LoRA target linears by name, e.g. q,k,v,o,gate,up,down")
    parser.add_argument("--max-seq-len", type=int, help="prompt + response tokens; longer prompts are cut in the middle")
    add_run_flags(parser, seed="seed for the adapter init, data order and dropout", distributed=True)


def run(args) -> int:
    # lazy: it imports torch, and `lmlab --help` imports every command module for its flags
    from lmlab.training.finetune import finetune, load_finetune_config

    overrides = flag_overrides(args, _FLAGS)
    if args.data:
        overrides.append(f"data.train={json.dumps([data_source(s) for s in args.data])}")
    if args.validation:
        overrides.append(f"data.validation={json.dumps(data_source(args.validation))}")
    if args.prompt_field:
        overrides.append(f"data.prompt_field={json.dumps(args.prompt_field)}")
    if args.response_field:
        overrides.append(f"data.response_field={json.dumps(args.response_field)}")
    cfg = load_finetune_config(args.config, overrides)
    summary = finetune(cfg, resume=args.resume, show_progress=not args.no_progress)
    if (code := unfinished_exit(summary)) is not None:
        return code
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items())
    best = (f"; best {cfg.eval.select.lstrip('-')} {summary['best_score']:.4f} at step {summary['best_step']}"
            if summary["best_step"] is not None else "")
    print(f"done: {summary['step']} steps{' (stopped early)' if summary['stopped_early'] else ''}, train loss "
          f"{summary['train_loss']:.4f}, {metrics}{best}; best weights in {summary['best_dir']}")
    return 0
