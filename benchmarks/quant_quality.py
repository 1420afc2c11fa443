"""Quality of quantized SmolLM2-135M-Instruct: perplexity, lab ROUGE, model bytes and peak RSS per format.

    python benchmarks/quant_quality.py [--ppl-limit 100] [--limit 100] [--threads 1] [--modes fp32,int8,int4,native]

Each format runs in its own child process (so peak RSS is that format's alone):

* perplexity of the base model on the DialogSum dev dialogues of records 400..400+ppl_limit-1 (the
  dialogue text, up to 512 tokens each, all predicted tokens pooled);
* ROUGE of the lab's ``finetuned`` experiment (the shipped DialogSum LoRA adapter over the quantized
  base) on records 400..400+limit-1 (``--pool-size 400 --limit N``), greedy, 48 new tokens; the lab
  resumes its folder, so an interrupted run continues where it stopped;
* model bytes: the tensors the model holds (a quantized layer's integers, scales and minimums; not the
  kernel's packed copy, which doubles int4 in memory);
* peak RSS (VmHWM) of the child after both.

The fp32 reference is the Q4_1 GGUF dequantized to fp32: lmlab ships no other copy of SmolLM2, so "fp32"
already carries Q4_1's rounding, and int8/int4 quantize those dequantized weights once more. "native"
runs the file's own Q4_1 blocks (and its Q8_0 embedding/head requantized per channel to int8).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "dialogsum" / "dev.jsonl"


def child(mode: str, limit: int, ppl_limit: int, out_dir: Path) -> dict:
    import math

    import torch

    import lmlab
    from lmlab.quant.model import describe_quantization
    from lmlab.tasks.summarize.lab import LabSettings, run_lab

    quantize = None if mode == "fp32" else mode
    model = lmlab.load_model("smollm2-135m-instruct", quantize=quantize)
    tokenizer = lmlab.load_tokenizer("smollm2-135m-instruct")
    tensors = {t.untyped_storage().data_ptr(): t for t in list(model.state_dict().values())}
    model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    records = [json.loads(line) for line in DEV.read_text().splitlines()][400:400 + ppl_limit]
    cached = out_dir / f"ppl-{mode}-{ppl_limit}.json"  # perplexity is deterministic: kept across reruns
    if cached.exists():
        nll, count = json.loads(cached.read_text())
    else:
        nll, count = 0.0, 0
        with torch.inference_mode():
            for record in records:
                ids = torch.tensor([tokenizer.encode(record["dialogue"])[:512]])
                logits = model(ids)[0, :-1].float()  # (T-1, V)
                nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
        cached.write_text(json.dumps([nll, count]))
    ppl = math.exp(nll / count)
    what = describe_quantization(model)
    del model
    t0 = time.perf_counter()
    result = run_lab(LabSettings(model="smollm2-135m-instruct", data=str(DEV), experiments="finetuned",
                                 pool_size=400, limit=limit, out=out_dir / mode, examples=0, precision="fp32",
                                 quantize=quantize), echo=lambda _: None, progress=False)
    summary = result.summaries[0]
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM"))
    return {"mode": mode, "layers": what, "ppl": ppl, "tokens": count, "rouge": summary.best,
            "model_bytes": model_bytes, "peak_rss_kib": peak, "lab_seconds": time.perf_counter() - t0,
            "threads": torch.get_num_threads()}


def rss_child(mode: str, out_dir: Path) -> dict:
    """Peak RSS of loading a format the way it is served and running 5 dialogues through it: fp32 and
    native from the GGUF, int8/int4 from a checkpoint ``lmlab quantize`` wrote (made beforehand, in
    another process, so the fp32 weights it loads do not count here)."""
    import torch

    import lmlab

    source = "smollm2-135m-instruct" if mode in ("fp32", "native") else out_dir / f"checkpoint-{mode}"
    model = lmlab.load_model(source, quantize="native" if mode == "native" else None)
    tokenizer = lmlab.load_tokenizer(source)
    records = [json.loads(line) for line in DEV.read_text().splitlines()][400:405]
    with torch.inference_mode():
        for record in records:
            model(torch.tensor([tokenizer.encode(record["dialogue"])[:512]]))
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM"))
    return {"mode": mode, "serve_peak_rss_kib": peak}


def serve_rss(args: argparse.Namespace, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "LMLAB_NUM_THREADS": str(args.threads)}
    for mode in args.modes.split(","):
        if mode in ("int8", "int4") and not (out / f"checkpoint-{mode}").exists():
            subprocess.run([sys.executable, "-c", "import sys, lmlab.quant.checkpoint as q; "
                            "q.quantize_checkpoint('smollm2-135m-instruct', sys.argv[1], int(sys.argv[2]))",
                            str(out / f"checkpoint-{mode}"), mode[-1]], env=env, check=True)
        proc = subprocess.run([sys.executable, __file__, "--rss-child", mode, "--out", str(out)], env=env,
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        print(lines[-1][len("RESULT "):] if lines else f"{mode}: failed\n{proc.stderr[-2000:]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="fp32,int8,int4,native")
    parser.add_argument("--limit", type=int, default=100, help="lab ROUGE on records 400..400+limit-1 (default: 100)")
    parser.add_argument("--ppl-limit", type=int, default=100, help="perplexity on records 400..400+N-1 (default: 100)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/quant-quality")
    parser.add_argument("--serve-rss", action="store_true",
                        help="only measure the peak RSS of each format loaded as served (quantized checkpoints)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    if args.rss_child:
        print("RESULT " + json.dumps(rss_child(args.rss_child, out)), flush=True)
        return
    if args.serve_rss:
        out.mkdir(parents=True, exist_ok=True)
        serve_rss(args, out)
        return
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(child(args.child, args.limit, args.ppl_limit, out)), flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.modes.split(","):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "LMLAB_NUM_THREADS": str(args.threads)}
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--limit", str(args.limit),
                               "--ppl-limit", str(args.ppl_limit),
                               "--threads", str(args.threads), "--out", str(out)],
                              env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{mode}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    base = next((r for r in results if r["mode"] == "fp32"), None)
    print(f"\nSmolLM2-135M-Instruct, DialogSum dev: perplexity on records 400-{399 + args.ppl_limit}, lab ROUGE "
          f"(finetuned, shipped adapter) on records 400-{399 + args.limit}; {args.threads} thread(s)")
    print("| format | layers | perplexity | vs fp32 | ROUGE-1 | ROUGE-2 | ROUGE-L | model bytes | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rel = f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%" if base else "-"
        rouge = r["rouge"]
        print(f"| {r['mode']} | {r['layers']} | {r['ppl']:.3f} | {rel} | {100 * rouge['rouge1']:.2f} | "
              f"{100 * rouge['rouge2']:.2f} | {100 * rouge['rougeL']:.2f} | {r['model_bytes'] / 1e6:.1f} MB | "
              f"{r['peak_rss_kib'] / 1024:.0f} MiB |")


if __name__ == "__main__":
    main()
