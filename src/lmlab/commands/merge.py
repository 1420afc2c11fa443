"""`lmlab merge SOURCE ADAPTER OUT`: fold a LoRA adapter into its base model's weights and save the result."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="the base model: registry name, .gguf file, HF or lmlab directory")
    parser.add_argument("adapter", help="LoRA adapter directory (PEFT format: adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out_dir", help="directory for the merged model")
    parser.add_argument("--format", choices=["lmlab", "hf"], default="lmlab",
                        help="lmlab's own format (default) or a Hugging Face directory that transformers loads")


def run(args: argparse.Namespace) -> int:
    from lmlab.adapt.merge import merge_adapter

    path, merged = merge_adapter(args.source, args.adapter, args.out_dir, fmt=args.format)
    print(f"merged {merged} LoRA layers into {args.source}; wrote {path}")
    return 0
