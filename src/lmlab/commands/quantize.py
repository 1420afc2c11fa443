"""`lmlab quantize SOURCE OUT --bits 8|4 [--group-size 32|64|128] [--force]`: a weight-only quantized checkpoint.

Maps flags onto ``lmlab.quant.checkpoint.quantize_checkpoint``; the format is in docs/quantization.md,
the rules for OUT (never the source, never a directory lmlab did not write) in docs/checkpoints.md.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="the float model: registry name, .gguf file, HF or lmlab directory")
    parser.add_argument("out_dir", help="directory for the quantized checkpoint (new, empty, or an earlier lmlab "
                        "output with --force)")
    parser.add_argument("--bits", type=int, required=True, help="8 (int8, one scale per output channel) or 4 "
                        "(int4, a scale and minimum per group of inputs)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="int4 only: inputs per scale/minimum, 32, 64 or 128 (default 32)")
    parser.add_argument("--layers", default=None,
                        help="comma-separated layer names to quantize (short names like q,k,v,o,gate,up,down,lm_head "
                             "or full names; default: every linear layer)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT when it holds an earlier lmlab output (a directory lmlab did not write "
                             "is never replaced)")


def run(args: argparse.Namespace) -> int:
    # imported here, not at the top: the CLI imports this module to build its parser, and the flags are
    # checked before torch (2 s to import) is needed
    from lmlab.quant.checkpoint import quantize_checkpoint

    path, report = quantize_checkpoint(args.source, args.out_dir, args.bits, args.group_size, args.layers,
                                       force=args.force)
    print(f"{report}\nwrote {path}")
    return 0
