"""`lmlab inspect MODEL --text TEXT`: record what every part of the model computes on one text
(``lmlab.inspect``) and write it as JSON, a self-contained HTML page, and/or PNG figures; see docs/inspect.md."""

from __future__ import annotations

import argparse
import json
import sys


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="registry name (smollm2-135m-instruct, all-minilm-l6-v2), .gguf file, model "
                                      "directory, or random:PRESET (random weights of a preset, e.g. random:t5-small)")
    parser.add_argument("--text", required=True, help="the text to run through the model (an encoder-decoder's input)")
    parser.add_argument("--target", default=None, help="encoder-decoders only: the decoder's text so far")
    parser.add_argument("--tokenizer", default=None, metavar="SOURCE",
                        help="tokenizer source (default: the model's own; random:PRESET uses all-minilm-l6-v2)")
    parser.add_argument("--json", default=None, metavar="OUT.json", help="write the Inspection as JSON")
    parser.add_argument("--html", default=None, metavar="OUT.html", help="write a self-contained interactive page")
    parser.add_argument("--png", default=None, metavar="DIR", help="write matplotlib figures into DIR")
    parser.add_argument("--layers", type=_int_list, default=None, metavar="I,J,...",
                        help="record attention weights for these layers only (default: all)")
    parser.add_argument("--layer", type=int, default=None, help="the layer the figures and page open on (default: last)")
    parser.add_argument("--head", type=int, default=0, help="the head the page opens on (default 0)")
    parser.add_argument("--steps", type=int, default=3, metavar="N",
                        help="precompute N greedy decoding steps for the page's step button and the JSON (default 3)")
    parser.add_argument("--summarize", action="store_true",
                        help="TEXT is a dialogue: summarize it with the fine-tuned summarizer lmlab ships for MODEL and "
                             "shade each turn by the attention the summary paid to it")
    s = parser.add_argument_group("sampling filter (the logits processors generate uses)")
    s.add_argument("--temperature", type=float, default=1.0, metavar="T")
    s.add_argument("--top-k", type=int, default=0, metavar="K")
    s.add_argument("--top-p", type=float, default=1.0, metavar="P")
    s.add_argument("--min-p", type=float, default=0.0, metavar="P")


def run(args: argparse.Namespace) -> int:
    from lmlab.errors import DataError
    from lmlab.inspect import inspect_model, load_for_inspection, write_html, write_pngs
    from lmlab.inspect.core import sampling_chain

    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    sampling_chain(**sampling)  # bad values before loading anything
    if args.steps < 0:
        raise DataError(f"--steps {args.steps} must be >= 0")
    if args.summarize:
        from lmlab.inspect.turns import require_summarizer

        require_summarizer(args.model)
    model, tokenizer, name = load_for_inspection(args.model, args.tokenizer)
    steps = args.steps if (args.html or args.json) else 0  # only the page and the JSON show them
    insp = inspect_model(model, tokenizer, args.text, args.target, layers=args.layers, steps=steps,
                         name=name, **sampling)
    if args.summarize:
        from lmlab.inspect.turns import summarize_turns

        insp.summary_turns = summarize_turns(args.model, args.text)
    layer = insp.layers[insp.main_stack][-1] if args.layer is None else args.layer
    insp.attention(layer, args.head)  # a layer or head out of range fails here, naming it
    if args.json:
        with open(args.json, "w") as f:
            json.dump(insp.to_json(), f)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.html:
        write_html(insp, args.html, layer=layer, head=args.head)
        print(f"wrote {args.html}", file=sys.stderr)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window
        for path in write_pngs(insp, args.png, layer=layer):
            print(f"wrote {path}", file=sys.stderr)
    print(insp.summary())
    return 0
