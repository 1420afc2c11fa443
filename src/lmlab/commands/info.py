"""`lmlab info SOURCE`: a model's architecture, size, context length and memory needs (config only)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="registry name, .gguf file, HF or lmlab directory, or hub id org/name")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args: argparse.Namespace) -> int:
    from lmlab.checkpoints import describe, format_description

    info = describe(args.source)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0
