"""`lmlab generate MODEL PROMPT`: stream a continuation (or a chat reply) to the terminal."""

from __future__ import annotations

import argparse
import sys


def add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """The decoding flags, shared with `lmlab summarize`; each maps to a GenerationConfig field."""
    g = parser.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    g.add_argument("--min-new-tokens", type=int, default=None, help="suppress end-of-sequence until this many")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", dest="do_sample", action="store_true", default=None, help="sample tokens")
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="always the most likely token (default)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--no-repeat-ngram-size", type=int, default=None)
    g.add_argument("--num-beams", type=int, default=None, help="beam search with this many beams")
    g.add_argument("--length-penalty", type=float, default=None, help="beam search: score / length ** this")
    g.add_argument("--seed", type=int, default=None, help="sampling seed: same seed, same text")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable; TEXT is not printed)")


def generation_config(args: argparse.Namespace):
    """GenerationConfig from the decoding flags that were given (validated there)."""
    from lmlab.generation import GenerationConfig

    fields = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
              "repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty", "seed")
    kwargs = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.stop:
        kwargs["stop_strings"] = list(args.stop)
    return GenerationConfig(**kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="registry name (e.g. smollm2-135m-instruct), .gguf file, or model directory")
    parser.add_argument("prompt", help="the prompt text; '-' reads it from stdin")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import lmlab
    from lmlab.errors import ConfigError
    from lmlab.generation import stream
    from lmlab.prompting import chat_prompt

    if args.system and not args.chat:
        raise ConfigError("--system needs --chat (a system message only exists in a chat template)")
    config = generation_config(args)  # validate flags before loading anything
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = lmlab.load_model(args.model), lmlab.load_tokenizer(args.model)
    if args.chat:
        prompt = chat_prompt(tokenizer, prompt, args.system)
    for piece in stream(model, tokenizer, prompt, config):
        print(piece, end="", flush=True)
    print()
    return 0
