"""`lmlab merge SOURCE ADAPTER OUT [--force]`: fold a LoRA adapter into its base model's weights and save the result.

OUT follows the output rules of docs/checkpoints.md: never the base or the adapter, never a directory
lmlab did not write, an earlier lmlab output only with --force.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="the base model: registry name, .gguf file, HF or lmlab directory")
    parser.add_argument("adapter", help="LoRA adapter directory (PEFT format: adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out_dir", help="directory for the merged model (new, empty, or an earlier lmlab output "
                        "with --force)")
    parser.add_argument("--format", choices=["lmlab", "hf"], default="lmlab",
                        help="lmlab's own format (default) or a Hugging Face directory that transformers loads")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT when it holds an earlier lmlab output (a directory lmlab did not write "
                             "is never replaced)")


def run(args: argparse.Namespace) -> int:
    # imported here, not at the top: the CLI imports this module to build its parser, and the flags are
    # checked before torch (2 s to import) is needed
    from lmlab.adapt.merge import merge_adapter

    path, merged = merge_adapter(args.source, args.adapter, args.out_dir, fmt=args.format, force=args.force)
    print(f"merged {merged} LoRA layers into {args.source}; wrote {path}")
    return 0
