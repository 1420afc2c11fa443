"""Serving benchmark: `lmlab serve` under 1, 8 and 32 concurrent streaming clients, against sequential
requests and against offline batch generation, all in one run on the same machine.

The server runs as its own process (``lmlab --threads T serve MODEL``, loopback only) so that the
clients, which run here on one asyncio loop over httpx, do not share its interpreter. Every request
is a summarization prompt built from a bundled dialogue (chat template), greedy, and generates
exactly ``--max-tokens`` tokens (``ignore_eos``), so each scenario does the same work per request.

Measured per scenario:

* aggregate tokens/s   all generated tokens / wall time from the first request sent to the last token
* TTFT p50 / p95       time to first token (request sent -> first streamed token), queueing included
* ITL p50 / p95        inter-token latency (gaps between consecutive streamed tokens of a request)

Scenarios: ``lone`` (one request, nothing else running: the TTFT reference), ``sequential`` (8 requests,
one after another), ``concurrent-N`` (N clients at once; N = 1, 8, 32), each repeated ``--rounds``
times on the same server (the table shows the median of the rounds, and the ratios their min-max
spread: the machine these numbers come from is shared and loaded, and one round can be several times
another). Then, in this process with the server stopped, the offline references: ``offline batch-8``
(``lmlab.generate_tokens`` on 8 prompts as one left-padded batch) and ``offline batch-1`` (the same 8
prompts one after another), each also timed with a single new token, which separates the prefill from
the decode steps.

Targets from the issue, printed as checks: 8 clients >= 4x sequential throughput, >= 0.8x offline
batch-8 throughput, p95 TTFT <= 2x the lone request's. Next to each, the bound that the offline
generator itself sets on this machine: a server cannot beat ``offline batch-8 / offline batch-1`` against
sequential requests (it runs the same forwards), and the last of 8 prompts that arrive together cannot
see its first token before all 8 have been prefilled (``prefill of 8 / prefill of 1``, of which p95's
interpolation between the 7th and the 8th first token keeps 7.65/8).

    python benchmarks/serve.py --threads 1 --rounds 3

``--baseline-src DIR`` compares this tree's server with another checkout's (``DIR`` is that checkout's
``src``, e.g. ``git archive HEAD~3 src | tar -x -C /tmp/base``): both servers run side by side, the
rounds alternate between them (the order flips each round, so a change in the machine's load hits both
alike), and the table shows this tree's throughput and latencies as ratios of the baseline's.

    python benchmarks/serve.py --threads 1 --rounds 3 --baseline-src /tmp/base/src

``--engine NAME`` runs the server (and the offline references) with that decode engine (``lmlab serve
--engine``; default: the server's own default, auto). ``--baseline-engine NAME`` compares two engines of
this tree the same way as ``--baseline-src``: e.g. the native decode step against the eager one, each
server's own 8-clients-vs-sequential ratio printed too. ``--clients 8`` runs only that concurrency.

    python benchmarks/serve.py --threads 1 --rounds 2 --engine native --baseline-engine eager --clients 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    values = sorted(values)
    if not values:
        return float("nan")
    pos = (len(values) - 1) * q
    low = int(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


def prompts_for(tokenizer, n: int) -> list[str]:
    """n summarization prompts (chat template when the tokenizer has one) from the bundled dialogues."""
    from lmlab.tasks.summarize.data import load_sample
    from lmlab.tasks.summarize.experiments import INSTRUCTION

    records = load_sample().records
    out = []
    for i in range(n):
        text = f"{INSTRUCTION}\n\n{records[i % len(records)].dialogue}\n\nSummary:"
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append(text)
    return out


async def one_request(client, url: str, prompt: str, max_tokens: int) -> dict:
    """Stream one completion -> {sent, first, last, tokens, gaps}."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    sent = time.perf_counter()
    arrivals, tokens = [], None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
            if chunk.get("usage") and not chunk["choices"]:
                tokens = chunk["usage"]["completion_tokens"]
    if tokens != max_tokens:
        raise RuntimeError(f"expected {max_tokens} tokens, got {tokens}")
    return {"sent": sent, "first": arrivals[0], "last": arrivals[-1], "tokens": tokens,
            "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])]}


async def scenario(url: str, prompts: list[str], max_tokens: int, concurrent: int, total: int | None = None) -> dict:
    """`total` requests (default: `concurrent`), `concurrent` at a time -> the metrics above."""
    import httpx

    total = total or concurrent
    limits = httpx.Limits(max_connections=concurrent + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        semaphore = asyncio.Semaphore(concurrent)

        async def run(i):
            async with semaphore:
                return await one_request(client, url, prompts[i % len(prompts)], max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(total)))
        end = max(r["last"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    ttft = [r["first"] - r["sent"] for r in results]
    return {"tokens_per_s": sum(r["tokens"] for r in results) / (end - start),
            "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
            "itl_p50": percentile(gaps, 0.5), "itl_p95": percentile(gaps, 0.95), "requests": total}


def offline_seconds(model, tokenizer, prompts: list[str], max_tokens: int, repeats: int) -> float:
    """lmlab.generate_tokens on the prompts as one batch -> seconds (best of `repeats`)."""
    from lmlab.generation import GenerationConfig, generate_tokens
    from lmlab.generation.decode import encode_prompts

    ids, mask = encode_prompts(tokenizer, prompts)
    config = GenerationConfig(max_new_tokens=max_tokens, eos_token_ids=[])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate_tokens(model, ids, mask, config, tokenizer=tokenizer)
        best = min(best, time.perf_counter() - start)
        assert all(len(row) == max_tokens for row in out)
    return best


def offline(model, tokenizer, prompts: list[str], max_tokens: int, repeats: int) -> dict:
    """The offline references on `prompts`: batch-8 and one at a time, whole and prefill only (1 new token).

    -> tokens/s of each, and the prefill and per-step seconds of each (step = (whole - prefill) / (n - 1)).
    """
    n = len(prompts)
    batch = offline_seconds(model, tokenizer, prompts, max_tokens, repeats)
    batch_prefill = offline_seconds(model, tokenizer, prompts, 1, repeats)
    lone = [offline_seconds(model, tokenizer, [p], max_tokens, 1) for p in prompts]
    lone_prefill = [offline_seconds(model, tokenizer, [p], 1, repeats) for p in prompts]
    steps = max(max_tokens - 1, 1)
    return {"batch_tokens_per_s": n * max_tokens / batch, "one_at_a_time_tokens_per_s": n * max_tokens / sum(lone),
            "batch_prefill_s": batch_prefill, "lone_prefill_s": sum(lone_prefill) / n,
            "batch_step_s": (batch - batch_prefill) / steps,
            "lone_step_s": sum(a - b for a, b in zip(lone, lone_prefill)) / n / steps}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, threads: int, max_batch: int, prefill_tokens: int,
                 src: str | None = None, engine: str | None = None,
                 quantize: str | None = None) -> tuple[subprocess.Popen, str]:
    """`lmlab serve MODEL` as its own process (from the checkout whose sources are `src`, default this
    process's) -> (the process, its base url) once /health answers 200. The base model is served (the
    offline references load it without an adapter), with --no-adapter where the checkout has the flag."""
    import httpx

    env = dict(os.environ, **({"PYTHONPATH": str(Path(src).resolve())} if src else {}))
    port = free_port()
    usage = subprocess.run([sys.executable, "-m", "lmlab", "serve", "--help"], cwd=REPO, env=env,
                           capture_output=True, text=True).stdout
    cmd = [sys.executable, "-m", "lmlab", "--threads", str(threads), "serve", model, "--port", str(port),
           "--max-batch", str(max_batch), "--prefill-tokens", str(prefill_tokens), "--max-queue", "256",
           "--log-level", "warning", *(["--no-adapter"] if "--no-adapter" in usage else []),
           *(["--engine", engine] if engine else []), *(["--quantize", quantize] if quantize else [])]
    if engine and "--engine" not in usage:
        raise RuntimeError(f"--engine {engine}: the server of {src or 'this tree'} has no --engine flag")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            health = httpx.get(f"{url}/health", timeout=5)
            if health.status_code == 200:
                return proc, url
            if health.status_code != 503:  # 500: the model failed to load
                proc.kill()
                raise RuntimeError(f"the server failed: {health.text}")
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready in 10 minutes")


def warm_up(url: str, prompts: list[str], args) -> None:
    """First-call costs (packing calibration, allocator) out of the numbers."""
    asyncio.run(scenario(url, prompts, args.max_tokens, concurrent=1))


def server_round(url: str, prompts: list[str], args) -> dict:
    """One round of the server scenarios -> scenario name -> its metrics."""
    run = lambda **kw: asyncio.run(scenario(url, prompts, args.max_tokens, **kw))  # noqa: E731
    rows = {"lone": run(concurrent=1), "sequential": run(concurrent=1, total=args.sequential)}
    for n in args.clients:
        rows[f"concurrent-{n}"] = run(concurrent=n)
    return rows


def compare(args, prompts: list[str]) -> None:
    """This tree's server against --baseline-src's, rounds alternating -> a table of ratios (this / baseline)."""
    servers = {}
    try:
        baseline_engine = args.baseline_engine or args.engine
        for name, src, engine in (("baseline", args.baseline_src, baseline_engine), ("this", None, args.engine)):
            servers[name] = start_server(args.model, args.threads, args.max_batch, args.prefill_tokens, src, engine,
                                         args.quantize)
        for _, url in servers.values():
            warm_up(url, prompts, args)
        rounds: dict[str, list[dict]] = {"baseline": [], "this": []}
        for i in range(args.rounds):
            for name in (("baseline", "this") if i % 2 == 0 else ("this", "baseline")):
                rounds[name].append(server_round(url=servers[name][1], prompts=prompts, args=args))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(120)
    keys = ("tokens_per_s", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95")
    against = args.baseline_src or f"--engine {args.baseline_engine}"
    print(f"\nthis tree{f' (--engine {args.engine})' if args.engine else ''} / baseline ({against}), median of {args.rounds} round(s) each, rounds alternating; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| scenario | tokens/s | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 |")
    print("|---|---:|---:|---:|---:|---:|")
    ratios = {}
    for scenario_name in rounds["this"][0]:
        cells = []
        for key in keys:
            values = [t[scenario_name][key] / b[scenario_name][key] for t, b in zip(rounds["this"], rounds["baseline"])]
            ratios[f"{scenario_name}.{key}"] = values
            cells.append(f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})")
        print(f"| {scenario_name} | " + " | ".join(cells) + " |")
    print("(tokens/s above 1 is faster; TTFT and ITL below 1 are faster; in brackets the rounds' spread)")
    if "concurrent-8" in rounds["this"][0]:
        for name in ("this", "baseline"):
            values = [r["concurrent-8"]["tokens_per_s"] / r["sequential"]["tokens_per_s"] for r in rounds[name]]
            ratios[f"{name}.8-clients-vs-sequential"] = values
            tps = statistics.median(r["concurrent-8"]["tokens_per_s"] for r in rounds[name])
            print(f"{name}: 8 clients {tps:.1f} tokens/s, {statistics.median(values):.2f}x sequential "
                  f"(rounds {min(values):.2f}-{max(values):.2f}; target >= 4)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "ratios": ratios, "args": vars(args)}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for the server and offline batch")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="the server's --prefill-tokens")
    parser.add_argument("--sequential", type=int, default=8, help="requests in the sequential scenario")
    parser.add_argument("--repeats", type=int, default=2, help="offline batch runs (best counts)")
    parser.add_argument("--rounds", type=int, default=2, help="server scenario rounds (median shown, ratios' spread)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--baseline-src", default=None, metavar="DIR",
                        help="another checkout's src/: compare the two servers round by round (no offline runs)")
    parser.add_argument("--engine", default=None, choices=["auto", "compiled", "native", "aoti", "eager"],
                        help="the server's decode engine (lmlab serve --engine) and the offline references'")
    parser.add_argument("--baseline-engine", default=None, choices=["auto", "compiled", "native", "aoti", "eager"],
                        help="compare this tree's server with --engine against its server with this engine")
    parser.add_argument("--quantize", default=None, metavar="MODE", help="the served (and offline) model's "
                        "weight-only quantization (lmlab serve --quantize: int8, int4)")
    parser.add_argument("--clients", default="1,8,32", type=lambda t: [int(n) for n in t.split(",")],
                        help="concurrent-client scenarios (default 1,8,32)")
    args = parser.parse_args()

    import torch

    import lmlab

    torch.set_num_threads(args.threads)
    tokenizer = lmlab.load_tokenizer(args.model)
    prompts = prompts_for(tokenizer, 32)
    n_prompt = [len(tokenizer.encode(p, add_special_tokens=True)) for p in prompts]
    print(f"model {args.model}{f' --quantize {args.quantize}' if args.quantize else ''}, {args.threads} torch thread(s), server --max-batch {args.max_batch} "
          f"--prefill-tokens {args.prefill_tokens}, "
          f"{args.max_tokens} new tokens a request (greedy, ignore_eos), prompts {min(n_prompt)}-{max(n_prompt)} "
          f"tokens; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    if args.baseline_src or args.baseline_engine:
        compare(args, prompts)
        return
    if args.engine:
        os.environ["LMLAB_ENGINE"] = args.engine  # the offline references' generate_tokens
    proc, url = start_server(args.model, args.threads, args.max_batch, args.prefill_tokens, engine=args.engine,
                             quantize=args.quantize)
    rounds: list[dict] = []
    try:
        warm_up(url, prompts, args)
        for _ in range(args.rounds):
            rounds.append(server_round(url, prompts, args))
    finally:
        proc.terminate()
        proc.wait(120)
    load_served = os.getloadavg()[0]

    model = lmlab.load_model(args.model, quantize=args.quantize)
    ref = offline(model, tokenizer, prompts[:8], args.max_tokens, args.repeats)

    median = {name: {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]}
              for name in rounds[0]}
    print()
    print(f"| scenario | requests | tokens/s | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 |")
    print(f"|---|---:|---:|---:|---:|---:|---:|")
    for name, r in median.items():
        print(f"| {name} | {r['requests']:.0f} | {r['tokens_per_s']:.1f} | {r['ttft_p50'] * 1e3:.0f} ms | "
              f"{r['ttft_p95'] * 1e3:.0f} ms | {r['itl_p50'] * 1e3:.0f} ms | {r['itl_p95'] * 1e3:.0f} ms |")
    print(f"| offline batch-8 (generate_tokens) | 8 | {ref['batch_tokens_per_s']:.1f} | | | | |")
    print(f"| offline batch-1, one after another | 8 | {ref['one_at_a_time_tokens_per_s']:.1f} | | | | |")
    print(f"\n(median of {args.rounds} round(s) on {args.threads} torch thread(s); load average {load_served:.1f} "
          f"after the server scenarios, {os.getloadavg()[0]:.1f} after the offline runs)")
    print(f"offline generator on this machine: a decode step for 8 rows {ref['batch_step_s'] * 1e3:.0f} ms vs "
          f"{ref['lone_step_s'] * 1e3:.0f} ms for 1 row ({ref['batch_step_s'] / ref['lone_step_s']:.2f}x); "
          f"prefill of 8 prompts {ref['batch_prefill_s']:.2f} s vs {ref['lone_prefill_s']:.2f} s for one "
          f"({ref['batch_prefill_s'] / ref['lone_prefill_s']:.2f}x)")

    seq_bound = ref["batch_tokens_per_s"] / ref["one_at_a_time_tokens_per_s"]
    ttft_floor = ref["batch_prefill_s"] / ref["lone_prefill_s"] * 7.65 / 8
    checks = [  # label, per-round ratio, target, passes, what this machine's offline generator allows
        ("8 clients vs sequential throughput", lambda r: r["concurrent-8"]["tokens_per_s"] / r["sequential"]["tokens_per_s"],
         ">= 4", lambda x: x >= 4.0, f"offline bound {seq_bound:.2f}x (batch-8 / one at a time)"),
        ("8 clients vs offline batch-8 throughput", lambda r: r["concurrent-8"]["tokens_per_s"] / ref["batch_tokens_per_s"],
         ">= 0.8", lambda x: x >= 0.8, "offline bound 1x"),
        ("8 clients p95 TTFT vs a lone request's", lambda r: r["concurrent-8"]["ttft_p95"] / r["lone"]["ttft_p50"],
         "<= 2", lambda x: x <= 2.0, f"floor ~{ttft_floor:.1f}x (8 prefills before the last first token)"),
    ]
    print()
    results = {}
    for label, ratio, target, passes, bound in checks:
        values = [ratio(r) for r in rounds]
        mid = statistics.median(values)
        results[label] = values
        print(f"{label}: {mid:.2f}x (rounds {min(values):.2f}-{max(values):.2f}; target {target}) "
              f"{'ok' if passes(mid) else 'MISSED'}; {bound}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "median": median, "offline": ref, "checks": results,
                                               "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
