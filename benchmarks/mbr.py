"""What does minimum Bayes risk decoding cost, and what does sharing the prefill save? The shipped summarizer.

The shipped adapter's recipe decodes by MBR: 8 samples of each summary at T=0.7, the consensus kept
(``lmlab.align.mbr``). Its prompts are long (142-615 tokens) and its summaries short (15-33 tokens), so
prefill dominates, and 8 samples of one prompt need not prefill it 8 times: ``generate_tokens(...,
num_return_sequences=8)`` prefills each prompt once and copies its KV cache to the 8 rows. Timed here, on
the same batches of DialogSum dev prompts (records 400+, the adapter's own recipe prompt), in one process:

* greedy       one summary per prompt (the baseline: 1.00x)
* mbr-shared   8 samples per prompt sharing its prefill, then MBR (what the lab, summarize and serve run)
* mbr-each     the same 8 samples with each copy of the prompt prefilled (before 0.6.0)

Both MBR rows must write the same samples (checked); the ratios are wall time against greedy, the median
of --repeats, measured back to back so the machine's load hits all three alike.

    python benchmarks/mbr.py --threads 1                 # 16 prompts in batches of 8
    python benchmarks/mbr.py --threads 2 --prompts 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "dialogsum" / "dev.jsonl"
MODEL = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--prompts", type=int, default=16, help="DialogSum dev prompts from record 400 (default 16)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8, as the lab)")
    parser.add_argument("--samples", type=int, default=8, help="MBR samples per prompt (default 8, the recipe's)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported (default 3)")
    args = parser.parse_args()

    import torch

    import lmlab
    from lmlab import engine
    from lmlab.adapt.recipe import Recipe, shipped_adapter
    from lmlab.align.mbr import MBRScorer
    from lmlab.generation import GenerationConfig, generate_tokens
    from lmlab.generation.decode import encode_prompts, resolve_config
    from lmlab.precision import apply_precision
    from lmlab.tasks.summarize.experiments import CHAT_STOP_STRINGS

    torch.set_num_threads(args.threads)
    adapter = shipped_adapter(MODEL)
    recipe = Recipe.load(adapter)
    model = lmlab.load_model(MODEL, adapter=adapter)
    tok = lmlab.load_tokenizer(MODEL)
    precision = apply_precision(model, "fp32")
    records = [json.loads(line) for line in DEV.read_text().splitlines() if line.strip()][400:400 + args.prompts]
    texts = [recipe.prompt(r["dialogue"], tok, max_prompt_tokens=2048 - args.max_new_tokens).text for r in records]
    batches = [encode_prompts(tok, texts[i:i + args.batch_size]) for i in range(0, len(texts), args.batch_size)]
    n = args.samples
    base = GenerationConfig(max_new_tokens=args.max_new_tokens, stop_strings=list(CHAT_STOP_STRINGS))
    greedy = resolve_config(model, base, tok)
    sampled = resolve_config(model, base.replace(do_sample=True, temperature=0.7), tok)

    def seeds(rows: int) -> list[int]:
        return [1000 + k for k in range(rows * n)]

    def run_greedy():
        return [generate_tokens(model, ids, mask, greedy, tokenizer=tok) for ids, mask in batches]

    def run_shared():
        return [generate_tokens(model, ids, mask, sampled.replace(seed=seeds(len(ids))), tokenizer=tok,
                                num_return_sequences=n) for ids, mask in batches]

    def run_each():
        out = []
        for ids, mask in batches:
            rows = ids.repeat_interleave(n, 0)
            rmask = None if mask is None else mask.repeat_interleave(n, 0)
            out.append(generate_tokens(model, rows, rmask, sampled.replace(seed=seeds(len(ids))), tokenizer=tok))
        return out

    runs = {"greedy": run_greedy, "mbr-shared": run_shared, "mbr-each": run_each}
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs = {}
    run_greedy()  # warm-up: the native engine's build, the packed weights
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    same = outputs["mbr-shared"] == outputs["mbr-each"]
    scorer = MBRScorer()
    t0 = time.perf_counter()
    for batch in outputs["mbr-shared"]:
        samples = [tok.decode(t, skip_special_tokens=True) for t in batch]
        for i in range(0, len(samples), n):
            scorer.score_candidates("", samples[i:i + n])
    select_s = time.perf_counter() - t0
    ref = statistics.median(times["greedy"])
    tokens = {k: sum(len(t) for b in v for t in b) for k, v in outputs.items()}
    lscpu = Path("/proc/cpuinfo").read_text()
    cpu = "AVX-512" if "avx512f" in lscpu else "AVX2"
    print(f"{len(texts)} prompts (dev 400-{399 + len(texts)}), batches of {args.batch_size}, {n} samples each, "
          f"{args.max_new_tokens} new tokens max; {precision}, {args.threads} thread(s), {cpu} CPU, engine "
          f"{engine.describe(model)}")
    print(f"{'decoding':<12} {'median s':>9} {'vs greedy':>10} {'tokens':>7}")
    for name in runs:
        m = statistics.median(times[name])
        print(f"{name:<12} {m:9.2f} {m / ref:9.2f}x {tokens[name]:7d}")
    print(f"MBR selection (ROUGE between the samples): {select_s:.2f} s for all prompts")
    print(f"shared prefill vs each copy prefilled: {statistics.median(times['mbr-each']) / statistics.median(times['mbr-shared']):.2f}x "
          f"faster; same samples: {same}")
    if not same:
        raise SystemExit("the shared prefill wrote different samples")


if __name__ == "__main__":
    main()
