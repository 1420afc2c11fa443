"""Pre-packed GEMM linears (lmlab.nn.packed): same numbers as F.linear, restored on exit, no-op where unsupported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.generation import generate_tokens
from lmlab.model import Transformer
from lmlab.nn import packed
from lmlab.nn.packed import maybe_packed_linears, packed_gemm_available, packed_gemm_enabled, packed_linears

needs_mkl = pytest.mark.skipif(not packed_gemm_available(), reason="this torch build has no MKL packed sgemm ops")


def tiny(name="tiny-decoder", gain=1.5, **overrides):
    """A tiny model with large random weights, so greedy tokens vary and logits are O(1)."""
    model = Transformer(ModelConfig.from_name(name, **overrides))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * gain / p.shape[-1] ** 0.5)
    return model.eval()


def linears(model):
    return [m for m in model.modules() if type(m) is nn.Linear]


def close(a, b, tol=1e-4):
    """|a - b| <= tol * (logit scale)."""
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


@needs_mkl
@pytest.mark.parametrize("rows,max_rows", [(6, 6), (6, 8), (2, 8)])  # exact fit, and zero-padded up to max_rows
def test_packed_forward_matches_standard_and_really_packs(rows, max_rows):
    model = tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.tok_embed.weight  # the tied head is covered
    ids = torch.randint(0, 256, (rows // 2, 2))  # (B, T): B*T = rows rows in every Linear
    with torch.inference_mode():
        ref = model(ids)
        with packed_linears(model, max_rows) as active:
            assert active
            out = model(ids)
            states = [getattr(m, packed._STATE) for m in linears(model)]
            assert all(s.packed is not None for s in states)  # every Linear went through the packed path
        assert model.lm_head.weight is model.tok_embed.weight
    assert close(out, ref)


@needs_mkl
def test_packed_forward_encoder_decoder_and_bias():
    model = tiny("tiny-encoder-decoder")
    enc = tiny("tiny-encoder")  # BERT-style Linears have biases
    ids, dec = torch.randint(0, 256, (2, 3)), torch.randint(0, 256, (2, 3))
    with torch.inference_mode():
        ref, ref_enc = model(ids, decoder_input_ids=dec), enc(ids)
        with packed_linears(model, 6), packed_linears(enc, 6):
            out, out_enc = model(ids, decoder_input_ids=dec), enc(ids)
            assert any(m.bias is not None and getattr(m, packed._STATE).packed is not None for m in linears(enc))
    assert close(out, ref) and close(out_enc, ref_enc)


@needs_mkl
def test_other_row_counts_use_f_linear_unchanged():
    model = tiny()
    ids = torch.randint(0, 256, (2, 5))  # 10 rows > max_rows=4: the prefill's case
    with torch.inference_mode():
        ref = model(ids)
        with packed_linears(model, 4):
            out = model(ids)
            assert all(getattr(m, packed._STATE).packed is None for m in linears(model))
    assert torch.equal(out, ref)


@needs_mkl
def test_weight_changes_invalidate_the_packed_copy():
    model = tiny()
    lin = linears(model)[0]
    x = torch.randn(4, lin.in_features)
    with torch.inference_mode(), packed_linears(model, 4):
        first = lin(x)
        with torch.no_grad():
            lin.weight.mul_(2.0)  # in place: _version changes
        assert close(lin(x), 2 * first)
        lin.weight = nn.Parameter(torch.randn_like(lin.weight))  # a new tensor: data_ptr changes
        assert close(lin(x), torch.nn.functional.linear(x, lin.weight))


@needs_mkl
def test_context_restores_forwards_and_frees_packed_weights():
    model = tiny()
    custom = linears(model)[1]
    custom.forward = lambda x: torch.zeros(())  # an instance-level forward set by someone else
    own = custom.forward
    with pytest.raises(RuntimeError, match="boom"):
        with packed_linears(model, 4):
            assert all("forward" in m.__dict__ and hasattr(m, packed._STATE) for m in linears(model))
            raise RuntimeError("boom")
    assert custom.__dict__["forward"] is own
    others = [m for m in linears(model) if m is not custom]
    assert all("forward" not in m.__dict__ and not hasattr(m, packed._STATE) for m in others)
    assert not hasattr(custom, packed._STATE)


@needs_mkl
def test_nested_contexts_leave_linears_to_the_outer_one():
    model = tiny()
    with packed_linears(model, 4):
        outer = [getattr(m, packed._STATE) for m in linears(model)]
        with packed_linears(model, 8):
            assert [getattr(m, packed._STATE) for m in linears(model)] == outer
        assert all(hasattr(m, packed._STATE) for m in linears(model))
    assert not any(hasattr(m, packed._STATE) for m in linears(model))


@needs_mkl
def test_gradients_fall_back_to_f_linear():
    model = tiny()
    with packed_linears(model, 4):
        model.train(False)
        ids = torch.randint(0, 256, (2, 2))
        model(ids).sum().backward()  # grad mode: the unpacked path, so autograd works
    assert model.lm_head.weight.grad is not None


def test_no_op_when_ops_missing_training_or_not_fp32(monkeypatch):
    model = tiny()
    ids = torch.randint(0, 256, (2, 2))
    with torch.inference_mode():
        ref = model(ids)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)  # a build without MKL
    assert not packed_gemm_available()
    with torch.inference_mode(), packed_linears(model, 4) as active:
        assert not active and not any("forward" in m.__dict__ for m in linears(model))
        assert torch.equal(model(ids), ref)
    assert not packed_gemm_enabled(model, 8)
    monkeypatch.undo()
    with packed_linears(model.train(), 4) as active:  # training
        assert not active
    with packed_linears(tiny().to(torch.bfloat16), 4) as active:  # bf16
        assert not active


@needs_mkl
def test_environment_switch(monkeypatch):
    model = tiny()
    monkeypatch.delenv(packed.ENV_VAR, raising=False)
    assert packed_gemm_enabled(model, 4) and not packed_gemm_enabled(model, 2)  # default: where it pays
    monkeypatch.setenv(packed.ENV_VAR, "0")
    assert not packed_gemm_enabled(model, 4)
    with maybe_packed_linears(model, 4) as active:
        assert not active
    monkeypatch.delenv(packed.ENV_VAR)
    with maybe_packed_linears(model, 8) as active:  # 5..8 rows packed (zero-padded), fewer use F.linear
        assert active and getattr(linears(model)[0], packed._STATE).min_rows == 5
    monkeypatch.setenv(packed.ENV_VAR, "1")
    assert packed_gemm_enabled(model, 1)
    monkeypatch.setenv(packed.ENV_VAR, "yes")
    with pytest.raises(ConfigError, match="LMLAB_PACKED_GEMM='yes'"):
        packed_gemm_enabled(model, 4)


@needs_mkl
@pytest.mark.parametrize("name,beams", [("tiny-decoder", 1), ("tiny-encoder-decoder", 1), ("tiny-decoder", 2)])
def test_generation_same_tokens_with_fast_path_on_and_off(name, beams, monkeypatch):
    model = tiny(name, gain=3.0)
    prompts = [[5, 6, 7, 8, 9], [12, 13], [20, 21, 22, 23], [30, 31, 32]]  # batch 4, left-padded
    calls = []
    original = packed._packed_forward
    monkeypatch.setattr(packed, "_packed_forward", lambda self, x: (calls.append(x.shape), original(self, x))[1])
    monkeypatch.setenv(packed.ENV_VAR, "0")
    off = generate_tokens(model, prompts, max_new_tokens=10, num_beams=beams, eos_token_ids=[])
    assert not calls
    monkeypatch.delenv(packed.ENV_VAR)  # default: on for batched CPU fp32
    on = generate_tokens(model, prompts, max_new_tokens=10, num_beams=beams, eos_token_ids=[])
    assert calls  # the fast path really ran
    assert on == off
    assert not any(hasattr(m, packed._STATE) for m in linears(model))


@needs_mkl
def test_generation_with_rows_leaving_the_batch(monkeypatch):
    """Rows finish at different steps, so later steps have fewer rows than the packed M (zero-padded)."""
    model = tiny(gain=3.0)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23], [30, 31, 32], [40, 41, 42, 43, 44]]
    free = [generate_tokens(model, [p], max_new_tokens=12, eos_token_ids=[])[0] for p in prompts]
    eos = [free[0][2], free[1][5]]
    monkeypatch.setenv(packed.ENV_VAR, "0")
    off = generate_tokens(model, prompts, max_new_tokens=12, eos_token_ids=eos)
    assert len({len(r) for r in off}) > 1
    rows = []
    original = packed._packed_forward
    monkeypatch.setattr(packed, "_packed_forward",
                        lambda self, x: (rows.append(x.numel() // x.shape[-1]), original(self, x))[1])
    monkeypatch.delenv(packed.ENV_VAR)
    assert generate_tokens(model, prompts, max_new_tokens=12, eos_token_ids=eos) == off
    assert 5 in rows and (3 in rows or 4 in rows)  # steps before rows left, and zero-padded steps after


@pytest.mark.slow
@needs_mkl
def test_smollm2_batch_4_packed_matches_unpacked(smollm2_path, monkeypatch):
    """The real model: decode-step logits within 1e-4 of the logit scale, and the same greedy tokens."""
    import lmlab

    model = lmlab.load_model("smollm2-135m-instruct")
    tok = lmlab.load_tokenizer("smollm2-135m-instruct")
    prompts = ["The capital of France is", "Water boils at", "The three primary colours are", "Once upon a time"]
    ids, mask = tok.encode_batch(prompts)
    with torch.inference_mode():
        step = torch.full((4, 1), tok.encode(" the")[0])
        ref = model(step)
        with packed_linears(model, 4):
            out = model(step)
            assert getattr(model.lm_head, packed._STATE).packed is not None
    assert close(out, ref)
    monkeypatch.setenv(packed.ENV_VAR, "0")
    off = generate_tokens(model, ids, mask, max_new_tokens=24, eos_token_ids=[])
    monkeypatch.setenv(packed.ENV_VAR, "1")
    assert generate_tokens(model, ids, mask, max_new_tokens=24, eos_token_ids=[]) == off
