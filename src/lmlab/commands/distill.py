"""`lmlab distill`: flags -> ``lmlab.training.distill.load_distill_config`` overrides -> ``distill``.

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
    "teacher": "teacher", "teacher_adapter": "teacher_adapter", "student": "student.model", "method": "method",
    "field": "data.field", "label_field": "data.label_field", "temperature": "token.temperature",
    "alpha": "token.alpha", "out": "out_dir", "epochs": "train.epochs", "steps": "train.steps",
    "batch_size": "train.batch_size", "grad_accum": "train.grad_accum", "lr": "train.lr",
    "max_seq_len": "data.max_seq_len", "precision": "train.precision", "device": "train.device",
    "seed": "train.seed", "stop_after": "train.stop_after",
}


def add_arguments(parser) -> None:
    add_engine_argument(parser)
    parser.add_argument("--config", default=None, help="YAML/JSON distillation config (e.g. configs/distill-smollm2-dialogsum.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set token.temperature=1.0 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
    parser.add_argument("--teacher", help="the teacher model: registry name, .gguf, HF or lmlab directory")
    adapter = parser.add_mutually_exclusive_group()
    adapter.add_argument("--teacher-adapter", metavar="DIR",
                         help="LoRA adapter folded into the teacher (default: the one lmlab ships for it, if any)")
    adapter.add_argument("--no-teacher-adapter", action="store_true", help="the teacher without any adapter")
    parser.add_argument("--student", metavar="MODEL",
                        help="the student's starting point: a model source (its weights) or a ModelConfig preset / "
                             "JSON file (random init); default: the teacher itself, cut by --keep-layers")
    parser.add_argument("--keep-layers", metavar="every-other|I,J,...",
                        help="keep only these decoder layers of the student, weights copied (default: every-other "
                             "for a student cut from the teacher, all for --student; 'all' keeps every layer)")
    parser.add_argument("--method", choices=["sequence", "token"],
                        help="sequence: fine-tune on the teacher's summaries; token: match its distributions (KL)")
    parser.add_argument("--data", nargs="+", metavar="FILE[:START:STOP][@WEIGHT]",
                        help="unlabeled JSONL inputs, each optionally with a record range and a mixing weight, "
                             "e.g. hiddentest.jsonl dev.jsonl:0:400")
    parser.add_argument("--field", help="JSONL field with the input (default dialogue)")
    parser.add_argument("--label-field", help="token method: JSONL field with human labels for the hard-label loss")
    parser.add_argument("--validation", metavar="FILE[:START:STOP]",
                        help="labelled validation JSONL (loss, ROUGE, best checkpoint); never the evaluation range")
    parser.add_argument("--no-holdout", action="store_true",
                        help="turn off the guard that keeps DialogSum dev records 400:500 out of training")
    parser.add_argument("--temperature", type=float, help="token method: softmax temperature tau")
    parser.add_argument("--alpha", type=float, help="token method: weight of the hard-label cross-entropy")
    parser.add_argument("--pseudo-only", action="store_true",
                        help="generate the teacher's pseudo-labels (resumable) and stop before training")
    parser.add_argument("--out", help="run directory (out_dir)")
    add_schedule_flags(parser, unit="examples", epochs_of="the training data")
    parser.add_argument("--max-seq-len", type=int, help="prompt + response tokens; longer prompts are cut in the middle")
    add_run_flags(parser, seed="seed for the data order and dropout", distributed=False)


def run(args) -> int:
    # lazy: it imports torch, and `lmlab --help` imports every command module for its flags
    from lmlab.training.distill import distill, load_distill_config

    overrides = flag_overrides(args, _FLAGS)
    if args.no_teacher_adapter:
        overrides.append("teacher_adapter=null")
    if args.keep_layers is not None:
        overrides.append(f"student.keep_layers={json.dumps(args.keep_layers)}")
    if args.data:
        overrides.append(f"data.train={json.dumps([data_source(s) for s in args.data])}")
    if args.validation:
        overrides.append(f"data.validation={json.dumps(data_source(args.validation))}")
    if args.no_holdout:
        overrides.append("data.holdout=null")
    cfg = load_distill_config(args.config, overrides)
    summary = distill(cfg, resume=args.resume, show_progress=not args.no_progress, pseudo_only=args.pseudo_only)
    if summary["rank"] == 0 and summary.get("pseudo_only"):
        print(f"pseudo-labels: {summary['pseudo_labels']} in {summary['cache']}"
              + (f", {summary['pseudo_missing']} still to generate" if summary["pseudo_missing"] else ""))
        return 0
    if (code := unfinished_exit(summary)) is not None:
        return code
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items())
    print(f"done: {summary['step']} steps, train loss {summary['train_loss']:.4f}{', ' + metrics if metrics else ''}; "
          f"{summary['student_layers']}-layer student ({summary['student_parameters']:,} parameters) in "
          f"{summary['best_dir']}")
    return 0
