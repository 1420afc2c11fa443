"""Decode benchmark of the AOTInductor engine (lmlab.engine.aoti): compiled step vs lmlab eager vs `transformers`.

SmolLM2-135M-Instruct from the offline GGUF, the prompt windows of benchmarks/decode.py (64 tokens, different
windows of one text per row), greedy with eos disabled, exactly ``--new-tokens`` tokens. For every precision
(fp32, bf16, int8, int4) and batch size, in one process and interleaved round by round so that background
load falls on all of them:

* ``eager``        ``generate_tokens`` with lmlab's eager ``DecoderOnlyRun``
* ``compiled``     the same loop with ``AOTIEngine.start`` in place of the driver (eager prefill, compiled steps)
* ``transformers`` ``AutoModelForCausalLM`` (its own GGUF reader) in fp32, and in bf16 for the bf16 row

decode tokens/s = B * (N - 1) / (time of N new tokens - time of 1 new token), on the process CPU-time clock
(one thread: the time it computed, which descheduling on a shared machine does not inflate) and wall time.
Also printed: the cold compile time of each bucket (only when this run built it: pass a fresh
``--cache-dir`` for all-cold numbers), the cache-load time of a fresh engine on the entry, and the
correctness of the compiled step against eager: the largest logit difference over 16 steps fed the same
tokens, and how many rows' greedy tokens are identical (with the first diverging step).

    python benchmarks/decode_aoti.py --threads 1
    LMLAB_AOTI_AUTOTUNE=1 python benchmarks/decode_aoti.py --threads 1 --precisions int8 int4 --batches 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
PRECISIONS = ("fp32", "bf16", "int8", "int4")

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books far "
    "faster than scribes. Within fifty years presses were running in more than two hundred European cities, "
    "and millions of volumes had been printed. The consequences reached into religion, science and politics: "
    "pamphlets spread new ideas quickly, scholars could compare identical copies of the same text, and "
    "literacy slowly became common outside the clergy and the nobility. Later centuries brought steam-driven "
    "presses, rotary printing and, eventually, digital typesetting, yet the basic idea of reproducing text "
    "mechanically from a fixed arrangement of letters stayed the same for almost five hundred years. "
) * 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", default=None, help="AOTInductor cache (default: ~/.cache/lmlab/aoti)")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(args.threads)
    import lmlab
    import lmlab.generation.decode as decode
    from lmlab.checkpoints import registry
    from lmlab.engine.aoti import AOTIEngine, AOTIRun, INDUCTOR_CONFIGS
    from lmlab.generation import GenerationConfig, generate_tokens
    from lmlab.generation.driver import DecoderOnlyRun, start_run

    tok = lmlab.load_tokenizer(MODEL)
    ids = tok.encode(TEXT)
    P, N = args.prompt_tokens, args.new_tokens
    prompts = [ids[7 * i:7 * i + P] for i in range(max(args.batches))]
    eos = tok.eos_token_id
    engine_cfg = dict(INDUCTOR_CONFIGS, autotune=os.environ.get("LMLAB_AOTI_AUTOTUNE", "0") == "1")
    print(f"threads {args.threads}; torch {torch.__version__}; cpu capability {torch.backends.cpu.get_cpu_capability()}; "
          f"prompt {P} tokens, {N} new tokens, greedy; {args.repeats} repeats; inductor {engine_cfg}", flush=True)

    hf_models = {}

    def hf_model(dtype):
        if dtype not in hf_models:
            import transformers

            path = registry.local_path(MODEL)
            hf_models[dtype] = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype).eval()
        return hf_models[dtype]

    def clocks():
        return time.process_time(), time.perf_counter()

    def timed(fn, n):
        c, w = clocks()
        out = fn(n)
        c2, w2 = clocks()
        return out, c2 - c, w2 - w

    rows_out = []
    for precision in args.precisions:
        kwargs = {"quantize": precision} if precision.startswith("int") else {}
        if precision == "bf16":
            kwargs["dtype"] = torch.bfloat16
        model = lmlab.load_model(MODEL, **kwargs)
        engine = AOTIEngine(model, cache_dir=args.cache_dir)
        for B in args.batches:
            batch = torch.tensor(prompts[:B])
            capacity_note = ""
            # the bucket: compiled now (cold) or loaded from the cache; then a fresh engine's load time
            with torch.inference_mode():
                run = engine.start(batch, None, N)
            if not isinstance(run, AOTIRun):
                print(f"{precision} b{B}: engine unavailable: {engine.last_note}", flush=True)
                continue
            built = engine.timings[-1]
            fresh = AOTIEngine(model, cache_dir=args.cache_dir)
            fresh.step_fn(run.bucket, run.capacity)
            load_s = fresh.timings[-1]["seconds"]
            size = engine.path(run.bucket, run.capacity).stat().st_size / 2**20
            capacity_note = f"bucket b{run.bucket} L{run.capacity}, package {size:.0f} MiB"

            def gen_eager(n):
                return generate_tokens(model, batch, None, GenerationConfig(max_new_tokens=n, eos_token_ids=[]))

            def gen_compiled(n):
                def start(model_, input_ids, attention_mask, config, expand=1):
                    _, history = start_run(model_, input_ids, attention_mask, config, expand)
                    return engine.start(input_ids, attention_mask, N), history  # one capacity bucket for all n

                saved = decode.start_run
                decode.start_run = start
                try:
                    return generate_tokens(model, batch, None, GenerationConfig(max_new_tokens=n, eos_token_ids=[]))
                finally:
                    decode.start_run = saved

            hf_dtypes = [] if args.no_transformers else [torch.float32] + ([torch.bfloat16] if precision == "bf16" else [])

            def gen_hf(n, dtype):
                m = hf_model(dtype)
                with torch.inference_mode():
                    out = m.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, eos_token_id=eos, pad_token_id=eos)
                return out[:, batch.shape[1]:].tolist()

            engines = {"eager": gen_eager, "compiled": gen_compiled}
            for dtype in hf_dtypes:
                engines[f"transformers-{str(dtype).split('.')[-1]}"] = lambda n, d=dtype: gen_hf(n, d)
            for fn in engines.values():
                fn(2)  # warm-up
            rates = {name: {"cpu": [], "wall": []} for name in engines}
            tokens = {}
            for _ in range(args.repeats):
                for name, fn in engines.items():
                    _, c1, w1 = timed(fn, 1)
                    out, cn, wn = timed(fn, N)
                    rates[name]["cpu"].append(B * (N - 1) / (cn - c1))
                    rates[name]["wall"].append(B * (N - 1) / (wn - w1))
                    tokens[name] = out
            # correctness: logits over 16 steps fed the eager run's tokens; greedy rows identical
            with torch.inference_mode():
                a_run, b_run = engine.start(batch, None, N), DecoderOnlyRun(model, batch, None, N)
                a, b = a_run.prefill(), b_run.prefill()
                worst, scale = 0.0, b.abs().max().item()
                for _ in range(16):
                    t = b.argmax(-1)
                    a, b = a_run.step(t), b_run.step(t)
                    worst = max(worst, (a.float() - b.float()).abs().max().item())
            same = sum(x == y for x, y in zip(tokens["compiled"], tokens["eager"]))
            firsts = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
                      for x, y in zip(tokens["compiled"], tokens["eager"])]
            diverge = sorted(f for f in firsts if f is not None)
            med = {name: {c: statistics.median(v) for c, v in r.items()} for name, r in rates.items()}
            line = {"precision": precision, "B": B, "med": med, "rates": rates, "built": built, "load_s": load_s,
                    "worst": worst, "scale": scale, "same": same, "diverge": diverge, "note": capacity_note}
            rows_out.append(line)
            print(f"{precision} b{B}: {capacity_note}; {built['action']} in {built['seconds']:.1f} s, "
                  f"fresh-engine load {load_s:.2f} s; " + ", ".join(
                      f"{n} {m['cpu']:.1f} tok/s" for n, m in med.items()), flush=True)

    print()
    print(f"decode tokens/s (cpu time, median of {args.repeats}; wall in brackets) and ratios, threads {args.threads}")
    for line in rows_out:
        med, prec, B = line["med"], line["precision"], line["B"]
        cells = [f"{n} {m['cpu']:.1f} ({m['wall']:.1f})" for n, m in med.items()]
        ratios = [f"{med['compiled']['cpu'] / med['eager']['cpu']:.2f}x eager"]
        for n in med:
            if n.startswith("transformers"):
                ratios.append(f"{med['compiled']['cpu'] / med[n]['cpu']:.2f}x {n} "
                              f"(eager {med['eager']['cpu'] / med[n]['cpu']:.2f}x)")
        step_ms = 1000 / (med["compiled"]["cpu"] / B)
        print(f"  {prec:5s} b{B}: " + "; ".join(cells))
        print(f"         compiled step {step_ms:.1f} ms: " + "; ".join(ratios))
        print(f"         {line['note']}; {line['built']['action']} {line['built']['seconds']:.1f} s; "
              f"cache load {line['load_s']:.2f} s; max logit diff vs eager {line['worst']:.2e} "
              f"(logits up to {line['scale']:.1f}); greedy rows identical {line['same']}/{B}"
              + (f", first divergence at steps {line['diverge']}" if line["diverge"] else ""))


if __name__ == "__main__":
    main()
