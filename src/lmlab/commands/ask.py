"""`lmlab ask INDEX "question"`: an answer grounded in an index, with its sources; or, with --summarize,
a one-line summary of each retrieved dialogue.

Maps flags onto ``lmlab.index.ask`` (retrieve, prompt with numbered sources within the context budget,
stream, drop invented citations) and ``lmlab.index.summarize_hits`` with the fine-tuned summarizer that
``lmlab summarize`` uses by default.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmlab.cli import add_engine_argument, positive_int
    from lmlab.commands.generate import add_generation_arguments
    from lmlab.commands.index import MODES  # not lmlab.index: that loads torch

    add_engine_argument(parser)

    parser.add_argument("index", help="the index directory (lmlab index build)")
    parser.add_argument("question", help="the question (with --summarize: what to summarize everything about)")
    parser.add_argument("-k", type=positive_int, default=4, help="documents to retrieve (default: %(default)s)")
    parser.add_argument("--mode", choices=MODES, default="hybrid", help="retrieval: dense, bm25 or hybrid (default)")
    parser.add_argument("--filter", action="append", default=None, metavar="FIELD=VALUE",
                        help="retrieve only documents whose metadata FIELD equals VALUE (repeatable)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="default: smollm2-135m-instruct")
    parser.add_argument("--show-context", action="store_true", help="print the prompt with its sources to stderr")
    parser.add_argument("--summarize", action="store_true",
                        help="summarize everything about QUESTION: one line per retrieved dialogue, with its citation, "
                             "by the fine-tuned summarizer lmlab summarize uses")
    parser.add_argument("--no-adapter", action="store_true",
                        help="with --summarize: prompt the base model instead of the shipped fine-tuned summarizer")
    add_generation_arguments(parser, max_new_tokens=128)


def run(args: argparse.Namespace) -> int:
    import lmlab
    from lmlab.commands.generate import generation_config
    from lmlab.index import Index, grounded_answer
    from lmlab.precision import apply_precision

    config = generation_config(args)
    if args.no_adapter and not args.summarize:
        from lmlab.errors import ConfigError

        raise ConfigError("--no-adapter applies to --summarize (answers always come from the base model)")
    index = Index(args.index)  # a missing index or another encoder fails before the model loads
    if args.summarize:
        return _summarize(args, index, config)
    model = lmlab.load_model(args.model, quantize=args.quantize)
    tokenizer = lmlab.load_tokenizer(args.model)
    print(f"precision: {apply_precision(model, args.precision)}", file=sys.stderr)
    answer, pieces = grounded_answer(model, tokenizer, index, args.question, k=args.k, config=config,
                                     mode=args.mode, filter=args.filter)
    if args.show_context:
        print(answer.prompt, file=sys.stderr)
        print(f"--- {len(tokenizer.encode(answer.prompt))} prompt tokens, {len(answer.sources)} sources",
              file=sys.stderr)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    if answer.invented:
        print(f"note: removed citations of sources that were not retrieved: "
              f"{', '.join(f'[{i}]' for i in answer.invented)}", file=sys.stderr)
    print("\nsources:")
    for n, s in enumerate(answer.sources, 1):
        mark = "*" if s.id in answer.cited else " "
        meta = "  ".join(f"{k}={v}" for k, v in s.meta.items())
        text = s.text.replace("\n", " / ")
        print(f"{mark} {n}. [{s.id}] score {s.score:.4f} {meta}".rstrip())
        print(f"     {text[:200]}{'...' if len(text) > 200 else ''}")
    return 0


def _summarize(args: argparse.Namespace, index, config) -> int:
    """One line per retrieved dialogue by the fine-tuned summarizer (as lmlab summarize picks it)."""
    import lmlab
    from lmlab.adapt.recipe import Recipe, shipped_adapter
    from lmlab.index import summarize_hits
    from lmlab.prompting import summarize
    from lmlab.precision import apply_precision

    adapter = None if args.no_adapter else shipped_adapter(args.model)
    template, chat, instruction = "instruction", None, None
    recipe = Recipe.load(adapter) if adapter is not None else None
    if recipe is not None:  # the prompt the adapter was trained on
        template, chat, instruction = recipe.template, recipe.chat, recipe.instruction
    if adapter is not None:
        print(f"fine-tuned summarizer: adapter {adapter} (--no-adapter prompts the base model)", file=sys.stderr)
    model = lmlab.load_model(args.model, adapter=adapter, quantize=args.quantize)
    tokenizer = lmlab.load_tokenizer(args.model)
    print(f"precision: {apply_precision(model, args.precision)}", file=sys.stderr)

    def one(text: str) -> str:
        summary, _ = summarize(text, model, tokenizer, template=template, chat=chat, config=config,
                               instruction=instruction)
        return " ".join(summary.split())

    for doc_id, summary in summarize_hits(index, args.question, one, k=args.k, mode=args.mode, filter=args.filter):
        print(f"- {summary} [{doc_id}]", flush=True)
    return 0
