"""`lmlab serve MODEL`: an OpenAI-compatible HTTP server with continuous batching and a web playground.

It fails fast, in this order, each with one line and exit status 2 before any request can be taken: a
bad flag (port, timeout, quantization mode, a missing adapter directory, a missing --index), a port it cannot listen on
(bound here, before the model loads), a model source it cannot find or serve (its config is read
first), then the model's own loading. Only then does the server start, on the socket bound here.

``--engine auto|native|eager`` picks the decode step of the continuous batch (``lmlab.engine.serving``):
auto runs lmlab's native C++ step where it is built and supports the model, else eager; the banner and
``/metrics`` (``lmlab_engine_info``) say which runs.

Like ``lmlab summarize``, it serves the fine-tuned summarizer lmlab ships for the model (the LoRA adapter
of ``lmlab.adapt.recipe.shipped_adapter``) unless ``--adapter DIR`` names another or ``--no-adapter``
asks for the base model; the adapter's prompt recipe is then /v1/summarize's default. ``--student [DIR]``
serves a distilled student bundle instead (``lmlab.adapt.student``; without DIR the one lmlab ships for
MODEL), named ``MODEL+student:NAME`` in /v1/models (NAME: the bundle's directory, RUN/best for a run's), its recipe /v1/summarize's default.
"""

from __future__ import annotations

import argparse
import errno
import socket
from pathlib import Path

import lmlab
from lmlab.cli import positive_int
from lmlab.errors import CheckpointError, ConfigError, LmlabError

# The serving stack (torch, the model, Starlette) is imported inside the functions below, not here: the CLI
# imports this module to build `lmlab serve --help`, which should not pay the seconds of importing torch.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmlab.cli import add_engine_argument

    add_engine_argument(parser)
    parser.add_argument("model", nargs="?", default=None,
                        help="registry name (e.g. smollm2-135m-instruct), .gguf file, or model directory (optional "
                             "with --student DIR: the bundle's own base model)")
    adapter = parser.add_mutually_exclusive_group()
    adapter.add_argument("--adapter", default=None, metavar="DIR",
                         help="a LoRA adapter directory (lmlab finetune writes them), served as the fine-tuned "
                              "summarizer. Default: the adapter lmlab ships for the model, as lmlab summarize does")
    adapter.add_argument("--no-adapter", action="store_true", help="serve the base model, without the shipped adapter")
    adapter.add_argument("--student", nargs="?", const="shipped", default=None, metavar="DIR",
                         help="serve a distilled student bundle (lmlab distill with student.lora; its recipe is "
                              "/v1/summarize's default); without DIR: the student lmlab ships for MODEL")
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
    parser.add_argument("--index", default=None, metavar="INDEX",
                        help="an index from lmlab index build: adds POST /v1/embeddings, POST /v1/search, retrieval "
                             "for chat completions (\"retrieval\": {\"k\": 4}) and the playground's Ask tab")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening (what uvicorn would open) -> it; ConfigError in one line
    when that address cannot be had (the port is in use, a privileged port, an unknown host)."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} must be in 1..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a TIME_WAIT port is free
        sock.bind(address)
        sock.listen(2048)  # held from now on: connections made while the model loads wait in the backlog
    except OSError as exc:
        sock.close()
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def chosen_adapter(args: argparse.Namespace) -> Path | None:
    """--adapter DIR (which must exist), else the adapter lmlab ships for the model unless --no-adapter."""
    from lmlab.adapt.recipe import shipped_adapter

    if args.adapter is not None:
        if not Path(args.adapter).is_dir():
            raise ConfigError(f"--adapter {args.adapter}: no such directory (a LoRA adapter from lmlab finetune)")
        return Path(args.adapter)
    return None if args.no_adapter else shipped_adapter(args.model)


def chosen_student(args: argparse.Namespace) -> Path | None:
    """--student DIR (a bundle, checked now), --student alone (the one lmlab ships for MODEL), or None."""
    from lmlab.adapt.recipe import resolve_student
    from lmlab.adapt.student import read_bundle

    if args.student is None:
        if args.model is None:
            raise ConfigError("give the MODEL to serve (or --student DIR, a distilled student bundle)")
        return None
    if args.student == "shipped" and args.model is None:
        raise ConfigError("--student without DIR serves the student lmlab ships for MODEL: give MODEL "
                          "(e.g. smollm2-135m-instruct) or --student DIR")
    student = resolve_student(args.student, args.model)
    read_bundle(student)  # a bad bundle fails before the port and the model
    return student


def load_for_serving(model: str | None, adapter: Path | None, quantize: str | None, student: Path | None = None):
    """The model (its adapter attached, or the student bundle over `model`; quantized if asked) and tokenizer,
    or a one-line LmlabError: the source is resolved and checked for serving from its config before any
    weights are read."""
    from lmlab.checkpoints import load_config
    from lmlab.serve.runner import check_servable

    source = student if student is not None else model
    try:
        config, _ = load_config(source)
        check_servable(config)
        if student is not None:
            loaded = lmlab.load_model(model, student=student, quantize=quantize) if model is not None else \
                lmlab.load_model(student, quantize=quantize)
            return loaded, lmlab.load_tokenizer(student)
        return lmlab.load_model(model, adapter=adapter, quantize=quantize), lmlab.load_tokenizer(model)
    except LmlabError:
        raise
    except Exception as exc:  # a loader's own error type (safetensors, json, gguf parsing): one line, not a traceback
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"cannot load {model!r}: {type(exc).__name__}: {detail}") from None


def run(args: argparse.Namespace) -> int:
    import lmlab.serve as serving  # looked up at call time: tests replace lmlab.serve.serve
    from lmlab.adapt.recipe import RECIPE_FILE, Recipe
    from lmlab.quant.model import parse_mode
    from lmlab.serve.app import ServeSettings, finetuned_recipe

    if not args.timeout > 0:
        raise ConfigError(f"--timeout {args.timeout} must be > 0 seconds")
    parse_mode(args.quantize)  # a bad mode fails here, before the port and the model
    student = chosen_student(args)
    adapter = chosen_adapter(args) if student is None else None
    index = None
    if args.index is not None:  # a missing index, or one from another encoder, fails before the port and the model
        from lmlab.index import Index

        index = Index(args.index)
    sock = listen(args.host, args.port)
    try:
        model, tokenizer = load_for_serving(args.model, adapter, args.quantize, student)
        name = args.model
        if student is not None:  # the student bundle brings its recipe; its name says it is the student
            finetuned = finetuned_recipe(student)
            from lmlab.adapt.student import read_bundle

            where = student.resolve()  # a run's best/ or final/ is named by its run directory too
            label = f"{where.parent.name}/{where.name}" if where.name in ("best", "final") else where.name
            name = f"{args.model or read_bundle(student).base_model}+student:{label}"
        elif adapter is not None:
            finetuned = finetuned_recipe(adapter)
        else:  # a fully fine-tuned or distilled model brings its recipe
            finetuned = Recipe.load(args.model) if (Path(args.model) / RECIPE_FILE).is_file() else None
        settings = ServeSettings(model_name=name, api_key=args.api_key, max_batch=args.max_batch,
                                 max_queue=args.max_queue, timeout=args.timeout, shot_method=args.shots,
                                 finetuned=finetuned, prefs_out=args.prefs_out, prefill_tokens=args.prefill_tokens,
                                 index=index)
        summarizer = (f"distilled student {student}" if student is not None else
                      f"fine-tuned summarizer: adapter {adapter}" if adapter is not None else "no adapter")
        if index is not None:
            summarizer += f"; index {args.index} ({len(index)} documents)"
        print(f"lmlab serve: {name} ({summarizer}) on http://{args.host}:{args.port}/ (playground), "
              f"/v1 (OpenAI API), /health, /metrics", flush=True)
        # the continuous batch's decode step: --engine (the CLI sets $LMLAB_ENGINE from it), default auto; the
        # server's scheduler reads $LMLAB_ENGINE (lmlab.engine.serving), set here for as long as it serves
        import os

        from lmlab.engine import ENV as ENGINE_ENV
        from lmlab.engine import default_name as default_engine
        from lmlab.engine import resolve as resolve_engine

        engine_env = os.environ.get(ENGINE_ENV)
        os.environ[ENGINE_ENV] = default_engine()
        try:
            print(f"lmlab serve: decode engine {resolve_engine(model)[1]}", flush=True)
            serving.serve(lambda: (model, tokenizer), settings, host=args.host, port=args.port,
                          log_level=args.log_level, sock=sock)
        finally:
            if engine_env is None:
                os.environ.pop(ENGINE_ENV, None)
            else:
                os.environ[ENGINE_ENV] = engine_env
    finally:
        sock.close()
    return 0
