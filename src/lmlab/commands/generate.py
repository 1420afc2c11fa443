"""`lmlab generate MODEL PROMPT`: stream a continuation (or a chat reply) to the terminal."""

from __future__ import annotations

import argparse
import sys


def add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """The decoding flags, shared with `lmlab summarize`; each maps to a GenerationConfig field."""
    g = parser.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"generate at most N tokens (default {max_new_tokens})")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", dest="do_sample", action="store_true", default=None,
                      help="draw each token at random from the filtered distribution (needed by the sampling flags)")
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="always the most likely token (default)")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="with --do-sample: divide the logits by T; < 1 sharpens, > 1 flattens (default 1.0)")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="with --do-sample: keep only the K most likely tokens (default 0: off)")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="with --do-sample: keep the smallest set of tokens whose probability reaches P (default 1.0: off)")
    g.add_argument("--min-p", type=float, default=None, metavar="P",
                   help="with --do-sample: drop tokens less likely than P times the most likely one (default 0: off)")
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="divide positive logits of tokens already in the text by R, multiply negative ones (default 1.0: off)")
    add_search_arguments(g)
    g.add_argument("--seed", type=int, default=None, help="sampling seed: same seed, same text")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable; TEXT is not printed)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="compute precision; auto: bf16 where the CPU/GPU has native bf16, else fp32 (default auto); "
                        "the path taken is printed to stderr")
    g.add_argument("--quantize", default=None, metavar="MODE",
                   help="run on quantized weights: int8, int4 (int4-g64, int4-g128), or native (a GGUF file at its "
                        "own precision); see docs/quantization.md")


def add_search_arguments(g) -> None:
    """--min-new-tokens, --no-repeat-ngram-size, --num-beams, --length-penalty: the decoding settings a
    recipe can store (shared with `lmlab lab`)."""
    g.add_argument("--min-new-tokens", type=int, default=None, metavar="N",
                   help="suppress end-of-sequence until N tokens were generated (default 0)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                   help="never repeat an n-gram of N tokens (default 0: off)")
    g.add_argument("--num-beams", type=int, default=None, metavar="N",
                   help="beam search with N beams (default 1: greedy or sampling)")
    g.add_argument("--length-penalty", type=float, default=None, metavar="A",
                   help="beam search: finished beams are scored sum(log p) / length ** A (default 1.0)")


# flags that only shape the distribution tokens are drawn from: without --do-sample they would change nothing
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p")


def generation_config(args: argparse.Namespace):
    """GenerationConfig from the decoding flags that were given (validated there).

    A sampling flag without --do-sample is an error rather than silently ignored: greedy search takes the
    most likely token whatever the temperature or filters, so the flag would have no effect.
    """
    from lmlab.errors import ConfigError
    from lmlab.generation import GenerationConfig

    fields = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
              "repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty", "seed")
    kwargs = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.stop:
        kwargs["stop_strings"] = list(args.stop)
    config = GenerationConfig(**kwargs)  # bad values first: each error names its value
    given = [f"--{f.replace('_', '-')} {getattr(args, f)}" for f in SAMPLING_FLAGS if getattr(args, f) is not None]
    if given and not config.do_sample:
        raise ConfigError(f"{', '.join(given)} without --do-sample changes nothing (greedy search always takes "
                          "the most likely token); add --do-sample")
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmlab.cli import add_engine_argument

    add_engine_argument(parser)
    parser.add_argument("model", help="registry name (e.g. smollm2-135m-instruct), .gguf file, or model directory")
    parser.add_argument("prompt", help="the prompt text; '-' reads it from stdin")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a LoRA adapter directory (PEFT format, e.g. from lmlab finetune) applied to MODEL")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    structured = parser.add_argument_group("structured output").add_mutually_exclusive_group()
    structured.add_argument("--json-schema", default=None, metavar="FILE",
                            help="the output must be JSON valid against this JSON schema (a file, or the schema text); "
                                 "see docs/structured.md for the supported keywords")
    structured.add_argument("--json-object", action="store_true", help="the output must be a JSON object (any keys)")
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import lmlab
    from lmlab.errors import ConfigError
    from lmlab.generation import stream
    from lmlab.prompting import chat_prompt
    from lmlab.precision import apply_precision

    if args.system and not args.chat:
        raise ConfigError("--system needs --chat (a system message only exists in a chat template)")
    config = generation_config(args)  # validate flags before loading anything
    schema = None
    if args.json_schema is not None:
        from lmlab.generation.constrain import check_schema, load_schema

        schema = load_schema(args.json_schema)
        check_schema(schema)  # a bad schema fails before the model loads
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = lmlab.load_model(args.model, adapter=args.adapter, quantize=args.quantize)
    tokenizer = lmlab.load_tokenizer(args.model)
    print(f"precision: {apply_precision(model, args.precision)}", file=sys.stderr)
    constraint = None
    if schema is not None or args.json_object:
        from lmlab.generation.constrain import Constraint
        from lmlab.generation.decode import resolve_config

        eos = resolve_config(model, config, tokenizer).eos_token_ids
        constraint = Constraint(tokenizer, schema, kind="json_schema" if schema is not None else "json_object",
                                vocab_size=model.config.vocab_size, eos_token_ids=eos)
        config = config.replace(constraint=constraint)
    if args.chat:
        prompt = chat_prompt(tokenizer, prompt, args.system)
    text = ""
    for piece in stream(model, tokenizer, prompt, config):
        text += piece
        print(piece, end="", flush=True)
    print()
    if constraint is not None:
        constraint.parse_output(text)  # complete and valid, or one line saying max_new_tokens cut it short
    return 0
