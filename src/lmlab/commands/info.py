"""`lmlab info SOURCE`: a model's architecture, size, context length and memory needs (config only),
the compute precision ``--precision auto`` takes on this machine (``lmlab.precision``) and the decode
engine generation runs (``lmlab.engine``)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="registry name, .gguf file, HF or lmlab directory, or hub id org/name")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args: argparse.Namespace) -> int:
    from lmlab.checkpoints import describe, format_description
    from lmlab.precision import describe_precision

    from lmlab.checkpoints import load_config
    from lmlab.engine import describe as describe_engine

    info = describe(args.source)
    precision = describe_precision("auto")  # generate / summarize / lab / pretrain default to auto
    engine = describe_engine(config=load_config(args.source)[0])
    if args.json:
        print(json.dumps(dict(info, precision_auto=precision, engine=engine), indent=2))
    else:
        print(format_description(info))
        print(f"  precision on this machine: {precision}")
        print(f"  decode engine: {engine}")
    return 0
