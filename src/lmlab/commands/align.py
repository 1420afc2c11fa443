"""`lmlab align`: flags -> ``lmlab.training.align.load_align_config`` overrides -> ``align`` (DPO).

Every config field can be set with ``--set section.key=value`` (repeatable); the common ones also have
their own flags, applied after --set.
"""

from __future__ import annotations

import json

from lmlab.commands._training import (add_run_flags, add_schedule_flags, data_source, flag_overrides,
                                       unfinished_exit)

# flag -> config key it overrides
_FLAGS = {
    "method": "method", "base": "base_model", "adapter": "adapter", "prefs": "data.train",
    "validation": "data.validation", "holdout": "data.holdout", "beta": "beta", "out": "out_dir",
    "epochs": "train.epochs", "steps": "train.steps", "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum", "lr": "train.lr", "rank": "lora.r", "alpha": "lora.alpha",
    "targets": "lora.targets", "max_seq_len": "data.max_seq_len", "rouge_examples": "eval.rouge_examples",
    "precision": "train.precision", "device": "train.device", "seed": "train.seed", "stop_after": "train.stop_after",
}


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="YAML/JSON alignment config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set lora.dropout=0.0 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
    parser.add_argument("--method", choices=["dpo"], help="Direct Preference Optimization (the default)")
    parser.add_argument("--base", help="the base model: registry name, .gguf, HF or lmlab directory")
    parser.add_argument("--adapter", metavar="DIR|shipped",
                        help="the starting policy's LoRA adapter (folded into the base; it is also the reference): "
                             "a PEFT directory or 'shipped'; default: the base model itself")
    parser.add_argument("--prefs", metavar="FILE", help="preference pairs JSONL {prompt, chosen, rejected}")
    parser.add_argument("--validation", metavar="FILE", help="held-out preference pairs (default: --holdout of --prefs)")
    parser.add_argument("--holdout", type=int, help="pairs of --prefs held out for evaluation (whole prompts)")
    parser.add_argument("--rouge-data", metavar="FILE[:START:STOP]",
                        help="labelled records for ROUGE after training, e.g. dev.jsonl:400:500")
    parser.add_argument("--rouge-examples", type=int, help="how many --rouge-data records to summarize (0: none)")
    parser.add_argument("--beta", type=float, help="DPO beta: how far the policy may move from the reference")
    parser.add_argument("--out", help="run directory (out_dir)")
    add_schedule_flags(parser, unit="preference pairs", epochs_of="the pairs")
    parser.add_argument("--rank", type=int, help="LoRA rank r of the DPO adapter")
    parser.add_argument("--alpha", type=float, help="LoRA alpha of the DPO adapter")
    parser.add_argument("--targets", help="LoRA target linears by name, e.g. q,k,v,o,gate,up,down")
    parser.add_argument("--max-seq-len", type=int, help="prompt + response tokens; longer prompts are cut in the middle")
    add_run_flags(parser, seed="seed for the adapter init, pair order, holdout and dropout", distributed=False)


def run(args) -> int:
    # lazy: it imports torch, and `lmlab --help` imports every command module for its flags
    from lmlab.training.align import align, load_align_config

    overrides = flag_overrides(args, _FLAGS)
    if args.rouge_data:
        overrides.append(f"data.rouge={json.dumps(data_source(args.rouge_data))}")
    cfg = load_align_config(args.config, overrides)
    summary = align(cfg, resume=args.resume, show_progress=not args.no_progress)
    if (code := unfinished_exit(summary)) is not None:
        return code
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in {**summary["metrics"], **summary.get("rouge", {})}.items())
    print(f"done: {summary['step']} steps, train loss {summary['train_loss']:.4f}"
          f"{', ' + metrics if metrics else ''}; the policy (one adapter for {cfg.base_model}) in {summary['final_dir']}")
    return 0
