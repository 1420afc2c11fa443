"""Structured-output benchmark: the grammar engine's cost, and the constraint's overhead per decode step.

1. Engines (``llguidance``, the one lmlab uses, against ``outlines-core``), on SmolLM2's 49,152-token vocabulary:
   * compile: schema -> a matcher ready for its first mask (what each request with its own schema pays);
   * mask: the allowed-token bitmask at each position while walking a valid document token by token.
2. Overhead: SmolLM2-135M-Instruct extracting ``{speakers, topic, decision, amount}`` from dev dialogues, greedy,
   batch 1 and batch 8; the time spent in the grammar step of the processor chain (advance + mask + apply)
   against the rest of each decode step (the prefill, timed by a one-token run, is left out of both),
   measured in the same runs.

    python benchmarks/structured.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DEV = REPO.parent / "shared" / "data" / "dialogsum" / "dev.jsonl"

NESTED = {"type": "object", "additionalProperties": False, "required": ["orders", "customer"],
          "properties": {"customer": {"type": "object", "required": ["name", "tier"], "additionalProperties": False,
                                      "properties": {"name": {"type": "string"}, "tier": {"enum": ["gold", "silver"]},
                                                     "email": {"type": "string"}}},
                         "orders": {"type": "array", "maxItems": 5, "items": {
                             "type": "object", "required": ["item", "qty"], "additionalProperties": False,
                             "properties": {"item": {"type": "string"}, "qty": {"type": "integer"},
                                            "price": {"type": "number"}, "gift": {"type": "boolean"}}}}}}
EXAMPLES = {"extract": '{"speakers":["Tom","the waiter"],"topic":"ordering food","decision":"Tom orders soup",'
                       '"amount":12.5}',
            "nested": '{"customer":{"name":"Ann","tier":"gold"},'
                      '"orders":[{"item":"tea","qty":2,"price":3.5},{"item":"cake","qty":1,"gift":true}]}'}


def _outlines_vocabulary(tok):
    """outlines-core's Vocabulary from a byte-level BPE tokenizer (tokens mapped back to their bytes)."""
    import outlines_core

    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    by_bytes: dict[bytes, list[int]] = {}
    special = tok.special_ids
    for token, i in tok.backend.get_vocab().items():
        if i not in special and all(ch in chars for ch in token):
            by_bytes.setdefault(bytes(chars[ch] for ch in token), []).append(i)
    return outlines_core.Vocabulary(tok.eos_token_id, by_bytes)


def engines(tok, vocab_size: int) -> None:
    import llguidance
    import outlines_core

    from lmlab.generation.constrain import Constraint
    from lmlab.tasks.summarize.extract import SCHEMA

    schemas = {"extract": SCHEMA, "nested": NESTED}
    Constraint(tok, SCHEMA, vocab_size=vocab_size)  # builds llguidance's tokenizer once (cached per process)
    t = time.perf_counter()
    vocab = _outlines_vocabulary(tok)
    oc_vocab_s = time.perf_counter() - t
    print(f"\ngrammar engines on a {vocab_size}-token vocabulary (outlines-core vocabulary: {oc_vocab_s:.2f} s once)")
    print("| schema | engine | compile ms | mask us/token (median, p95) |")
    print("|---|---|---|---|")
    for name, schema in schemas.items():
        ids = tok.encode(json.dumps(json.loads(EXAMPLES[name])))  # lmlab's separators: ", " and ": "
        # llguidance
        t = time.perf_counter()
        c = Constraint(tok, schema, vocab_size=vocab_size)
        m = c.new_matcher()
        compile_ms = (time.perf_counter() - t) * 1000
        times = []
        for token in ids:
            t = time.perf_counter()
            m.allowed()
            times.append(time.perf_counter() - t)
            m.advance(token)
        print(f"| {name} | llguidance | {compile_ms:.1f} | {np.median(times) * 1e6:.0f}, "
              f"{np.percentile(times, 95) * 1e6:.0f} |")
        if name != "extract":  # outlines-core's compile grows fast with the schema: measured on one schema only
            print(f"| {name} | outlines-core | (not run) | |")
            continue
        # outlines-core
        t = time.perf_counter()
        index = outlines_core.Index(outlines_core.json_schema.build_regex_from_schema(json.dumps(schema)), vocab)
        guide = outlines_core.Guide(index)
        compile_ms = (time.perf_counter() - t) * 1000
        mask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        times = []
        for token in ids:
            t = time.perf_counter()
            guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)
            bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[:vocab_size]
            torch.from_numpy(bits.view(np.bool_))
            times.append(time.perf_counter() - t)
            try:
                guide.advance(token)
            except Exception:  # outlines' regex tokenizes the example differently: stop the walk there
                break
        print(f"| {name} | outlines-core | {compile_ms:.1f} | {np.median(times) * 1e6:.0f}, "
              f"{np.percentile(times, 95) * 1e6:.0f} |")


def overhead(model, tok, batch_sizes=(1, 8), max_new_tokens: int = 48) -> None:
    import lmlab.generation.processors as processors
    from lmlab.generation import GenerationConfig, generate_tokens
    from lmlab.generation.decode import encode_prompts
    from lmlab.tasks.summarize.extract import extraction_prompt, extraction_constraint

    records = [json.loads(line) for line in open(DEV)][400:408]
    constraint = extraction_constraint(model, tok)
    spent = []
    original = processors.GrammarConstraint.__call__

    def timed(self, input_ids, logits):
        t = time.perf_counter()
        out = original(self, input_ids, logits)
        spent.append(time.perf_counter() - t)
        return out

    processors.GrammarConstraint.__call__ = timed
    print(f"\nconstraint overhead, SmolLM2-135M-Instruct, greedy, {torch.get_num_threads()} thread(s)")
    print("| batch | decode steps | prefill ms | step ms (without the grammar) | grammar ms/step | overhead |")
    print("|---|---|---|---|---|---|")
    try:
        for B in batch_sizes:
            prompts = [extraction_prompt(tok, r["dialogue"]) for r in records[:B]]
            ids, mask = encode_prompts(tok, prompts)
            config = GenerationConfig(max_new_tokens=max_new_tokens, constraint=constraint)
            generate_tokens(model, ids, mask, config.replace(max_new_tokens=2))  # warm-up
            t = time.perf_counter()
            generate_tokens(model, ids, mask, config.replace(max_new_tokens=1))  # the prefill (+ one grammar step)
            prefill = time.perf_counter() - t
            spent.clear()
            t = time.perf_counter()
            out = generate_tokens(model, ids, mask, config, tokenizer=tok)
            decode = time.perf_counter() - t - prefill  # the decode steps only
            steps = len(spent) - 1
            grammar = sum(spent[1:])
            step = (decode - grammar) / steps
            print(f"| {B} | {steps} | {prefill * 1000:.0f} | {step * 1000:.1f} | {grammar / steps * 1000:.2f} | "
                  f"{grammar / (decode - grammar) * 100:.1f}% |")
            complete = 0
            for row in out:  # a row is valid JSON unless max_new_tokens cut it short
                try:
                    constraint.parse_output(tok.decode(row))
                    complete += 1
                except Exception:
                    pass
            print(f"  (batch {B}: {complete}/{B} rows complete and valid within {max_new_tokens} tokens)")
    finally:
        processors.GrammarConstraint.__call__ = original


def main() -> None:
    import lmlab

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = lmlab.load_model("smollm2-135m-instruct")
    tok = lmlab.load_tokenizer("smollm2-135m-instruct")
    engines(tok, model.config.vocab_size)
    overhead(model, tok, max_new_tokens=args.max_new_tokens)


if __name__ == "__main__":
    main()
