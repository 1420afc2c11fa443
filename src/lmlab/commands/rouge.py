"""`lmlab rouge PREDICTIONS REFERENCES`: score summary files with ROUGE-1/2/L/Lsum (F-measure)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", help="one summary per line, or JSONL with a 'prediction'/'summary' field")
    parser.add_argument("references", help="one reference per line, or JSONL with 'summary' or 'summary1'..'summaryN'")


def run(args: argparse.Namespace) -> int:
    from lmlab.tasks.summarize.rouge import format_scores_table, score_files

    result = score_files(args.predictions, args.references)
    rows = [("best-reference", result.best)]
    if result.n_references > 1:
        rows.append(("mean-over-references", result.mean))
    print(f"{result.n} examples, up to {result.n_references} reference(s) each; "
          f"mean prediction length {result.mean_words:.1f} words; ROUGE F-measure x100 (stemmed)")
    print(format_scores_table(rows))
    return 0
