"""The `lmlab` command line: one table of commands, each mapped to a module in `lmlab.commands`.

A command module defines ``add_arguments(parser)`` and ``run(args) -> int``; it holds no model logic,
only the mapping from flags to documented library functions. Command modules are imported lazily, and
building any command's parser imports no torch (tests/test_cli.py checks it): importing torch takes
1-10 s on a busy CPU, while `lmlab --help`, `lmlab rouge` and every `lmlab COMMAND --help` start in
about 0.2-0.5 s.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lmlab import __version__
from lmlab.errors import ConfigError, LmlabError

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
    "serve": ("lmlab.commands.serve", "serve a model: OpenAI-compatible HTTP API with continuous batching, and a playground"),
    "finetune": ("lmlab.commands.finetune", "fine-tune a model on (prompt, response) pairs: full or LoRA"),
    "merge": ("lmlab.commands.merge", "fold a LoRA adapter into its base model and save the merged weights"),
    "quantize": ("lmlab.commands.quantize", "write an int8 or int4 weight-only quantized checkpoint"),
    "align": ("lmlab.commands.align", "align a model with preference pairs: DPO of a LoRA policy (reference: adapters off)"),
    "distill": ("lmlab.commands.distill", "distill a teacher into a smaller student with unlabeled data "
                "(sequence- or token-level)"),
    "sweep": ("lmlab.commands.sweep", "a grid of training recipes and decodings scored with ROUGE; resumable, one table"),
    "scaling": ("lmlab.commands.scaling", "scaling laws on your own runs: sweep a grid of small decoders, fit L(N, D)"),
    "plan": ("lmlab.commands.plan", "estimate memory (training/inference, DDP/ZeRO/FSDP) and plan compute-optimal training"),
    "prefs": ("lmlab.commands.prefs", "preference pairs: build them from labeled dialogues, or label pairs by hand"),
    "reward": ("lmlab.commands.reward", "train a reward model on preference pairs, score summaries with it"),
    "index": ("lmlab.commands.index", "an embedded vector + BM25 index of your own documents: build, search, remove"),
    "ask": ("lmlab.commands.ask", "answer a question from an index, citing the retrieved dialogues; or summarize "
            "everything about a topic"),
    "extract": ("lmlab.commands.extract", "structured-output example: extract {speakers, topic, decision, amount} "
                "from dialogues as schema-valid JSON, scored against the summaries"),
    "inspect": ("lmlab.commands.inspect", "look inside a model: tokens, embeddings, positions, attention, logit lens, "
                "sampling filter (JSON, HTML, PNG)"),
    "models": ("lmlab.commands.models", "list the registry's models: size, source, and whether each is installed here"),
}


def positive_int(text: str) -> int:
    """argparse type for counts such as --threads: '4' -> 4; '0', '-1', '2.5' and 'two' are errors."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer (1 or more)")
    return value


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count from --threads, else LMLAB_NUM_THREADS (both unset: torch's default)."""
    if threads is None:
        text = os.environ.get("LMLAB_NUM_THREADS", "").strip()
        if not text:
            return
        try:
            threads = positive_int(text)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"LMLAB_NUM_THREADS={text!r}: {exc}") from None
    import torch  # here, not at the top: only a command that computes pays for torch (see the module docstring)

    torch.set_num_threads(threads)


def add_engine_argument(parser: argparse.ArgumentParser) -> None:
    """``--engine`` on a command that generates: which decode engine runs each step (``lmlab.engine``)."""
    parser.add_argument("--engine", choices=["auto", "compiled", "native", "aoti", "eager"], default=None,
                        help="decode engine: native = lmlab's C++ step, compiled = the best compiled one, eager = "
                             "PyTorch modules; auto (default, or $LMLAB_ENGINE): native where built and supported")


class _Parser(argparse.ArgumentParser):
    """argparse with lmlab's one-line errors: ``error: lmlab plan memory: argument --precision: invalid choice ...``."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(load_commands: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="lmlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lmlab {__version__}")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="torch CPU threads, a positive integer (default: $LMLAB_NUM_THREADS, else torch's default)")
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and flag errors: return the code instead of exiting
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        set_threads(args.threads)
        if getattr(args, "engine", None) is not None:
            from lmlab.engine import set_default

            set_default(args.engine)  # the generation driver reads it (and child processes inherit it)
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
