"""GPU checks: what CI (CPU-only) cannot see. Run on a CUDA machine:

    PYTHONPATH=src python benchmarks/gpu_check.py [--out DIR]

1. parity on CUDA: lmlab vs transformers logits (fp32, TF32 off) for LLaMA (SmolLM2-135M shape),
   GPT-2 and T5 random-weight models built from the real configs, on a padded batch;
2. generation on CUDA: greedy tokens equal transformers' for 48 new tokens (SmolLM2 shape, fp32);
   bf16 generation runs and its first tokens agree with fp32;
3. training on CUDA: `lmlab pretrain` with bf16 autocast (precision auto), then DDP and FSDP under
   torchrun with one process (NCCL), each must end with a finite, lower loss;
4. decode speed on CUDA: lmlab vs transformers tokens/s (same weights, same prompt, 128 new tokens,
   batch 1 and 8, fp32 and bf16), printed as ratios measured in the same run.

Weights are random (the real checkpoints do not fit the transfer limit), which is fine for parity
and speed; greedy generation forces min_new_tokens so every run generates the same number of tokens.
Each section prints PASS/FAIL with its numbers and a JSON summary goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers

from lmlab.checkpoints import from_hf_model
from lmlab.generation import GenerationConfig, generate_tokens

LLAMA = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_hidden_layers=30,
             num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
             tie_word_embeddings=True, vocab_size=49152, bos_token_id=1, eos_token_id=2, hidden_act="silu")
GPT2 = dict(model_type="gpt2", n_embd=768, n_head=12, n_layer=2, n_positions=1024, vocab_size=50257,
            activation_function="gelu_new", layer_norm_epsilon=1e-5)
T5 = dict(model_type="t5", d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_layers=2, num_decoder_layers=2,
          vocab_size=32128, feed_forward_proj="relu", relative_attention_num_buckets=32,
          relative_attention_max_distance=128, tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0,
          eos_token_id=1)
RESULTS: dict[str, object] = {}
DEVICE = "cuda"  # --device cpu dry-runs the script (small shapes) where no GPU is present


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def section(name):
    def wrap(fn):
        def run(*a, **k):
            print(f"\n== {name}", flush=True)
            t = time.time()
            try:
                res = fn(*a, **k)
                RESULTS[name] = {"ok": bool(res.pop("ok", True)), **res}
            except Exception as exc:  # report and keep going: one broken section must not hide the others
                traceback.print_exc()
                RESULTS[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            RESULTS[name]["seconds"] = round(time.time() - t, 1)
            print(f"-- {name}: {'PASS' if RESULTS[name]['ok'] else 'FAIL'} {RESULTS[name]}", flush=True)
        return run
    return wrap


def hf_model(cfg: dict, cls):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**cfg)
    model = cls(config).eval()
    with torch.no_grad():  # HF starts norms at 1 and biases at 0: perturb them so a swapped one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@section("parity on cuda (fp32)")
def parity():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    for name, cfg, cls in [("llama", LLAMA, transformers.LlamaForCausalLM), ("gpt2", GPT2, transformers.GPT2LMHeadModel),
                           ("t5", T5, transformers.T5ForConditionalGeneration)]:
        ref = hf_model(cfg, cls)
        ours = from_hf_model(ref).to(DEVICE)
        ref = ref.to(DEVICE)
        ids = torch.randint(3, 1000, (2, 24), device=DEVICE)
        mask = torch.ones_like(ids)
        mask[1, 16:] = 0
        with torch.no_grad():
            if name == "t5":
                dec = torch.randint(3, 1000, (2, 8), device=DEVICE)
                a = ours(ids, attention_mask=mask, decoder_input_ids=dec)
                b = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
                diff = (a - b).abs().max().item()
            else:
                a = ours(ids, attention_mask=mask)
                b = ref(input_ids=ids, attention_mask=mask).logits
                diff = (a - b)[mask.bool()].abs().max().item()
        out[name] = diff
        del ref, ours
    return {"ok": all(v <= 1e-3 for v in out.values()), "max_abs_logit_diff": out}


@section("generation on cuda")
def generation():
    ref = hf_model(LLAMA, transformers.LlamaForCausalLM)
    ours = from_hf_model(ref).to(DEVICE)
    ref = ref.to(DEVICE)
    ids = torch.randint(3, 40000, (1, 40), device=DEVICE)
    cfg = GenerationConfig(max_new_tokens=48, min_new_tokens=48)
    mine = generate_tokens(ours, ids, config=cfg)[0]
    theirs = ref.generate(ids, max_new_tokens=48, min_new_tokens=48, do_sample=False)[0, 40:].tolist()
    same = sum(a == b for a, b in zip(mine, theirs))
    # batched, left-padded: rows equal the unbatched runs
    ids2 = torch.randint(3, 40000, (1, 30), device=DEVICE)
    batch = torch.full((2, 40), 0, device=DEVICE)
    batch[0] = ids[0]
    batch[1, 10:] = ids2[0]
    mask = torch.ones_like(batch)
    mask[1, :10] = 0
    rows = generate_tokens(ours, batch, mask, cfg)
    alone = generate_tokens(ours, ids2, config=cfg)[0]
    bf16 = ours.to(torch.bfloat16)
    half = generate_tokens(bf16, ids, config=GenerationConfig(max_new_tokens=8, min_new_tokens=8))[0]
    return {"ok": mine == theirs and rows[0] == mine and rows[1] == alone, "greedy_tokens_equal": f"{same}/48",
            "batched_equals_unbatched": rows[0] == mine and rows[1] == alone,
            "bf16_first_tokens_agree": f"{sum(a == b for a, b in zip(half, mine[:8]))}/8"}


def _corpus(directory: Path) -> Path:
    dialogsum = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dialogsum" / "dev.jsonl"
    path = directory / "corpus.jsonl"
    if dialogsum.exists():
        path.write_text(dialogsum.read_text())
    else:  # synthetic but learnable text
        import random
        rng = random.Random(0)
        words = "the a cat dog sat ran on under mat tree big small red blue quickly slowly".split()
        path.write_text("".join(json.dumps({"dialogue": " ".join(rng.choice(words) for _ in range(60))}) + "\n"
                                for _ in range(800)))
    return path


def _pretrain(args: list[str], torchrun: bool = False) -> tuple[int, str]:
    base = [sys.executable, "-m", "lmlab"] if not torchrun else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "lmlab"]
    proc = subprocess.run(base + ["pretrain"] + args, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(out_dir: Path) -> list[float]:
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r["loss"] for r in rows if "loss" in r and r.get("kind", "train") == "train"]


@section("training on cuda (bf16 autocast, ddp, fsdp)")
def training():
    tmp = Path(tempfile.mkdtemp())
    corpus = _corpus(tmp)
    common = ["--config", "decoder-10m", "--files", str(corpus), "--field", "dialogue", "--steps", "60",
              "--batch-size", "16", "--seq-len", "128", "--device", DEVICE, "--no-progress",
              "--set", "train.eval_every=30", "--set", "train.ckpt_every=30", "--set", "data.vocab_size=4096"]
    out = {}
    ok = True
    for mode in ("none", "ddp", "fsdp"):
        run_dir = tmp / f"run-{mode}"
        tok = [] if mode == "none" else ["--tokenizer", str(tmp / "run-none" / "tokenizer")]
        rc, log = _pretrain(common + tok + ["--out", str(run_dir), "--distributed", mode, "--precision", "auto"],
                            torchrun=mode != "none")
        if rc != 0:
            print(log)
            out[mode] = f"exit {rc}"
            ok = False
            continue
        losses = _losses(run_dir)
        out[mode] = {"first_loss": round(losses[0], 3), "last_loss": round(losses[-1], 3), "steps": len(losses)}
        ok &= losses[-1] < losses[0] and all(map(lambda x: x == x and abs(x) != float("inf"), losses))
    # resume under the accelerator: stop half-way, resume, compare with the straight run's final loss
    rc1, _ = _pretrain(common + ["--tokenizer", str(tmp / "run-none" / "tokenizer"), "--out", str(tmp / "resume"),
                                 "--stop-after", "30"])
    rc2, log = _pretrain(common + ["--tokenizer", str(tmp / "run-none" / "tokenizer"), "--out", str(tmp / "resume"),
                                   "--resume"])
    if rc1 == 0 and rc2 == 0:
        out["resume_last_loss"] = round(_losses(tmp / "resume")[-1], 4)
    else:
        print(log)
        ok = False
    return {"ok": ok, **out}


REPEATS = 3


def _time_generate(fn) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


@section("decode speed on cuda")
def speed():
    ref = hf_model(LLAMA, transformers.LlamaForCausalLM)
    ours = from_hf_model(ref)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        m_ours, m_ref = ours.to(DEVICE, dtype), ref.to(DEVICE, dtype)
        for batch in (1, 8):
            ids = torch.randint(3, 40000, (batch, 200), device=DEVICE)
            n = 128
            cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n)
            cfg1 = GenerationConfig(max_new_tokens=1, min_new_tokens=1)
            gen_ours = lambda c=cfg: generate_tokens(m_ours, ids, config=c)  # noqa: E731
            gen_ref = lambda k=n: m_ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,  # noqa: E731
                                                    min_new_tokens=k, do_sample=False, pad_token_id=2)
            gen_ours(), gen_ref()  # warm-up
            t_ours = _time_generate(gen_ours) - _time_generate(lambda: gen_ours(cfg1))
            t_ref = _time_generate(gen_ref) - _time_generate(lambda: gen_ref(1))
            tps_ours, tps_ref = batch * (n - 1) / t_ours, batch * (n - 1) / t_ref
            rows.append({"dtype": str(dtype).split(".")[-1], "batch": batch, "lmlab_tok_s": round(tps_ours, 1),
                         "transformers_tok_s": round(tps_ref, 1), "ratio": round(tps_ours / tps_ref, 2)})
            print(rows[-1], flush=True)
    return {"ok": True, "decode": rows, "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--only", default="", help="comma-separated subset: parity,generation,training,speed")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to dry-run the script")
    parser.add_argument("--layers", type=int, default=30, help="SmolLM2-shape layers (fewer for a dry run)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    args = parser.parse_args()
    global DEVICE, REPEATS
    DEVICE, REPEATS = args.device, args.repeats
    LLAMA["num_hidden_layers"] = args.layers
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (or --device cpu for a dry run)")
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {name}")
    from lmlab.precision import describe_precision

    RESULTS["precision_auto"] = {"ok": True, "chosen": describe_precision("auto", DEVICE)}
    print(f"precision auto on this device: {RESULTS['precision_auto']['chosen']} (the speed section runs both)")
    chosen = [s for s in args.only.split(",") if s] or ["parity", "generation", "training", "speed"]
    for name in chosen:
        {"parity": parity, "generation": generation, "training": training, "speed": speed}[name]()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2))
    print("\nSUMMARY", json.dumps({k: v["ok"] for k, v in RESULTS.items()}))


if __name__ == "__main__":
    main()
