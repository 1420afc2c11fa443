"""`lmlab sweep run --config FILE` and `lmlab sweep table RUNS.jsonl`: recipes and decodings scored with ROUGE."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sweep_command", metavar="{run,table}", required=True)
    r = sub.add_parser("run", help="train and evaluate every run of a sweep config not yet in OUT/runs.jsonl",
                       description="Each run trains with an lmlab job (finetune, distill, align) in its own process "
                                   "and directory, then `lmlab lab` scores it once per decoding. Re-running continues "
                                   "a killed sweep; finished runs are never recomputed.")
    r.add_argument("--config", required=True, help="sweep YAML (e.g. configs/sweep-dialogsum.yaml)")
    r.add_argument("--out", help="output directory (overrides out_dir)")
    r.add_argument("--workers", type=int, help="runs at a time (overrides workers)")
    r.add_argument("--threads-per-run", type=int, help="torch threads of each run's processes")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], help="train.device and lab --device of every run")
    r.add_argument("--only", help="comma-separated run ids: run only these")
    r.add_argument("--baseline", help="print the table against this run id when done (default: the config's)")
    t = sub.add_parser("table", help="the results of a runs.jsonl as a Markdown table with paired differences")
    t.add_argument("runs", help="OUT/runs.jsonl of lmlab sweep run")
    t.add_argument("--baseline", help="run id the paired ROUGE-1 differences and standard errors are taken against")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmlab.errors import DataError
    from lmlab.sweep.recipes import RecipeSweep, sweep, table
    from lmlab.sweep.runner import read_records

    if args.sweep_command == "run":
        cfg = RecipeSweep.from_file(args.config, {"out_dir": args.out, "workers": args.workers,
                                                  "threads_per_run": args.threads_per_run, "device": args.device})
        only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
        runs_path = sweep(cfg, only=only)
        records = read_records(runs_path)
        print(table(records, args.baseline or (cfg.baseline if any(r["id"] == cfg.baseline for r in records)
                                               else None)))
        return 0
    path = Path(args.runs)
    if not path.exists():
        raise DataError(f"{str(path)!r} does not exist (lmlab sweep run writes OUT/runs.jsonl)")
    records = read_records(path)
    if not records:
        raise DataError(f"{str(path)!r} holds no runs")
    print(table(records, args.baseline))
    return 0
