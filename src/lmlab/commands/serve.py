"""`lmlab serve MODEL`: an OpenAI-compatible HTTP server with continuous batching and a web playground."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.cli import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmlab.cli import add_engine_argument

    add_engine_argument(parser)
    parser.add_argument("model", help="registry name (e.g. smollm2-135m-instruct), .gguf file, or model directory")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a LoRA adapter directory (lmlab finetune writes them); enables the fine-tuned summarizer")
    parser.add_argument("--quantize", default=None, metavar="MODE",
                        help="weight-only quantization: int8, int4 (int4-g64, int4-g128), or native (a GGUF file at "
                             "its own precision); see docs/quantization.md")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on /v1/ endpoints (default: no key)")
    parser.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                        help="requests decoded together, each in its own KV-cache slot (default 16)")
    parser.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                        help="requests waiting for a slot before new ones get 429 (default 64)")
    parser.add_argument("--prefill-tokens", type=positive_int, default=512, metavar="N",
                        help="prompt tokens prefilled between two decode steps; longer prompts go in chunks of N "
                             "(default 512; larger: newcomers batched more, running streams stall longer)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="S",
                        help="seconds a request may take, queue included, before it is ended (default 600)")
    parser.add_argument("--shots", choices=["nearest", "random"], default="nearest",
                        help="how /v1/summarize picks its one/few-shot examples from the bundled dialogues "
                             "(default nearest: all-MiniLM-L6-v2 neighbours, the lab's best recipe)")
    parser.add_argument("--prefs-out", default=None, metavar="FILE",
                        help="the playground's compare tab appends people's choices to this preferences JSONL "
                             "(default: the tab is read-only)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def load_kwargs(load_model, adapter: str | None, quantize: str | None) -> dict:
    """Keyword arguments for ``load_model`` from --adapter/--quantize, checked against what it accepts."""
    import inspect

    from lmlab.errors import ConfigError

    accepted = inspect.signature(load_model).parameters
    kwargs = {}
    for flag, name, value in (("--adapter", "adapter", adapter), ("--quantize", "quantize", quantize)):
        if value is None:
            continue
        if name not in accepted:
            raise ConfigError(f"{flag} {value}: not available yet (lmlab.load_model has no {name!r} option in this version)")
        kwargs[name] = value
    return kwargs


def run(args: argparse.Namespace) -> int:
    import lmlab
    from lmlab.errors import ConfigError
    from lmlab.serve import ServeSettings, serve

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} must be in 1..65535")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout {args.timeout} must be > 0 seconds")
    kwargs = load_kwargs(lmlab.load_model, args.adapter, args.quantize)  # before the server starts
    finetuned = None
    from lmlab.adapt.recipe import RECIPE_FILE

    if args.adapter:
        from lmlab.serve.app import finetuned_recipe

        finetuned = finetuned_recipe(args.adapter)
    elif (Path(args.model) / RECIPE_FILE).is_file():  # a fully fine-tuned or distilled model brings its recipe
        from lmlab.adapt.recipe import Recipe

        finetuned = Recipe.load(args.model)
    settings = ServeSettings(model_name=args.model, api_key=args.api_key, max_batch=args.max_batch,
                             max_queue=args.max_queue, timeout=args.timeout, shot_method=args.shots,
                             finetuned=finetuned, prefs_out=args.prefs_out, prefill_tokens=args.prefill_tokens)

    def loader():
        return lmlab.load_model(args.model, **kwargs), lmlab.load_tokenizer(args.model)

    print(f"lmlab serve: loading {args.model}; http://{args.host}:{args.port}/ (playground), "
          f"/v1 (OpenAI API), /health, /metrics", flush=True)
    serve(loader, settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0
