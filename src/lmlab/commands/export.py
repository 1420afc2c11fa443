"""`lmlab export SOURCE OUT_DIR`: write any loadable model as a Hugging Face directory."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="registry name, .gguf file, HF or lmlab directory, or hub id org/name")
    parser.add_argument("out_dir", help="directory to write config.json + model.safetensors (+ tokenizer) into")
    parser.add_argument("--no-tokenizer", action="store_true", help="export the weights only")


def run(args: argparse.Namespace) -> int:
    from lmlab.checkpoints import export_source

    path = export_source(args.source, args.out_dir, with_tokenizer=not args.no_tokenizer)
    print(f"wrote {path}")
    return 0
