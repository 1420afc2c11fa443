"""`lmlab export SOURCE OUT_DIR [--force]`: write any loadable model as a Hugging Face directory.

OUT_DIR follows the output rules of docs/checkpoints.md: never the source, never a directory lmlab did
not write, an earlier lmlab output only with --force.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="registry name, .gguf file, HF or lmlab directory, or hub id org/name")
    parser.add_argument("out_dir", help="directory to write config.json + model.safetensors (+ tokenizer) into "
                        "(new, empty, or an earlier lmlab output with --force)")
    parser.add_argument("--no-tokenizer", action="store_true", help="export the weights only")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT_DIR when it holds an earlier lmlab output (a directory lmlab did not "
                             "write is never replaced)")


def run(args: argparse.Namespace) -> int:
    # imported here, not at the top: the CLI imports this module to build its parser, and the flags are
    # checked before torch (2 s to import) is needed
    from lmlab.checkpoints.export import export_source

    path = export_source(args.source, args.out_dir, with_tokenizer=not args.no_tokenizer, force=args.force)
    print(f"wrote {path}")
    return 0
