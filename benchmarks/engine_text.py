"""Does the native decode engine write the same text as the eager path? DialogSum dev prompts, greedy.

For each weight format (``--modes``: fp32, bf16, int8, int4) the same prompts are generated twice,
with ``LMLAB_ENGINE=eager`` and ``=native`` (``lmlab.engine``), and compared:

* greedy texts identical, out of the prompts; for each that differs, the first token where it does;
* logits along one trajectory: both engines are fed the eager path's tokens (teacher forcing) and the
  per-step logits compared: max |native - eager| and the mean of it, beside the logits' own spread.

    python benchmarks/engine_text.py --threads 1                     # 20 prompts (dev 400-419) x 96 tokens
    python benchmarks/engine_text.py --modes int4 --prompts 5       # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "dialogsum" / "dev.jsonl"
MODEL = "smollm2-135m-instruct"


def load(mode: str):
    import torch

    import lmlab

    model = lmlab.load_model(MODEL, **({"quantize": mode} if mode in ("int8", "int4") else {}))
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    return model.eval()


def prompts(tok, first: int, n: int) -> list[list[int]]:
    records = [json.loads(line) for line in DEV.read_text().splitlines() if line.strip()][first:first + n]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": "Summarize this dialogue in one sentence.\n\n"
                                                  + r["dialogue"]}]), add_special_tokens=True) for r in records]


def generate(model, rows, new_tokens: int, engine: str, batch: int) -> list[list[int]]:
    from lmlab.generation import GenerationConfig, generate_tokens

    os.environ["LMLAB_ENGINE"] = engine
    out = []
    cfg = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=[model.config.eos_token_ids[0]], pad_token_id=0)
    for i in range(0, len(rows), batch):
        out += generate_tokens(model, rows[i:i + batch], None, cfg)
    return out


def logit_gap(model, prompt: list[int], tokens: list[int]) -> tuple[float, float, float]:
    """(max |native - eager|, mean of it, std of the eager logits) along `tokens` fed to both."""
    import torch

    from lmlab import engine
    from lmlab.generation.driver import DecoderOnlyRun

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        runs = [DecoderOnlyRun(model, ids, None, len(tokens) + 1), engine.select(model, "native").start(ids, None, len(tokens) + 1)]
        a, b = (r.prefill().float() for r in runs)
        gaps, spread = [(a - b).abs()], [a.std()]
        for t in tokens[:-1]:
            tok = torch.tensor([t])
            a, b = (r.step(tok).float() for r in runs)
            gaps.append((a - b).abs())
            spread.append(a.std())
    g = torch.stack(gaps)
    return float(g.max()), float(g.mean()), float(torch.stack(spread).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["int4", "int8", "fp32", "bf16"])
    parser.add_argument("--first", type=int, default=400, help="first dev record (default 400)")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4, help="prompts generated together (left-padded)")
    parser.add_argument("--logit-prompts", type=int, default=3, help="prompts whose logits are compared step by step")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    import torch

    torch.set_num_threads(args.threads)
    import lmlab
    from lmlab import engine

    if not DEV.exists():
        raise SystemExit(f"DialogSum dev split not found at {DEV}")
    tok = lmlab.load_tokenizer(MODEL)
    rows = prompts(tok, args.first, args.prompts)
    print(f"{len(rows)} DialogSum dev prompts ({args.first}-{args.first + len(rows) - 1}), {args.new_tokens} new tokens, "
          f"greedy, batches of {args.batch}, {args.threads} thread(s)")
    for mode in args.modes:
        model = load(mode)
        print(f"{mode}: engine {engine.resolve(model, 'native')[1]}")
        t = time.process_time()
        eager = generate(model, rows, args.new_tokens, "eager", args.batch)
        t_eager, t = time.process_time() - t, time.process_time()
        native = generate(model, rows, args.new_tokens, "native", args.batch)
        t_native = time.process_time() - t
        same = [a == b for a, b in zip(eager, native)]
        print(f"  identical greedy text: {sum(same)}/{len(same)}; generation CPU time eager {t_eager:.1f} s, "
              f"native {t_native:.1f} s ({t_eager / t_native:.2f}x)")
        for i, (a, b) in enumerate(zip(eager, native)):
            if a != b:
                at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                print(f"    record {args.first + i}: first different token at {at} of {len(a)}: "
                      f"eager {tok.decode(a[at:at + 6])!r} vs native {tok.decode(b[at:at + 6])!r}")
        for i in range(min(args.logit_prompts, len(rows))):
            hi, mean, spread = logit_gap(model, rows[i], eager[i])
            print(f"    logits along record {args.first + i}'s eager tokens: max |native - eager| {hi:.4f}, "
                  f"mean {mean:.5f} (eager logits' std {spread:.2f})")
    os.environ.pop("LMLAB_ENGINE", None)


if __name__ == "__main__":
    main()
