"""`lmlab info SOURCE`: a model's architecture, size, context length and memory needs (config only),
and the compute precision ``--precision auto`` takes on this machine (``lmlab.precision``)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="registry name, .gguf file, HF or lmlab directory, or hub id org/name")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args: argparse.Namespace) -> int:
    from lmlab.checkpoints import describe, format_description
    from lmlab.precision import describe_precision

    info = describe(args.source)
    precision = describe_precision("auto")  # generate / summarize / lab / pretrain default to auto
    if args.json:
        print(json.dumps(dict(info, precision_auto=precision), indent=2))
    else:
        print(format_description(info))
        print(f"  precision on this machine: {precision}")
    return 0
