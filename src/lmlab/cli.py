"""The `lmlab` command line: one table of commands, each mapped to a module in `lmlab.commands`.

A command module defines ``add_arguments(parser)`` and ``run(args) -> int``; it holds no model logic,
only the mapping from flags to documented library functions. Modules are imported lazily, so
`lmlab --help` and `lmlab rouge` do not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("lmlab.commands.info", "show a model's architecture, size, context and memory needs"),
    "generate": ("lmlab.commands.generate", "generate text from a prompt (streams to the terminal)"),
    "summarize": ("lmlab.commands.summarize", "summarize one dialogue with zero/one/few-shot prompting"),
    "lab": ("lmlab.commands.lab", "run the dialogue-summarization lab and score it with ROUGE"),
    "rouge": ("lmlab.commands.rouge", "score prediction files against references with ROUGE"),
    "tokenizer": ("lmlab.commands.tokenizer", "train a BPE or Unigram tokenizer"),
    "pretrain": ("lmlab.commands.pretrain", "pre-train a Transformer (causal LM, masked LM, span corruption)"),
    "export": ("lmlab.commands.export", "export an lmlab checkpoint to Hugging Face format"),
    "plan": ("lmlab.commands.plan", "estimate memory (training/inference, DDP/ZeRO/FSDP) and plan compute-optimal training"),
}


def set_threads(value: str | int | None) -> None:
    """Set torch's intra-op thread count from --threads or LMLAB_NUM_THREADS (unset: torch's default)."""
    value = value if value not in (None, "") else os.environ.get("LMLAB_NUM_THREADS")
    if value in (None, ""):
        return
    try:
        n = int(value)
        if n < 1:
            raise ValueError
    except ValueError:
        raise SystemExit(f"error: threads={value!r} must be a positive integer") from None
    import torch

    torch.set_num_threads(n)


def build_parser(load_commands: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=None,
                        help="torch CPU threads (default: $LMLAB_NUM_THREADS, else torch's default)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load_commands is None or name in load_commands:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only import the module of the command being run (keeps start-up fast).
    chosen = [a for a in argv if a in COMMANDS][:1]
    parser = build_parser(load_commands=chosen or [])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from lmlab.errors import LmlabError

    try:
        set_threads(args.threads)
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except LmlabError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
