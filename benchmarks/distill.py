"""Teacher vs distilled student: parameters, ROUGE, empty summaries, batch-1 decode speed and peak memory.

Both models are lmlab checkpoint directories holding their prompt recipe (``lmlab merge`` writes the
teacher with its adapter folded in; ``lmlab distill`` writes the student), so both load the same way
and are prompted exactly as the lab's ``finetuned`` experiment prompts them.

* ROUGE-1/2/L and empty summaries: ``lmlab lab --experiments finetuned-greedy`` on DialogSum dev records
  400-499 (``--pool-size 400 --limit 100``: the first 400 records are the unused shot pool), one greedy
  summary (not a recipe's minimum Bayes risk: both models decode alike), 64 new tokens; each model's rows
  go to ``OUT/lab-<name>/`` (resumable).
* decode tokens/s, batch 1: (N - 1) new tokens / (time of N new tokens - time of 1), greedy after one
  dev dialogue's prompt, end-of-sequence suppressed so both generate exactly N; best of ``--repeats``
  with the two models alternating (the machine is shared: both see the same background load).
* peak memory: the peak resident set (VmHWM) of a fresh process that loads the model and generates
  the same N tokens, so the interpreter and torch count alike for both.

``--extra NAME=DIR`` adds rows (e.g. the student after ``lmlab quantize``), measured the same way.

    python benchmarks/distill.py --teacher runs/distill-half/teacher --student runs/distill-half/final \
        --data ../shared/data/dialogsum/dev.jsonl --threads 1 --out runs/distill-half/eval
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def _prompt_ids(model_dir: str, data: str, record: int):
    import lmlab
    from lmlab.adapt.recipe import Recipe

    tokenizer = lmlab.load_tokenizer(model_dir)
    dialogue = json.loads(Path(data).read_text().splitlines()[record])["dialogue"]
    text = Recipe.load(model_dir).prompt(dialogue, tokenizer).text
    return tokenizer, torch.tensor([tokenizer.encode(text, add_special_tokens=True)])


def _generate(model, ids, n: int, eos: int):
    from lmlab.generation import GenerationConfig, generate_tokens

    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, eos_token_ids=[eos])
    out = generate_tokens(model, ids, None, config)
    assert len(out[0]) == n, len(out[0])


def measure_memory(model_dir: str, data: str, record: int, n: int) -> None:
    """(subprocess) load, generate n tokens, print the process's peak RSS in bytes."""
    import lmlab

    tokenizer, ids = _prompt_ids(model_dir, data, record)
    model = lmlab.load_model(model_dir)
    with torch.inference_mode():
        _generate(model, ids, n, tokenizer.eos_token_id)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(int(line.split()[1]) * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="teacher model directory (lmlab merge output)")
    parser.add_argument("--student", required=True, help="student model directory (lmlab distill output)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=DIR",
                        help="another model directory for the table, e.g. student-int8=runs/student-int8 (repeatable)")
    parser.add_argument("--data", default="../shared/data/dialogsum/dev.jsonl")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", type=int, default=400, help="the dev record whose prompt the speed test uses")
    parser.add_argument("--skip-rouge", action="store_true")
    parser.add_argument("--rouge-from", action="append", default=[], metavar="NAME=RESULTS.jsonl",
                        help="score NAME from the --rouge-experiment rows of an earlier lab run on the same records instead "
                             "of generating them again (e.g. the teacher: runs/dev-eval/results.jsonl)")
    parser.add_argument("--rouge-experiment", default="finetuned-greedy",
                        help="the lab experiment whose rows --rouge-from reads (finetuned for runs before 0.6.0)")
    parser.add_argument("--no-rouge", action="append", default=[], metavar="NAME",
                        help="leave NAME's ROUGE out (speed and memory only)")
    parser.add_argument("--out", default="runs/distill-eval")
    parser.add_argument("--measure-memory", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        measure_memory(args.measure_memory, args.data, args.record, args.new_tokens)
        return

    import lmlab
    from lmlab.tasks.summarize.lab import LabSettings, run_lab

    models = {"teacher": args.teacher, "student": args.student}
    for item in args.extra:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--extra {item!r} must look like NAME=DIR")
        models[name] = path
    print(f"threads: {torch.get_num_threads()}; torch {torch.__version__}", flush=True)
    rows: dict[str, dict] = {name: {} for name in models}
    for name, path in models.items():
        model = lmlab.load_model(path)
        # from the config: a quantized model holds its weights as integer buffers, not parameters
        rows[name].update(parameters=model.config.num_parameters(), layers=model.config.n_layers)
        del model
    reused = dict(item.partition("=")[::2] for item in args.rouge_from)
    if not args.skip_rouge:
        for name, path in models.items():
            if name in args.no_rouge:
                continue
            if name in reused:
                lab_rows = [json.loads(line) for line in Path(reused[name]).read_text().splitlines() if line.strip()]
                lab_rows = [r for r in lab_rows if r["experiment"] == args.rouge_experiment]
                rows[name].update(_rouge(lab_rows), rouge_source=reused[name])
                print(f"{name}: ROUGE from {len(lab_rows)} rows of {reused[name]}", flush=True)
                continue
            result = run_lab(LabSettings(model=path, data=args.data, experiments=["finetuned-greedy"], pool_size=400, limit=100,
                                         max_new_tokens=64, batch_size=8, out=Path(args.out) / f"lab-{name}",
                                         examples=0), echo=lambda *_: None, progress=False)
            rows[name].update(_rouge(result.rows))
            print(f"{name}: ROUGE on {len(result.rows)} dialogues done", flush=True)

    # speed: alternate the two models, best of repeats
    loaded = {name: lmlab.load_model(path) for name, path in models.items()}
    tokenizer, ids = _prompt_ids(args.student, args.data, args.record)
    eos, n = tokenizer.eos_token_id, args.new_tokens
    best = {(name, k): float("inf") for name in models for k in (1, n)}
    with torch.inference_mode():
        for name in models:
            _generate(loaded[name], ids, 2, eos)  # warm-up
        for _ in range(args.repeats):
            for name in models:
                for k in (1, n):
                    t0 = time.perf_counter()
                    _generate(loaded[name], ids, k, eos)
                    best[(name, k)] = min(best[(name, k)], time.perf_counter() - t0)
    for name in models:
        rows[name]["decode_tokens_per_s"] = (n - 1) / (best[(name, n)] - best[(name, 1)])
    del loaded
    for name, path in models.items():
        out = subprocess.run([sys.executable, __file__, "--measure-memory", path, "--data", args.data,
                              "--threads", str(args.threads), "--new-tokens", str(n), "--record", str(args.record),
                              "--teacher", "-", "--student", "-"], capture_output=True, text=True, check=True)
        rows[name]["peak_rss_bytes"] = int(out.stdout.strip().splitlines()[-1])

    t, s = rows["teacher"], rows["student"]
    print(f"\nprompt: dev record {args.record}, {ids.shape[1]} tokens; {n} new tokens, batch 1, greedy\n")
    print("| model | layers | parameters | ROUGE-1 | ROUGE-2 | ROUGE-L | empty | decode tokens/s (batch 1) | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in models:
        r = rows[name]
        rouge = (f"{r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | {r['empty']}" if "rouge1" in r
                 else "- | - | - | -")
        print(f"| {name} | {r['layers']} | {r['parameters'] / 1e6:.1f}M | {rouge} | {r['decode_tokens_per_s']:.1f} | "
              f"{r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    print()
    if "rouge1" in s and t.get("rouge1", 0) > 0:  # the teacher's ROUGE may be left out (--no-rouge teacher)
        print(f"student / teacher ROUGE-1: {s['rouge1'] / t['rouge1']:.3f} (target >= 0.90)")
    for name in list(models)[1:]:
        r = rows[name]
        print(f"{name} / teacher decode speed: {r['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}x"
              + (" (target >= 1.8x)" if name == "student" else ""))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.json").write_text(json.dumps(rows, indent=2) + "\n")


def _rouge(rows: list[dict]) -> dict:
    """Corpus ROUGE F x100 (best reference per example) and the count of empty summaries."""
    from lmlab.tasks.summarize.rouge import corpus_score

    corpus = corpus_score([r["scores"] for r in rows])  # each row's scores, as the lab stored them
    return {"rouge1": 100 * corpus["rouge1"], "rouge2": 100 * corpus["rouge2"], "rougeL": 100 * corpus["rougeL"],
            "empty": sum(not r["summary"].strip() for r in rows), "dialogues": len(rows)}


if __name__ == "__main__":
    main()
