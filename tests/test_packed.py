"""Pre-packed GEMM linears (lmlab.nn.packed): same numbers as F.linear, restored on exit, no-op where unsupported;
packed once per model; turned on only where a (cached) calibration measures it faster."""

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
from parity import fp32_bound

needs_mkl = pytest.mark.skipif(not packed_gemm_available(), reason="this torch build has no MKL packed sgemm ops")


@pytest.fixture(autouse=True)
def _private_calibration_cache(tmp_path, monkeypatch):
    """Each test starts with no remembered calibration and a cache file of its own (never the user's)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(packed, "_VERDICTS", {})


def fake_timer(monkeypatch, packed_s, plain_s):
    """Replace the timed comparison by fixed seconds; returns the list of calls it received."""
    calls = []

    def seconds(model, rows, packed, repeats=5):
        calls.append((rows, packed))
        return packed_s if packed else plain_s

    monkeypatch.setattr(packed, "_matmul_seconds", seconds)
    return calls


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


def close(a, b, config):
    """|a - b| within the fp32 rounding bound of `config`'s model (tests/parity.py): packed and plain
    GEMMs compute the same products and only round their sums in another order."""
    return float((a - b).abs().max()) <= fp32_bound(b, config)


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
    assert close(out, ref, model.config)


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
    assert close(out, ref, model.config) and close(out_enc, ref_enc, enc.config)


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
        assert close(lin(x), 2 * first, model.config)
        lin.weight = nn.Parameter(torch.randn_like(lin.weight))  # a new tensor: data_ptr changes
        assert close(lin(x), torch.nn.functional.linear(x, lin.weight), model.config)


@needs_mkl
def test_context_restores_forwards_and_keeps_packed_weights_until_released():
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
    assert all("forward" not in m.__dict__ and not hasattr(m, packed._ACTIVE) for m in others)
    assert not hasattr(custom, packed._ACTIVE)
    with torch.inference_mode(), packed_linears(model, 4):
        model(torch.randint(0, 256, (4, 1)))  # 4 rows: packs every Linear
    kept = packed.packed_bytes(model)
    assert kept >= sum(m.weight.numel() * 4 for m in linears(model))  # at least one more copy of the weights
    assert packed.release_packed(model) == kept and packed.packed_bytes(model) == 0
    assert not any(hasattr(m, packed._STATE) for m in linears(model))


@needs_mkl
def test_nested_contexts_leave_linears_to_the_outer_one():
    model = tiny()
    with packed_linears(model, 4):
        outer = [getattr(m, packed._STATE) for m in linears(model)]
        with packed_linears(model, 8):
            assert [getattr(m, packed._STATE) for m in linears(model)] == outer
        assert all(getattr(m, packed._ACTIVE, False) for m in linears(model))
    assert not any(hasattr(m, packed._ACTIVE) for m in linears(model))


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
    fake_timer(monkeypatch, packed_s=1.0, plain_s=2.0)  # calibration: packing pays
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
    monkeypatch.setenv(packed.ENV_VAR, "1")  # forced on
    on = generate_tokens(model, prompts, max_new_tokens=10, num_beams=beams, eos_token_ids=[])
    assert calls  # the fast path really ran
    assert on == off
    assert not any(hasattr(m, packed._ACTIVE) or "forward" in m.__dict__ for m in linears(model))


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
    monkeypatch.setenv(packed.ENV_VAR, "1")
    assert generate_tokens(model, prompts, max_new_tokens=12, eos_token_ids=eos) == off
    assert 5 in rows and (3 in rows or 4 in rows)  # steps before rows left, and zero-padded steps after



# --- calibration: on only where it measures faster, decided once ---------------------------------
@needs_mkl
@pytest.mark.parametrize("packed_s,plain_s,expected", [(0.5, 1.0, True), (1.0, 0.9, False), (0.96, 1.0, False)])
def test_calibration_turns_packing_on_only_where_it_measures_faster(monkeypatch, packed_s, plain_s, expected):
    monkeypatch.delenv(packed.ENV_VAR, raising=False)
    calls = fake_timer(monkeypatch, packed_s, plain_s)
    model = tiny()
    assert packed_gemm_enabled(model, 8) is expected  # 0.96 is within noise of 1.0: stays off (PAYS_BELOW)
    assert calls == [(8, False), (8, True)] * packed.CALIBRATION_ROUNDS  # alternating: both see the same load
    calls.clear()
    with maybe_packed_linears(model, 8) as active:
        assert active is expected
    assert not calls  # remembered in this process: measured once
    assert expected == ("packed (" in packed.describe_packed_gemm(model, 8))
    assert not packed_gemm_enabled(model, 2) and not calls  # below AUTO_MIN_ROWS: never, not measured


@needs_mkl
def test_calibration_is_cached_in_a_file_keyed_by_machine_threads_rows_and_shapes(monkeypatch, tmp_path):
    import json

    monkeypatch.delenv(packed.ENV_VAR, raising=False)
    calls = fake_timer(monkeypatch, packed_s=0.5, plain_s=1.0)
    model = tiny()
    assert packed.packing_pays(model, 8)
    stored = json.loads((tmp_path / "cache" / "lmlab" / "packed_gemm.json").read_text())
    key = json.loads(next(iter(stored)))
    assert key[:4] == [packed._cpu_model(), torch.__version__, torch.get_num_threads(), 8]
    assert stored[next(iter(stored))] == {"packed_pays": True, "packed_s": 0.5, "plain_s": 1.0}
    measured = len(calls)
    monkeypatch.setattr(packed, "_VERDICTS", {})  # a new process: the file answers, nothing is timed
    assert packed.packing_pays(model, 8) and len(calls) == measured
    assert packed.packing_pays(tiny(d_model=32, n_heads=2), 8) and len(calls) == 2 * measured  # other shapes
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        packed.packing_pays(model, 8)
        assert len(calls) == 3 * measured  # another thread count: measured again
    finally:
        torch.set_num_threads(threads)


@needs_mkl
@pytest.mark.parametrize("pays", [True, False])
def test_the_real_timed_comparison_runs_every_weight_and_keeps_copies_only_if_packing_wins(monkeypatch, pays):
    """Not a speed assertion: real timing runs, weights are untouched, and the packed copies the
    calibration made stay only when packing won (generation then reuses them)."""
    monkeypatch.delenv(packed.ENV_VAR, raising=False)
    model = tiny()
    before = [m.weight.clone() for m in linears(model)]
    assert packed._matmul_seconds(model, 4, packed=False, repeats=1) > 0
    assert packed.packed_bytes(model) == 0
    assert packed._matmul_seconds(model, 4, packed=True, repeats=1) > 0
    assert packed.packed_bytes(model) > 0 and not any("forward" in m.__dict__ for m in linears(model))
    assert all(torch.equal(a, m.weight) for a, m in zip(before, linears(model)))
    packed.release_packed(model)
    real = packed._matmul_seconds

    def scaled(m, rows, packed, repeats=3):  # real passes; the verdict forced by scaling the plain time
        return real(m, rows, packed, 1) * (1.0 if packed else 1e6 if pays else 1e-6)

    monkeypatch.setattr(packed, "_matmul_seconds", scaled)
    assert packed.packing_pays(model, 4) is pays
    assert (packed.packed_bytes(model) > 0) is pays


@needs_mkl
def test_weights_are_packed_once_per_model_across_generate_calls(monkeypatch):
    monkeypatch.setenv(packed.ENV_VAR, "1")
    model = tiny(gain=3.0)
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16]]
    packs = []
    original = packed._pack
    monkeypatch.setattr(packed, "_pack", lambda weight, rows: (packs.append(rows), original(weight, rows))[1])
    first = generate_tokens(model, prompts, max_new_tokens=6, eos_token_ids=[])
    copies = [getattr(m, packed._STATE).packed for m in linears(model)]
    assert all(c is not None for c in copies) and packed.packed_bytes(model) > 0
    second = generate_tokens(model, prompts, max_new_tokens=6, eos_token_ids=[])
    assert second == first
    assert [getattr(m, packed._STATE).packed for m in linears(model)] == copies  # the same packed tensors
    assert packs == [4] * len(linears(model))  # each Linear packed exactly once over both calls


@pytest.mark.slow
@needs_mkl
def test_smollm2_batch_4_packed_matches_unpacked(smollm2_path, monkeypatch):
    """The real model: decode-step logits within the fp32 rounding bound, and the same greedy tokens."""
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
    assert close(out, ref, model.config)
    monkeypatch.setenv(packed.ENV_VAR, "0")
    off = generate_tokens(model, ids, mask, max_new_tokens=24, eos_token_ids=[])
    monkeypatch.setenv(packed.ENV_VAR, "1")
    assert generate_tokens(model, ids, mask, max_new_tokens=24, eos_token_ids=[]) == off
