"""`lmlab reward train|score|eval`: a reward model (a scalar head on any lmlab model) from preference pairs.

Maps flags onto ``lmlab.align.reward``: ``train_reward`` (Bradley–Terry, in the one training loop),
``RewardScorer.score`` and ``RewardScorer.accuracy``.
"""

from __future__ import annotations

import argparse
import json
import sys

from lmlab.align.prefs import read_preferences
from lmlab.errors import DataError
from lmlab.jsonl import iter_objects
from lmlab.tasks.summarize.data import read_utf8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="reward_command", metavar="{train,score,eval}", required=True)
    t = sub.add_parser("train", help="train a reward model on preference pairs (Bradley–Terry)",
                       description="A scalar head on --base (final token for decoders, mean pooling for encoders), "
                                   "trained on --prefs; pairwise accuracy on --eval-prefs picks the best checkpoint.")
    t.add_argument("--base", required=True, help="registry name or checkpoint path, e.g. all-minilm-l6-v2")
    t.add_argument("--prefs", required=True, help="training pairs (preferences JSONL)")
    t.add_argument("--eval-prefs", default=None, help="held-out pairs: pairwise accuracy at each evaluation")
    t.add_argument("--out", default="runs/reward", help="run directory (default: %(default)s)")
    t.add_argument("--lora", action="store_true", help="train LoRA adapters and the head instead of every weight")
    t.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: %(default)s)")
    t.add_argument("--epochs", type=float, default=2.0, help="default: %(default)s")
    t.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch (default: %(default)s)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: %(default)s)")
    t.add_argument("--lr", type=float, default=3e-5, help="default: %(default)s")
    t.add_argument("--max-len", type=int, default=512, help="prompt + response tokens; longer dialogues are cut "
                                                            "in the middle (default: %(default)s)")
    t.add_argument("--pooling", choices=["last", "mean", "response_mean"], default=None,
                   help="what the head reads: the final token (decoders' default), the mean over every real token "
                        "(encoders' default) or the mean over the response's tokens only")
    t.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    t.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after N steps in this call")

    s = sub.add_parser("score", help="score a summary, or every record of a JSONL file",
                       description="Scores are only comparable between summaries of the same prompt: the model "
                                   "was trained on differences.")
    s.add_argument("--reward", required=True, metavar="DIR", help="a reward model (OUT/best of lmlab reward train)")
    s.add_argument("--prompt", default=None, help="the prompt (the dialogue); --prompt-file reads it from a file")
    s.add_argument("--prompt-file", default=None, help="read the prompt from this text file")
    s.add_argument("--summary", default=None, help="the summary to score")
    s.add_argument("--file", default=None,
                   help="JSONL of {prompt, summary} (or {dialogue, summary}); writes each record with a 'reward' field")
    s.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")

    e = sub.add_parser("eval", help="pairwise accuracy of a reward model on preference pairs")
    e.add_argument("--reward", required=True, metavar="DIR")
    e.add_argument("--prefs", required=True, help="preferences JSONL")
    e.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")


def run(args: argparse.Namespace) -> int:
    # lazy: lmlab.align.reward imports torch, and `lmlab --help` imports every command module for its flags
    from lmlab.align.reward import RewardScorer, RewardSettings, train_reward

    if args.reward_command == "train":

        summary = train_reward(RewardSettings(
            base=args.base, prefs=args.prefs, eval_prefs=args.eval_prefs, out=args.out, lora=args.lora,
            lora_r=args.lora_r, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
            lr=args.lr, max_len=args.max_len, pooling=args.pooling, eval_every=args.eval_every, seed=args.seed, stop_after=args.stop_after),
            resume=args.resume)
        metrics = summary.get("metrics") or {}
        done = "finished" if summary["finished"] else "stopped (resume with --resume)"
        acc = f"; held-out accuracy {metrics['accuracy']:.3f} (best {summary['best_score']:.3f} at step " \
              f"{summary['best_step']})" if "accuracy" in metrics else ""
        print(f"reward model {done} at step {summary['step']}{acc}; best: {summary['best_dir']}")
        return 0

    if args.reward_command == "eval":
        pairs = read_preferences(args.prefs)
        metrics = RewardScorer.load(args.reward, args.batch_size).accuracy(pairs)
        print(f"pairwise accuracy {metrics['accuracy']:.3f} on {metrics['pairs']} pairs of {args.prefs} "
              f"(mean margin {metrics['margin']:.3f}, Bradley–Terry loss {metrics['val_loss']:.4f})")
        return 0

    if args.file is not None:
        if args.prompt is not None or args.prompt_file is not None or args.summary is not None:
            raise DataError("give --file, or --prompt/--prompt-file with --summary, not both")
        records = []
        for lineno, record in iter_objects(read_utf8(args.file).splitlines(), args.file):
            prompt = record.get("prompt", record.get("dialogue"))
            if not isinstance(prompt, str) or not isinstance(record.get("summary"), str):
                raise DataError(f"{args.file}:{lineno}: a record to score needs 'prompt' (or 'dialogue') and "
                                f"'summary' strings")
            records.append((record, prompt))
        scorer = RewardScorer.load(args.reward, args.batch_size)
        scores = scorer.score([p for _, p in records], [r["summary"] for r, _ in records])
        for (record, _), score in zip(records, scores):
            print(json.dumps({**record, "reward": round(score, 6)}, ensure_ascii=False))
        if scores:
            print(f"{len(scores)} scored; mean reward {sum(scores) / len(scores):.4f}", file=sys.stderr)
        return 0
    if args.prompt is not None and args.prompt_file is not None:
        raise DataError("give --prompt or --prompt-file, not both")
    prompt = args.prompt
    if args.prompt_file is not None:
        prompt = read_utf8(args.prompt_file)
    if prompt is None or args.summary is None:
        raise DataError("score needs --prompt (or --prompt-file) and --summary, or --file")
    print(f"{RewardScorer.load(args.reward, args.batch_size).score([prompt], [args.summary])[0]:.6f}")
    return 0
