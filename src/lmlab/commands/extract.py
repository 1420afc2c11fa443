"""`lmlab extract`: the lab's structured-output example. Extract {speakers, topic, decision, amount} from DialogSum
dialogues as JSON, with the grammar (``json_schema``) and as free text, and score each field against the summaries.

Maps flags onto ``lmlab.tasks.summarize.extract.run_extraction``; the scoring rules are in that module's docstring.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmlab.align.prefs import DEFAULT_DATA
    from lmlab.cli import add_engine_argument

    add_engine_argument(parser)

    parser.add_argument("--model", default="smollm2-135m-instruct", help="default: %(default)s")
    parser.add_argument("--data", default=DEFAULT_DATA, help="labeled dialogues, DialogSum JSONL (default: %(default)s)")
    parser.add_argument("--records", default="400:500", help="start:stop over the records (default: %(default)s)")
    parser.add_argument("--decoding", choices=["both", "grammar", "free"], default="both",
                        help="grammar: constrained to the schema; free: the same prompt unconstrained (default: both)")
    parser.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="default: %(default)s")
    parser.add_argument("--out", default=None, metavar="FILE.jsonl", help="write every output and its field scores here")


def run(args: argparse.Namespace) -> int:
    import lmlab
    from lmlab.errors import ConfigError, DataError
    from lmlab.tasks.summarize.extract import report, run_extraction

    start, sep, stop = args.records.partition(":")
    try:
        lo, hi = int(start), int(stop)
    except ValueError:
        raise ConfigError(f"--records {args.records!r} must be START:STOP, e.g. 400:500") from None
    with open(args.data, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()][lo:hi]
    if not records:
        raise DataError(f"--records {args.records!r} selects no records of {args.data!r}")
    model, tok = lmlab.load_model(args.model), lmlab.load_tokenizer(args.model)
    results = [run_extraction(records, model, tok, constrained=c, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, progress=True)
               for c in {"both": (True, False), "grammar": (True,), "free": (False,)}[args.decoding]]
    print(report(results, len(records)))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for r in results:
                for o in r.outputs:
                    f.write(json.dumps({"decoding": "grammar" if r.constrained else "free", **o}) + "\n")
        print(f"outputs: {args.out}", file=sys.stderr)
    return 0
