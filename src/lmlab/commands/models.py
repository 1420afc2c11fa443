"""`lmlab models`: the models lmlab knows by name, their size, and whether each is installed here."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the listing as JSON")


def run(args: argparse.Namespace) -> int:
    from lmlab.checkpoints import registry

    rows = registry.listing()
    print(json.dumps(rows, indent=2) if args.json else registry.format_listing(rows))
    return 0
