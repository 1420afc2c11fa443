"""`lmlab prefs build|label`: make preference pairs from labeled dialogues, or label pairs by hand.

Maps flags onto ``lmlab.align.build.build_preferences`` and ``lmlab.align.label.label_pairs``; the
pairs' format is ``lmlab.align.prefs``.
"""

from __future__ import annotations

import argparse
import os
import sys

from lmlab.align.prefs import DEFAULT_DATA, POLICIES

# building and labelling (torch, the models) are imported in run(): `lmlab prefs --help` should not pay for torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="prefs_command", metavar="{build,label}", required=True)
    b = sub.add_parser("build", help="pairs: the human summary (chosen) against the model's own sampled one",
                       description="Pairs from labeled dialogues: chosen = the human summary, rejected = a summary "
                                   "the model sampled; pairs whose model summary is close to the reference are dropped. "
                                   "Re-running the same command resumes.")
    from lmlab.cli import add_engine_argument

    add_engine_argument(b)
    b.add_argument("--out", required=True, help="the pairs JSONL file to write (a .build.jsonl log goes beside it)")
    b.add_argument("--data", default=DEFAULT_DATA, help="labeled dialogues, DialogSum JSONL (default: %(default)s)")
    b.add_argument("--records", default="0:400", help="start:stop over the records (default: %(default)s)")
    b.add_argument("--held-out", action="store_true",
                   help="allow records 400-499, the held-out evaluation records (for evaluation pairs only)")
    b.add_argument("--model", default="smollm2-135m-instruct", help="default: %(default)s")
    b.add_argument("--policy", action="append", choices=POLICIES, default=None,
                   help="whose outputs are rejected (repeat for both): base = the model prompted zero-shot "
                        "(recitations, commentary: clear pairs); finetuned = with the LoRA adapter (close "
                        "outputs: subtle, on-policy pairs). Default: base")
    b.add_argument("--adapter", default=None, metavar="DIR",
                   help="adapter of the finetuned policy (default: the one lmlab ships for the model)")
    b.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    b.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling p (default: 1, off)")
    b.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    b.add_argument("--rouge-threshold", type=float, default=0.5,
                   help="drop a pair when the model's summary reaches this ROUGE-1 F against the reference "
                        "(default: %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    b.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    b.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="default: %(default)s")

    lab = sub.add_parser("label", help="label pairs by hand in the terminal: 1, 2, s(kip), q(uit)",
                         description="Shows each candidate pair (the dialogue, two summaries in random order, "
                                     "sources hidden) and appends the choice to --out; labeled pairs are not shown again.")
    lab.add_argument("candidates", help="a preferences JSONL file of candidate pairs (its chosen/rejected are ignored)")
    lab.add_argument("--out", required=True, help="the preferences JSONL file the choices are appended to")
    lab.add_argument("--seed", type=int, default=0, help="seed of the order the two summaries are shown in")


def run(args: argparse.Namespace) -> int:
    from lmlab.align.build import BuildSettings, build_preferences
    from lmlab.align.label import label_pairs

    if args.prefs_command == "build":
        build_preferences(BuildSettings(
            out=args.out, data=args.data, records=args.records, held_out=args.held_out, model=args.model,
            policies=args.policy or ["base"], adapter=args.adapter, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, rouge_threshold=args.rouge_threshold, seed=args.seed,
            batch_size=args.batch_size, precision=args.precision))
        return 0
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        result = label_pairs(args.candidates, args.out, sys.stdin, write, seed=args.seed)
        print(f"\n{result.labeled} labeled, {result.skipped} skipped, {result.remaining} left for later; "
              f"choices in {args.out}", flush=True)
    except BrokenPipeError:
        # the reader went away (`lmlab prefs label ... | head`): the choices made so far are already on
        # disk (appended and fsynced one by one), so stop quietly; stdout goes to /dev/null so that the
        # interpreter's final flush does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    return 0
