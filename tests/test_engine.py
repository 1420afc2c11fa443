"""Decode engines (lmlab.engine): the registry, the native C++ step and its kernels, its build cache.

The kernels are checked against a torch emulation of the same arithmetic (activations quantized to
int8 per block of 32, exact integer dot products), on every ISA path this CPU can run: AVX-512 VNNI
where present and the AVX2 path (forced), which is what AVX2-only machines run. Generation through
the native step is checked token for token against the eager path and transformers (fp32), and
against the eager quantized path within a stated logit tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lmlab import engine
from lmlab.engine import build, native
from lmlab.generation import GenerationConfig, generate_tokens
from lmlab.quant.linear import Int4Linear, Int8Linear

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ext():
    if build.compiler() is None or build.cpu_isa() in ("none", "unknown"):
        pytest.skip("no C++ compiler or no AVX2 here: the native engine cannot build (eager runs instead)")
    module = build.load(build_if_missing=True)
    yield module
    module.select_isa("")


def isas(ext) -> list[str]:
    return (["avx512"] if ext.cpu_has_avx512_vnni() else []) + ["avx2"]


# --- kernels against a torch emulation ------------------------------------------------------------
def quantize_act(x: torch.Tensor):
    """(B, K) -> (q (B, K) int, d (B, K/32)): the kernels' per-block int8 activations, in fp64."""
    B, K = x.shape
    blocks = x.double().reshape(B, K // 32, 32)
    d = blocks.abs().amax(-1) / 127  # (B, K/32)
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round((blocks.float() * inv.float()[..., None]).double())  # round half to even, like cvtps2dq
    return q.reshape(B, K), d


def emulate(weight_blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight_blocks(q, d) -> y: sum over blocks of d_x * (w . q_x) in fp64."""
    q, d = quantize_act(x)
    B, K = x.shape
    xq = (q.reshape(B, K // 32, 32) * d[..., None]).reshape(B, K)
    return xq @ weight_blocks.double().T


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("kind", ["int8", "int4-g32", "int4-g64", "int4-g128"])
def test_integer_kernels_match_emulation_on_every_isa(ext, kind, B):
    torch.manual_seed(1)
    N, K = 90, (224 if kind in ("int8", "int4-g32") else 256)  # 90 rows: a partial row group; 224: 7 blocks
    dense = nn.Linear(K, N, bias=True)
    layer = Int8Linear.from_float(dense) if kind == "int8" else Int4Linear.from_float(dense, int(kind.split("-g")[1]))
    lin = native.native_linear(ext, layer)
    x = torch.randn(B, K) * 3
    x[0, :32] = 0  # an all-zero block: scale 0 must not divide by zero
    ref = emulate(layer.dequantize(), x) + layer.bias.double()
    for isa in isas(ext):
        assert ext.select_isa(isa).startswith(isa[:4])
        y = lin(x)
        assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item()), (isa, (y - ref).abs().max())
    ext.select_isa("")
    # and the product is close to the float one (the activation's int8 rounding is the only difference)
    exact = x @ layer.dequantize().T + layer.bias
    assert (y - exact).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_kernels_match_torch(ext, dtype):
    torch.manual_seed(2)
    layer = nn.Linear(200, 70, bias=False).to(dtype)  # 200: not a multiple of the vector width (tail loop)
    lin = native.native_linear(ext, layer)
    x = torch.randn(5, 200)
    ref = x.double() @ layer.weight.double().T
    for isa in isas(ext):
        ext.select_isa(isa)
        assert torch.allclose(lin(x).double(), ref, rtol=1e-5, atol=1e-4)
    ext.select_isa("")


def test_packing_round_trips():
    values = torch.randint(0, 16, (20, 64), dtype=torch.uint8)  # 20 rows: padded to 32
    packed = native.pack_q4(values)
    assert packed.shape == (2, 2, 4, 64)
    # row 1, block 0, inputs 4..7 sit in lane 1 of vector 1 (low nibbles); inputs 20..23 in its high nibbles
    assert packed[0, 0, 1, 4] == values[1, 4] | (values[1, 20] << 4)
    assert packed[1, 1, 0, 3 * 4] == values[19, 32] | (values[19, 48] << 4)
    assert torch.equal(native.unpack_q4(packed, 20), values)
    q8 = torch.randint(-127, 128, (20, 64), dtype=torch.int8)
    assert torch.equal(native.deinterleave(native.interleave(q8), 20), q8)


# --- a tiny LLaMA-family model --------------------------------------------------------------------
def tiny_llama(seed: int = 0, layers: int = 2):
    """-> (hf, lmlab model): SmolLM2's architecture shrunk (GQA 4 heads / 2 kv heads, width 128)."""
    from lmlab.checkpoints import from_hf_model

    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=layers, vocab_size=160, rms_norm_eps=1e-5, rope_theta=100000.0,
                                   max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    hf = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[-1] ** 0.5)
    hf.eval()
    return hf, from_hf_model(hf)


def run_both(model, ids, mask=None, **kw):
    config = GenerationConfig(max_new_tokens=kw.pop("max_new_tokens", 24), eos_token_ids=[], pad_token_id=0, **kw)
    os.environ[engine.ENV] = "eager"
    try:
        eager = generate_tokens(model, ids, mask, config)
        os.environ[engine.ENV] = "native"
        mine = generate_tokens(model, ids, mask, config)
    finally:
        os.environ.pop(engine.ENV, None)
    return eager, mine


@pytest.fixture()
def native_on(ext, monkeypatch):
    monkeypatch.setenv(engine.ENV, "native")


def test_registry_picks_native_and_falls_back(ext, monkeypatch, capsys):
    hf, model = tiny_llama()
    assert engine.resolve(model, "auto")[0] == "native"
    assert engine.resolve(model, "compiled")[0] == "native"
    assert engine.resolve(model, "eager")[0] == "eager"
    assert isinstance(engine.select(model, "native"), native.NativeEngine)
    assert engine.select(model, "eager") is None
    with pytest.raises(Exception, match="engine='turbo' is not valid"):
        engine.select(model, "turbo")
    monkeypatch.setenv(engine.ENV, "bogus")
    with pytest.raises(Exception, match="LMLAB_ENGINE='bogus'"):
        engine.default_name()
    # an unsupported model: a note when asked for explicitly, silence under auto
    from lmlab.checkpoints import from_hf_model

    gpt2 = from_hf_model(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=50)))
    assert engine.resolve(gpt2, "auto")[0] == "eager"
    assert engine.select(gpt2, "native") is None
    assert "engine 'native' unavailable" in capsys.readouterr().err


def test_fp32_greedy_matches_transformers_and_eager(ext):
    hf, model = tiny_llama()
    ids = torch.randint(1, 160, (1, 9), generator=torch.Generator().manual_seed(3))
    theirs = hf.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24, pad_token_id=0)[0, 9:].tolist()
    eager, mine = run_both(model, ids)
    assert mine[0] == eager[0] == theirs


def test_padded_batch_beams_and_sampling_match_eager(ext):
    hf, model = tiny_llama(seed=1)
    rows = [[5, 9, 22, 31, 7, 8, 100], [44, 3], [17, 18, 19, 20]]
    eager, mine = run_both(model, rows)
    assert mine == eager
    eager, mine = run_both(model, rows[:2], num_beams=3, max_new_tokens=12)
    assert mine == eager
    eager, mine = run_both(model, rows, do_sample=True, temperature=0.8, top_k=20, seed=[1, 2, 3])
    assert mine == eager


@pytest.mark.parametrize("name", ["eager", "native"])
def test_samples_of_a_prompt_share_its_prefill_and_match_prefilling_each(ext, monkeypatch, name):
    """num_return_sequences=n (best-of-n, MBR): each prompt is prefilled once and its cache copied to its n rows;
    the tokens are those of the n copies prefilled one by one (padded batch, per-row seeds)."""
    from lmlab.generation import driver

    monkeypatch.setenv(engine.ENV, name)
    hf, model = tiny_llama(seed=2)
    rows, n = [[5, 9, 22, 31, 7, 8, 100], [44, 3, 12]], 3
    config = GenerationConfig(max_new_tokens=10, eos_token_ids=[7], pad_token_id=0, do_sample=True, temperature=0.9,
                              seed=list(range(11, 11 + len(rows) * n)))
    prefilled = []
    real = driver.DecoderOnlyRun.prefill
    monkeypatch.setattr(driver.DecoderOnlyRun, "prefill", lambda run: prefilled.append(run.input_ids.shape[0]) or real(run))
    shared = generate_tokens(model, rows, None, config, num_return_sequences=n)
    assert prefilled == [len(rows)]  # one prefill of the two prompts, not of six rows
    each = generate_tokens(model, [r for r in rows for _ in range(n)], None, config)
    assert prefilled[-1] == len(rows) * n
    assert shared == each and len({tuple(t) for t in shared[:n]}) > 1  # the samples differ, as seeded
    for bad, message in [(0, "num_return_sequences=0 must be an integer >= 1"),
                         (2, "num_return_sequences=2 needs sampling")]:
        with pytest.raises(Exception, match=message):
            generate_tokens(model, rows, None, config.replace(do_sample=bad == 0, seed=None), num_return_sequences=bad)


def test_native_step_matches_recomputing_the_whole_sequence(ext):
    """Cached (native steps over the eager prefill's cache) vs recomputed (one forward over everything)."""
    hf, model = tiny_llama(seed=2)
    ids = torch.randint(1, 160, (2, 6), generator=torch.Generator().manual_seed(4))
    run = engine.select(model, "native").start(ids, None, 8)
    run.prefill()
    seq = ids
    for _ in range(5):
        tok = torch.randint(1, 160, (2,))
        step_logits = run.step(tok)
        seq = torch.cat([seq, tok[:, None]], 1)
        with torch.no_grad():
            full = model(seq)[:, -1]
        assert torch.allclose(step_logits, full, atol=1e-4, rtol=1e-4)


def test_weight_changes_rebuild_and_lora_follows_its_switch(ext):
    from lmlab.adapt.lora import LoraConfig, apply_lora, lora_disabled

    hf, model = tiny_llama(seed=3)
    ids = torch.randint(1, 160, (1, 5), generator=torch.Generator().manual_seed(5))
    eng = engine.select(model, "native")

    def step_logits():
        run = eng.start(ids, None, 4)
        run.prefill()
        return run.step(torch.tensor([7]))

    before = step_logits()
    with torch.no_grad():
        model.decoder.layers[0].ffn.down.weight.mul_(1.5)  # in place: same storage, new version
    after = step_logits()
    assert not torch.allclose(before, after)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=["q", "v", "down"]))
    model.eval()  # the adapters' dropout off, as generation has it
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    eng = engine.select(model, "native")
    with torch.no_grad():
        recomputed = model(torch.cat([ids, torch.tensor([[7]])], 1))[:, -1]
    assert torch.allclose(step_logits(), recomputed, atol=1e-4)
    with lora_disabled(model), torch.no_grad():
        base = model(torch.cat([ids, torch.tensor([[7]])], 1))[:, -1]
        assert torch.allclose(step_logits(), base, atol=1e-4)
    assert not torch.allclose(base, recomputed)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_native_close_to_eager(ext, mode):
    """Both paths against the same weights in fp32: native's int8 activations cost ~2-3x eager's bf16 ones."""
    import copy

    from lmlab.generation.driver import DecoderOnlyRun
    from lmlab.quant.linear import QuantizedLinear, float_linear
    from lmlab.quant.model import quantize_model

    hf, model = tiny_llama(seed=4)
    quantize_model(model, bits=8 if mode == "int8" else 4, group_size=None if mode == "int8" else 32)
    reference = copy.deepcopy(model)  # the dequantized weights in fp32 nn.Linears
    for parent in list(reference.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear):
                setattr(parent, name, float_linear(child))
    ids = torch.randint(1, 160, (3, 7), generator=torch.Generator().manual_seed(6))
    tok = torch.tensor([3, 50, 99])
    runs = [engine.select(model, "native").start(ids, None, 6), DecoderOnlyRun(model, ids, None, 6)]
    mine, eager = (run.prefill() is not None and run.step(tok) for run in runs)
    with torch.no_grad():
        exact = reference(torch.cat([ids, tok[:, None]], 1))[:, -1]
    span = exact.abs().max()
    assert (mine - exact).abs().max() < 0.05 * span
    assert (mine - exact).abs().max() < 5 * (eager - exact).abs().max() + 1e-3
    assert torch.equal(mine.argmax(-1), exact.argmax(-1))


# --- the build cache ------------------------------------------------------------------------------
def test_missing_build_and_failed_build_fall_back_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMLAB_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_loaded", None)
    hf, model = tiny_llama()
    ok, why = native.available(model)
    assert not ok and "not built yet" in why
    assert engine.select(model, "auto") is None and capsys.readouterr().err == ""  # auto: silent
    assert engine.select(model, "native") is None
    assert "not built yet" in capsys.readouterr().err
    # a failing compiler: recorded once, later processes do not retry
    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setattr(build, "_compile", lambda target, verbose=False: (_ for _ in ()).throw(RuntimeError("boom: g++ died")))
    with pytest.raises(RuntimeError, match="build failed: boom"):
        build.load()
    assert (build.entry_dir() / "failed.txt").read_text().startswith("boom")
    assert not build.library_path().exists()
    monkeypatch.setattr(build, "_loaded", None)
    with pytest.raises(RuntimeError, match="its build failed earlier"):
        build.load()
    monkeypatch.setattr(build, "_loaded", None)


def test_corrupt_entry_is_rebuilt(ext, tmp_path, monkeypatch):
    real = build.library_path()
    monkeypatch.setenv("LMLAB_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_loaded", None)
    target = build.library_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\x7fELF truncated")
    calls = []

    def fake_compile(path, verbose=False):  # stands in for the compiler: a complete library, renamed into place
        calls.append(path)
        staged = path.parent / ".staged"
        staged.write_bytes(real.read_bytes())
        os.replace(staged, path)
        return build._import(path)

    monkeypatch.setattr(build, "_compile", fake_compile)
    module = build.load()
    assert calls == [target] and hasattr(module, "NativeModel")
    monkeypatch.setattr(build, "_loaded", None)


def test_killed_build_leaves_no_entry(tmp_path):
    """A build killed mid-compile leaves no library and no failure record: the next process builds again."""
    code = ("import os, signal, lmlab.engine.build as b\n"
            "def die(*a, **k): os.kill(os.getpid(), signal.SIGKILL)\n"
            "import torch.utils.cpp_extension as e; e.load = die\n"
            "b.load()\n")
    env = dict(os.environ, LMLAB_ENGINE_CACHE=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert proc.returncode == -9
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("failed.txt"))


def test_step_slots_decodes_rows_at_different_lengths(ext):
    """The slot API (what a serving runner calls): two prompts of different lengths in rows 2 and 0 of one
    shared cache, decoded together, give each prompt's own greedy tokens."""
    from lmlab.generation.driver import DecoderOnlyRun

    hf, model = tiny_llama(seed=5)
    prompts = [[5, 9, 22, 31, 7, 8, 100, 3], [44, 3, 70]]
    alone = [generate_tokens(model, [p], None, GenerationConfig(max_new_tokens=6, eos_token_ids=[], pad_token_id=0))[0]
             for p in prompts]
    cfg = model.config
    k = [torch.zeros(3, cfg.n_kv_heads, 32, cfg.head_dim) for _ in range(cfg.n_layers)]
    v = [torch.zeros_like(t) for t in k]
    rows, lengths, tokens = torch.tensor([2, 0]), torch.tensor([len(p) for p in prompts]), []
    for p, row in zip(prompts, rows.tolist()):  # prefill each slot on its own (eager), copy it in
        run = DecoderOnlyRun(model, torch.tensor([p]), None, 1)
        with torch.inference_mode():
            tokens.append(int(run.prefill().argmax(-1)))
        for layer, cache in enumerate(run.cache.layers):
            k[layer][row, :, :len(p)] = cache.k[0, :, :len(p)]
            v[layer][row, :, :len(p)] = cache.v[0, :, :len(p)]
    eng = engine.select(model, "native")
    out = [[t] for t in tokens]
    tok = torch.tensor(tokens)
    for _ in range(5):
        tok = eng.step_slots(tok, k, v, rows, lengths).argmax(-1)
        lengths = lengths + 1
        for o, t in zip(out, tok.tolist()):
            o.append(t)
    assert out == alone
    with pytest.raises(Exception, match="outside the cache"):
        eng.step_slots(tok, k, v, torch.tensor([3, 0]), lengths)


@pytest.mark.parametrize("argv", [["generate", "m", "p"], ["summarize"], ["lab"], ["distill"], ["prefs", "build", "--out", "x.jsonl"],
                                  ["serve", "m"], ["finetune"], ["ask", "idx", "q"], ["extract"]])
def test_engine_flag_on_every_generating_command(argv, monkeypatch):
    from lmlab.cli import build_parser

    args = build_parser(load_commands=[argv[0]]).parse_args([*argv, "--engine", "eager"])
    assert args.engine == "eager"
    monkeypatch.delenv(engine.ENV, raising=False)
    engine.set_default(args.engine)
    assert engine.default_name() == "eager"


def test_bf16_model_runs_native_over_its_bf16_cache(ext):
    """bf16 weights and a bf16 KV cache (what --precision bf16 gives): the native step computes in fp32 over
    them, so it lands nearer the fp32 result of the same weights than the eager bf16 step does."""
    import copy

    from lmlab.generation.driver import DecoderOnlyRun

    hf, model = tiny_llama(seed=6)
    model = model.to(torch.bfloat16)
    reference = copy.deepcopy(model).float()  # the same (bf16-rounded) weights, fp32 arithmetic
    ids = torch.randint(1, 160, (2, 6), generator=torch.Generator().manual_seed(7))
    tok = torch.tensor([11, 12])
    runs = [engine.select(model, "native").start(ids, None, 4), DecoderOnlyRun(model, ids, None, 4)]
    assert runs[0].cache.layers[0].k.dtype == torch.bfloat16
    mine, eager = (run.prefill() is not None and run.step(tok).float() for run in runs)
    with torch.no_grad():
        exact = reference(torch.cat([ids, tok[:, None]], 1))[:, -1]
    assert (mine - exact).abs().max() <= (eager - exact).abs().max()
    assert (mine - exact).abs().max() < 0.05 * exact.abs().max()
