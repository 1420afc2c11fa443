"""Training throughput: lmlab's pretrain loop vs. a minimal plain-PyTorch GPT loop, measured in the same run.

    python benchmarks/train.py --threads 1

Both sides train the same GPT-2-style decoder (pre-LayerNorm, GELU MLP, learned positions, tied head,
SDPA causal attention) with the same batch, AdamW (weight decay on linear matrices), gradient clipping
and fp32 on CPU (bf16 autocast on CUDA). lmlab runs its real loop, ``lmlab.training.pretrain``, on a
generated corpus: it pays for reading memory-mapped shards, the objective's batch transform, the
token-weighted loss scaling, the LR schedule and metrics. The baseline is the nanoGPT-style loop
written below with random tokens already in memory. Throughput is timed per step after warm-up.

Achieved FLOP/s is 6·N·tokens/s (N = parameters in matmuls; attention scores not counted), compared
with the peak of a square matmul that this script measures itself on the same threads.
The two loops alternate for --repeats rounds and each side's best round is reported (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPE = dict(d_model=512, n_layers=4, n_heads=8, d_ff=2048)


# --- the baseline: a minimal GPT and training loop in plain PyTorch (nanoGPT-like) ------------------
class Block(nn.Module):
    def __init__(self, d: int, h: int, ff: int):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))  # (B, h, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab: int, T: int, d: int, L: int, h: int, ff: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, h, ff) for _ in range(L))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def baseline_tokens_per_s(vocab: int, T: int, batch: int, steps: int, warmup: int, device) -> tuple[float, int]:
    torch.manual_seed(0)
    model = GPT(vocab, T, SHAPE["d_model"], SHAPE["n_layers"], SHAPE["n_heads"], SHAPE["d_ff"]).to(device)
    embeds = {id(model.wte.weight), id(model.wpe.weight)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeds]
    other = [p for p in model.parameters() if not (p.dim() >= 2 and id(p) not in embeds)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), **({"fused": True} if device.type == "cuda" else {}))
    data = torch.randint(0, vocab, (steps + warmup, batch, T + 1))
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    elapsed = 0.0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x, y = data[i, :, :-1].to(device), data[i, :, 1:].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            elapsed += time.perf_counter() - t0
    n_matmul = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    return steps * batch * T / elapsed, n_matmul


# --- lmlab: the real pretrain loop on a generated corpus ---------------------------------------------
def make_corpus(workdir: Path, vocab: int, T: int, batch: int, steps: int) -> tuple[Path, Path]:
    """A generated text corpus (random words) and a BPE tokenizer trained on it."""
    from lmlab.corpus import iter_documents
    from lmlab.tokenizer_train import train_tokenizer

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(20000)]
    corpus = workdir / "corpus.txt"
    n_docs = steps * batch * T // 40 + 200
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, size=60)) for _ in range(n_docs)))
    tok = workdir / "tok"
    train_tokenizer(iter_documents([corpus]), vocab_size=vocab, out_dir=tok, show_progress=False)
    return corpus, tok


def lmlab_run(out: Path, corpus: Path, tok: Path, T: int, batch: int, steps: int, warmup: int, device: str) -> dict:
    """lmlab's real loop; tokens/s is its own per-step timing over the last `steps` steps."""
    from lmlab.training import load_config, pretrain

    if warmup % steps:
        raise SystemExit("--warmup must be a multiple of --steps (the loop reports whole logging windows)")
    sets = [f"out_dir={out}", f"data.files=[{corpus}]", f"data.tokenizer={tok}", f"data.seq_len={T}",
            "data.val_fraction=0", f"train.steps={warmup + steps}", f"train.batch_size={batch}", "train.lr=1e-4",
            "train.warmup_steps=1", "train.eval_every=0", "train.ckpt_every=0", f"train.log_every={steps}",
            f"train.device={device}", "model.preset=gpt2-124m", "model.max_seq_len=" + str(T),
            *(f"model.{k}={v}" for k, v in SHAPE.items())]
    summary = pretrain(load_config(None, sets), show_progress=False)
    summary["vocab_size"] = json.loads((out / "config.json").read_text())["vocab_size"]
    return summary


def matmul_peak(device, size: int, seconds: float = 1.0) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * size**3 * n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=6, help="untimed steps first (a multiple of --steps)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; the best of each side is kept")
    p.add_argument("--device", default="auto")
    for key, value in SHAPE.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    args = p.parse_args()
    SHAPE.update({k: getattr(args, k) for k in SHAPE})
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    # Shared machines are noisy: alternate the two loops `--repeats` times and keep each one's best
    # (the same rule for both), re-measuring the matmul peak each round and keeping its best too.
    peak, lm_tps, base_tps = 0.0, 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        corpus, tok = make_corpus(Path(tmp), args.vocab, args.seq_len, args.batch, args.steps + args.warmup + 4)
        for r in range(args.repeats):
            peak = max(peak, matmul_peak(device, 4096 if device.type == "cuda" else 1024))
            run = lmlab_run(Path(tmp) / f"run{r}", corpus, tok, args.seq_len, args.batch, args.steps, args.warmup,
                            str(device))
            lm_tps = max(lm_tps, run["tokens_per_s"])
            tps, n_matmul = baseline_tokens_per_s(run["vocab_size"], args.seq_len, args.batch, args.steps,
                                                  args.warmup, device)
            base_tps = max(base_tps, tps)
            print(f"round {r + 1}: lmlab {run['tokens_per_s']:.0f} tokens/s, plain {tps:.0f} tokens/s", flush=True)
    flops_per_token = 6 * n_matmul
    print(f"device {device}, threads {torch.get_num_threads()}; model d_model={SHAPE['d_model']} n_heads={SHAPE['n_heads']} "
          f"n_layers={SHAPE['n_layers']} d_ff={SHAPE['d_ff']} vocab={run['vocab_size']} T={args.seq_len} "
          f"batch={args.batch}; {n_matmul / 1e6:.1f}M matmul params")
    print(f"matmul peak           {peak / 1e9:8.1f} GFLOP/s")
    print(f"plain PyTorch loop    {base_tps:8.0f} tokens/s  {flops_per_token * base_tps / 1e9:6.1f} GFLOP/s  "
          f"{100 * flops_per_token * base_tps / peak:5.1f}% of peak")
    print(f"lmlab pretrain loop   {lm_tps:8.0f} tokens/s  {flops_per_token * lm_tps / 1e9:6.1f} GFLOP/s  "
          f"{100 * flops_per_token * lm_tps / peak:5.1f}% of peak")
    print(f"ratio lmlab / plain   {lm_tps / base_tps:8.3f}x   (target >= 1.0x)")
    print(f"lmlab MFU vs peak     {100 * flops_per_token * lm_tps / peak:8.1f}%   (target >= 50%)")


if __name__ == "__main__":
    main()
