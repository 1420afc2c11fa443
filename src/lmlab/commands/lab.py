"""`lmlab lab`: run the dialogue-summarization lab (experiments x dialogues), score with ROUGE, report.

Maps flags onto ``lmlab.tasks.summarize.lab.LabSettings`` and ``run_lab``; see that module for what
runs, how the shot pool is split off, and how resuming works.
"""

from __future__ import annotations

import argparse
import sys

from lmlab.cli import add_engine_argument
from lmlab.commands.generate import add_search_arguments
from lmlab.tasks.summarize.experiments import DEFAULT_EXPERIMENTS, EXPERIMENTS
from lmlab.tasks.summarize.lab import DEFAULT_MODEL, DEFAULT_POOL_SIZE, LabInterrupted, LabSettings, run_lab


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_argument(parser)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name or checkpoint path (default: {DEFAULT_MODEL})")
    parser.add_argument("--data", default=None,
                        help="dialogues: a DialogSum .jsonl, a Hugging Face style .csv, or hf:ID[:SPLIT] "
                             "(default: the bundled sample set)")
    parser.add_argument("--experiments", default=",".join(DEFAULT_EXPERIMENTS),
                        help=f"comma-separated experiment names (default: %(default)s); valid: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--shots", type=int, default=2, help="K for few-shot and few-shot-nn (default: 2)")
    parser.add_argument("--shots-from", default=None,
                        help="a separate file of shot dialogues (default: the first --pool-size records of --data)")
    parser.add_argument("--pool-size", type=int, default=DEFAULT_POOL_SIZE,
                        help="without --shots-from, the first N records form the shot pool and are not evaluated "
                             "(default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N (non-pool) dialogues")
    parser.add_argument("--seed", type=int, default=0, help="seed for shot selection and sampling (default: 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="summary length cap in tokens (default: 48)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap prompts in the model's chat template (default: when the tokenizer has one)")
    parser.add_argument("--out", default="lab-out", help="output folder; re-running resumes it (default: lab-out)")
    parser.add_argument("--examples", type=int, default=3, help="human-vs-model examples to print (default: 3)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="LoRA adapter (PEFT format, e.g. from lmlab finetune) for the finetuned experiment "
                             "(default: the adapter lmlab ships for smollm2-135m-instruct)")
    parser.add_argument("--student", default=None, metavar="DIR",
                        help="a distilled student bundle (lmlab distill with student.lora) for the student experiment "
                             "(default: the student lmlab ships for --model)")
    parser.add_argument("--reward", default=None, metavar="DIR",
                        help="a reward model (lmlab reward train): best-of-n experiments (finetuned-best-of-4) keep "
                             "the summary it scores highest, and the report gives each experiment's mean reward")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="compute precision; auto: bf16 where the CPU/GPU has native bf16, else fp32 "
                             "(default: auto); the path taken is printed")
    parser.add_argument("--quantize", default=None, metavar="MODE",
                        help="run on quantized weights: int8, int4 (int4-g64, int4-g128), or native (a GGUF file at "
                             "its own precision); see docs/quantization.md")
    decoding = parser.add_argument_group("decoding of the fine-tuned and student experiments (default: their recipe's)")
    add_search_arguments(decoding)
    decoding.add_argument("--best-of", type=int, default=None, metavar="N",
                          help="N > 1: sample N summaries and keep the consensus (minimum Bayes risk); 1: one summary "
                               "(the shipped recipe's default is 8 samples)")
    decoding.add_argument("--temperature", type=float, default=None, metavar="T",
                          help="the temperature of --best-of N's samples (default: the recipe's, else 0.7)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (default auto: a CUDA GPU when torch sees one)")
    parser.add_argument("--turns", action=argparse.BooleanOptionalAction, default=True,
                        help="report.html shades the dialogue turns each fine-tuned summary attended to "
                             "(lmlab.inspect.turns: one recorded forward pass per fine-tuned row, ~7%% of a default "
                             "run; default: on)")


def run(args: argparse.Namespace) -> int:
    settings = LabSettings(
        model=args.model, data=args.data, experiments=args.experiments, shots=args.shots,
        shots_from=args.shots_from, pool_size=args.pool_size, limit=args.limit, seed=args.seed,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, chat=args.chat, out=args.out,
        examples=args.examples, precision=args.precision, adapter=args.adapter, reward=args.reward,
        quantize=args.quantize, turns=args.turns, student=args.student, device=args.device,
        decoding={k: getattr(args, k) for k in ("num_beams", "length_penalty", "no_repeat_ngram_size",
                                                  "min_new_tokens") if getattr(args, k) is not None} or None,
        best_of=args.best_of, temperature=args.temperature,
    )
    try:
        run_lab(settings)
    except LabInterrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 130
    return 0
