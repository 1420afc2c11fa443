"""`lmlab quantize SOURCE OUT --bits 8|4 [--group-size 32|64|128]`: a weight-only quantized checkpoint.

Maps flags onto ``lmlab.quant.model.quantize_checkpoint``; the format is in docs/quantization.md.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="the float model: registry name, .gguf file, HF or lmlab directory")
    parser.add_argument("out_dir", help="directory for the quantized checkpoint")
    parser.add_argument("--bits", type=int, required=True, help="8 (int8, one scale per output channel) or 4 "
                        "(int4, a scale and minimum per group of inputs)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="int4 only: inputs per scale/minimum, 32, 64 or 128 (default 32)")
    parser.add_argument("--layers", default=None,
                        help="comma-separated layer names to quantize (short names like q,k,v,o,gate,up,down,lm_head "
                             "or full names; default: every linear layer)")


def run(args: argparse.Namespace) -> int:
    from lmlab.quant.model import quantize_checkpoint

    path, report = quantize_checkpoint(args.source, args.out_dir, args.bits, args.group_size, args.layers)
    print(f"{report}\nwrote {path}")
    return 0
