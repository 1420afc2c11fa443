"""`lmlab scaling sweep --config FILE` and `lmlab scaling fit RUNS.jsonl`: power laws measured on your own runs."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="scaling_command", metavar="{sweep,fit}", required=True)
    sw = sub.add_parser("sweep", help="train a grid of small decoders (sizes x token budgets), one line per run",
                        description="Train a grid of small decoders through the one training loop; each finished run "
                                    "is a line of OUT/runs.jsonl. Re-running continues a killed sweep.")
    sw.add_argument("--config", required=True, help="sweep YAML (e.g. configs/scaling-stdlib.yaml)")
    sw.add_argument("--out", help="output directory (overrides out_dir)")
    sw.add_argument("--workers", type=int, help="runs at a time (default from the config: 2, one per core)")
    sw.add_argument("--device", choices=["auto", "cpu", "cuda"], help="train.device of every run")
    sw.add_argument("--no-progress", action="store_true", help="no progress bars while preparing the data")
    sw.add_argument("--fit", action="store_true", help="fit the law when the sweep is done (writes OUT/fit.json, "
                                                       "OUT/scaling.png)")

    ft = sub.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to runs.jsonl (params, tokens, loss)",
                        description="Fit the Chinchilla parametric law (Huber on log-loss, L-BFGS from a grid), the "
                                    "single-variable power laws and the IsoFLOP minima, with bootstrap intervals.")
    ft.add_argument("runs", help="a runs.jsonl: one JSON object a line with params, tokens and loss")
    ft.add_argument("--json", action="store_true", help="print one JSON object (E, A, B, alpha, beta, tokens_per_param ...)")
    ft.add_argument("--png", help="write the plot here (loss vs compute, frontier and extrapolation; IsoFLOPs)")
    ft.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (default 200)")
    ft.add_argument("--confidence", type=float, default=0.9, help="interval coverage (default 0.9)")


def run(args: argparse.Namespace) -> int:
    from lmlab.errors import ConfigError
    from lmlab.scaling import fit as scaling_fit

    if args.scaling_command == "sweep":
        from lmlab.scaling.sweep import SweepConfig, sweep

        overrides = {}
        if args.out:
            overrides["out_dir"] = args.out
        if args.workers is not None:
            overrides["workers"] = args.workers
        cfg = SweepConfig.from_file(args.config, overrides)
        if args.device:
            cfg.train = {**cfg.train, "device": args.device}
        try:
            runs_path = sweep(cfg, show_progress=not args.no_progress)
        except RuntimeError as exc:  # a run's own failure: its log names the cause
            print(f"error: {exc}")
            return 1
        print(f"runs: {runs_path}")
        if args.fit:
            runs = scaling_fit.read_runs(runs_path)
            result = scaling_fit.fit_runs(runs)
            (runs_path.parent / "fit.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
            png = scaling_fit.plot_fit(result, runs, runs_path.parent / "scaling.png")
            print(scaling_fit.fit_report(result))
            print(f"fit: {runs_path.parent / 'fit.json'}; plot: {png}")
        return 0
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap={args.bootstrap} must be >= 0")
    if not 0 < args.confidence < 1:
        raise ConfigError(f"--confidence={args.confidence} must be in (0, 1)")
    runs = scaling_fit.read_runs(args.runs)
    result = scaling_fit.fit_runs(runs, n_boot=args.bootstrap, confidence=args.confidence)
    if args.png:
        scaling_fit.plot_fit(result, runs, args.png)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(scaling_fit.fit_report(result))
        if args.png:
            print(f"plot: {args.png}")
    return 0
