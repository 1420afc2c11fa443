"""lmlab.quant: int8/int4 kernels against a dequantize-then-matmul reference, the module swap, quantized
checkpoints, GGUF blocks loaded natively, LoRA over a quantized base, and generation unchanged.

Error bounds used below (u = 2^-8, the unit roundoff of bf16: 8 significant bits, round to nearest):

* kernel vs reference: the kernels take bf16 activations and return bf16, accumulating in fp32. Against
  ``bf16(x) @ W_deq^T`` in fp32, what is left is the output's rounding, at most twice (the sum may be
  rounded before the scale is applied, and again after): |err| <= 2 u |y|, plus fp32 accumulation
  (K * 2^-24 * |x| @ |W|^T, negligible). We allow 2 u |y| + 1e-5 |x| @ |W|^T (y without the bias,
  which is added in fp32).
* quantized vs float layer: each weight is off by at most half a step (int8: scale/2; int4: the group's
  scale/2, plus bf16 rounding of scale and zero, u (|q - 8| scale + |zero|)); the activations' bf16
  rounding adds u |x| @ |W|^T and the output u |y|.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lmlab
from lmlab.adapt.lora import LoraConfig, LoRALinear, apply_lora, merge_lora
from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, ConfigError
from lmlab.model import Transformer
from lmlab.quant import Int4Linear, Int8Linear, QuantizedEmbedding, is_quantized, quantize_model
from lmlab.quant.linear import pack_nibbles, unpack_nibbles

U = 2.0 ** -8


def _tiny(tie: bool = True) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-decoder", tie_embeddings=tie)
    return Transformer(cfg).eval()


def _linear(n: int = 48, k: int = 128) -> nn.Linear:
    torch.manual_seed(1)
    layer = nn.Linear(k, n)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        layer.weight[3, :7] = 0.9  # an outlier row: its scale differs from the others
    return layer.requires_grad_(False)


# --- kernels ---------------------------------------------------------------------------------------
def test_nibbles_round_trip():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (5, 32) and torch.equal(unpack_nibbles(packed), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)


@pytest.mark.parametrize("make", [lambda l: Int8Linear.from_float(l), lambda l: Int4Linear.from_float(l, 32),
                                  lambda l: Int4Linear.from_float(l, 64), lambda l: Int4Linear.from_float(l, 128)],
                         ids=["int8", "int4-g32", "int4-g64", "int4-g128"])
def test_kernel_matches_dequantize_then_matmul(make):
    layer = _linear()
    q = make(layer)
    x = torch.randn(5, 3, 128)
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == (5, 3, 48)
    w = q.dequantize()
    product = x.to(torch.bfloat16).float() @ w.T  # (5, 3, 48)
    bound = 2 * U * product.abs() + 1e-5 * (x.abs() @ w.abs().T) + 1e-6
    assert ((y - (product + layer.bias)).abs() <= bound).all(), (y - product - layer.bias).abs().max()


def test_int4_zero_point_convention_is_q_times_scale_plus_min():
    """A hand-built layer: every weight of group g of row n is 3 * scale + min, so the product is known."""
    N, K, G = 16, 64, 32
    qweight = pack_nibbles(torch.full((N, K), 3, dtype=torch.uint8))
    scale, minimum = torch.full((N, K // G), 0.5), torch.full((N, K // G), -1.0)
    layer = Int4Linear(qweight, scale, minimum, G)
    y = layer(torch.ones(1, K))
    assert torch.allclose(y, torch.full((1, N), K * (3 * 0.5 - 1.0)))  # exact in bf16: 32.0


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 128)])
def test_quantized_layer_stays_within_its_rounding_bound(bits, group):
    layer = _linear()
    q = Int8Linear.from_float(layer) if bits == 8 else Int4Linear.from_float(layer, group)
    x = torch.randn(7, 128)
    W = layer.weight
    if bits == 8:
        step = q.scale[:, None].expand_as(W)  # (N, K)
        rounding = step / 2 + U * W.abs()
    else:
        step = q.scale.repeat_interleave(group, dim=1)  # (N, K)
        zero = (q.min + 8 * q.scale).abs().repeat_interleave(group, dim=1)
        rounding = step / 2 + U * (8 * step + zero)
    assert ((q.dequantize() - W).abs() <= rounding * 1.01 + 1e-7).all()
    y, ref = q(x), layer(x)
    bound = x.abs() @ rounding.T + U * (x.abs() @ W.abs().T) + 2 * U * (ref - layer.bias).abs()
    assert ((y - ref).abs() <= 1.5 * bound).all()


def test_odd_output_width_is_padded_for_the_int4_kernel():
    layer = _linear(n=30, k=64)
    q = Int4Linear.from_float(layer, 32)
    x = torch.randn(3, 64)
    product = x.to(torch.bfloat16).float() @ q.dequantize().T
    assert q(x).shape == (3, 30) and ((q(x) - product - layer.bias).abs() <= 2 * U * product.abs() + 1e-5).all()


def test_quantized_layer_refuses_cuda_input_with_a_named_reason():
    q = Int8Linear.from_float(_linear())
    with pytest.raises(ConfigError, match="CPU kernels only.*meta"):
        q(torch.empty(2, 128, device="meta"))


# --- the model swap -----------------------------------------------------------------------------
def test_quantize_model_reports_every_linear_and_ties_the_embedding():
    model = _tiny(tie=True)
    float_logits = model(torch.tensor([[5, 6, 7, 8]]))
    float_head = model.lm_head.weight.detach().clone()  # (V, C), tied to the embedding
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    report = quantize_model(model, 4, 32)
    assert list(report.replaced) == linears and set(report.replaced.values()) == {"int4 g32"}
    assert report.embedding == "tied" and isinstance(model.tok_embed, QuantizedEmbedding)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert report.bytes_after < report.bytes_before / 4 and "int4 g32" in str(report)
    # the embedding reads the head's rows: the original float rows to within half a 4-bit step of each group of
    # 32 (a group's range cut in 15 steps), and each group's smallest and largest weight exactly
    ids = torch.tensor([[3, 200]])
    got = model.tok_embed(ids)[0].unflatten(-1, (-1, 32))  # (2, C/32, 32)
    want = float_head[[3, 200]].unflatten(-1, (-1, 32))  # (2, C/32, 32)
    half_step = (want.amax(-1) - want.amin(-1)) / 15 / 2  # (2, C/32)
    assert ((got - want).abs() <= half_step[..., None] + 1e-6).all()
    assert torch.allclose(got.amin(-1), want.amin(-1), atol=1e-6) and torch.allclose(got.amax(-1), want.amax(-1),
                                                                                        atol=1e-6)
    assert (got - want).abs().max() > 1e-4  # and it is the quantized table, not the float one
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    logits = model(torch.tensor([[5, 6, 7, 8]]))
    assert (logits - float_logits).abs().max() < 0.2 * float_logits.abs().max()


def test_quantize_model_by_layer_name_keeps_the_rest_float():
    model = _tiny(tie=True)
    report = quantize_model(model, 8, layers="q,down")
    assert sorted(report.replaced) == ["decoder.layers.0.attn.q", "decoder.layers.0.ffn.down",
                                       "decoder.layers.1.attn.q", "decoder.layers.1.ffn.down"]
    assert type(model.lm_head) is nn.Linear and isinstance(model.tok_embed, nn.Embedding)
    assert model.lm_head.weight is model.tok_embed.weight
    with pytest.raises(ConfigError, match="'nope' matches no linear layer"):
        quantize_model(model, 8, layers="nope")


def test_bad_bits_group_size_and_width_are_one_line_errors():
    with pytest.raises(ConfigError, match="bits=3 is not valid; choose one of: 8, 4"):
        quantize_model(_tiny(), 3)
    with pytest.raises(ConfigError, match="group_size=48 is not valid"):
        quantize_model(_tiny(), 4, 48)
    with pytest.raises(ConfigError, match="group_size=32 applies to int4 only"):
        quantize_model(_tiny(), 8, 32)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder", d_model=96, n_heads=4, n_kv_heads=2)).eval()
    with pytest.raises(ConfigError, match=r"'decoder.layers.0.attn.q'.*input width 96 is not divisible by 64"):
        quantize_model(model, 4, 64)
    assert not is_quantized(model)  # checked before anything was swapped
    with pytest.raises(ConfigError, match="quantize='int3' is not valid"):
        lmlab.load_model("x", quantize="int3")


# --- checkpoints -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group", [(8, None), (4, 64)])
def test_quantized_checkpoint_round_trip(tiny_model_dir, tmp_path, bits, group):
    from lmlab.quant.checkpoint import quantize_checkpoint

    out, report = quantize_checkpoint(tiny_model_dir, tmp_path / "q", bits, group)
    record = json.loads((out / "quantization.json").read_text())
    assert record["format"] == 1 and record["embedding"] == "tied" and set(record["layers"]) == set(report.replaced)
    model = lmlab.load_model(out)
    assert is_quantized(model) and isinstance(model.tok_embed, QuantizedEmbedding)
    reference = lmlab.load_model(tiny_model_dir)
    quantize_model(reference, bits, group)
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    assert torch.equal(model(ids), reference(ids))
    assert lmlab.load_tokenizer(out).encode("hello") == lmlab.load_tokenizer(tiny_model_dir).encode("hello")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("lm_head.qweight").dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert "tok_embed.weight" not in keys and "lm_head.weight" not in keys  # no float copy of the table
    with pytest.raises(CheckpointError, match="already quantized"):
        lmlab.load_model(out, quantize="int4")


def test_quantize_copies_the_prompt_recipe(tiny_model_dir, tmp_path):
    import shutil

    from lmlab.adapt.recipe import RECIPE_FILE, Recipe
    from lmlab.quant.checkpoint import quantize_checkpoint

    source = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, source)
    recipe = Recipe(template="t", instruction="Summarize.", chat=False, prompt_field="dialogue",
                    response_field="summary")
    recipe.save(source)
    out, _ = quantize_checkpoint(source, tmp_path / "q8", 8)
    assert Recipe.load(out) == recipe
    out, _ = quantize_checkpoint(tiny_model_dir, tmp_path / "plain", 8)  # a source without one: none
    assert not (out / RECIPE_FILE).exists()


def test_missing_kernel_is_a_one_line_error(tiny_model_dir, tmp_path, monkeypatch):
    from lmlab.quant.checkpoint import quantize_checkpoint

    out, _ = quantize_checkpoint(tiny_model_dir, tmp_path / "q4", 4)
    monkeypatch.delattr(torch, "_weight_int4pack_mm_for_cpu")
    with pytest.raises(CheckpointError, match=r"has no torch._weight_int4pack_mm_for_cpu"):
        lmlab.load_model(out)


def test_cli_quantize_info_and_bits_3(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli-q"
    assert main(["quantize", str(tiny_model_dir), str(out), "--bits", "4", "--group-size", "32"]) == 0
    assert "int4 g32" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    assert "15 layers int4 group 32; embedding tied" in capsys.readouterr().out
    assert main(["quantize", str(tiny_model_dir), str(tmp_path / "x"), "--bits", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--bits 3 is not valid" in err and len(err.strip().splitlines()) == 1


# --- LoRA over a quantized base --------------------------------------------------------------------
def test_lora_wraps_a_quantized_linear_and_merge_is_refused():
    model = _tiny()
    float_q = model.decoder.layers[0].attn.q.weight.detach().clone()  # (O, I)
    quantize_model(model, 8)
    report = apply_lora(model, LoraConfig(r=4, dropout=0.0, targets=("q", "v")))
    layer = model.decoder.layers[0].attn.q
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Int8Linear) and len(report.replaced) == 4
    # `weight` over an integer base: the dequantized matrix, near the float weight: half an int8 step of
    # rounding, plus the kernel's bf16 scale (2**-9 relative) on values up to 127 steps
    weight = layer.weight
    assert weight.shape == float_q.shape and weight.dtype == torch.float32
    step = float_q.abs().amax(dim=1, keepdim=True) / 127  # (O, 1): the per-channel int8 grid
    assert ((weight - float_q).abs() <= step * (0.5 + 127 * 2 ** -9) + 1e-7).all()
    assert not torch.equal(weight, float_q)  # it is the quantized matrix, not a kept float copy
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 64)
    expected = layer.base_layer(x) + layer.scaling * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer.lora_A.weight.requires_grad and layer.lora_A.weight.dtype == torch.float32
    with pytest.raises(ConfigError, match="cannot merge a LoRA adapter into a quantized Int8Linear"):
        merge_lora(model)


def test_adapter_loads_on_quantized_bases(tiny_model_dir, tmp_path):
    from lmlab.adapt.merge import merge_adapter
    from lmlab.adapt.peft import save_adapter
    from lmlab.quant.checkpoint import quantize_checkpoint

    model = lmlab.load_model(tiny_model_dir)
    config = LoraConfig(r=4, targets=("q", "v", "down"))
    apply_lora(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapter = save_adapter(model, tmp_path / "adapter", config)
    ids = torch.tensor([[1, 5, 9, 20]])
    for quantize in ("int8", "int4"):
        adapted = lmlab.load_model(tiny_model_dir, adapter=adapter, quantize=quantize)
        layer = adapted.decoder.layers[1].ffn.down
        assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, (Int8Linear, Int4Linear))
        plain = lmlab.load_model(tiny_model_dir, quantize=quantize)
        assert not torch.allclose(adapted(ids), plain(ids))  # the adapter changes the output
    quantized = quantize_checkpoint(tiny_model_dir, tmp_path / "q8", 8)[0]
    from_checkpoint = lmlab.load_model(quantized, adapter=adapter)  # mapped through stand-in weights
    assert isinstance(from_checkpoint.decoder.layers[0].attn.q.base_layer, Int8Linear)
    assert torch.equal(from_checkpoint(ids), lmlab.load_model(tiny_model_dir, adapter=adapter, quantize="int8")(ids))
    with pytest.raises(CheckpointError, match="its weights are quantized"):
        merge_adapter(quantized, adapter, tmp_path / "merged")


# --- generation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_batched_greedy_equals_alone_and_beams_find_the_best_continuation(tiny_model_dir, quantize):
    from lmlab.generation import generate

    model, tokenizer = lmlab.load_model(tiny_model_dir, quantize=quantize), lmlab.load_tokenizer(tiny_model_dir)
    prompts = ["#Person1#: Hello there, how", "#Person2#: I", "#Person1#: Could you tell me the way to"]
    batch = generate(model, tokenizer, prompts, max_new_tokens=12)
    alone = [generate(model, tokenizer, p, max_new_tokens=12) for p in prompts]
    assert batch == alone and any(batch)
    beams = generate(model, tokenizer, prompts[:2], max_new_tokens=8, num_beams=3)
    assert beams == [generate(model, tokenizer, p, max_new_tokens=8, num_beams=3) for p in prompts[:2]]
    # what 3 beams over 2 new tokens must find, by plain forward passes (no cache, no beam code): the 3 most
    # likely first tokens continue, and the best (first, second) pair among their continuations wins
    from lmlab.generation.decode import encode_prompts, generate_tokens

    for prompt in prompts[:2]:
        ids, _ = encode_prompts(tokenizer, [prompt])  # (1, T)
        with torch.no_grad():
            first = model(ids)[0, -1].float().log_softmax(-1)  # (V,)
            firsts = first.topk(3).indices  # (3,)
            assert tokenizer.eos_token_id not in firsts.tolist()  # no hypothesis finishes after one token
            second = model(torch.cat([ids.repeat(3, 1), firsts[:, None]], 1))[:, -1].float().log_softmax(-1)  # (3, V)
        total = first[firsts][:, None] + second  # (3, V) log p of each two-token continuation
        a, b = generate_tokens(model, ids, None, max_new_tokens=2, num_beams=3, tokenizer=tokenizer)[0]
        assert a in firsts.tolist()
        # the cached, batched kernels round differently from these full passes: a near-tie may go either way
        assert total[firsts.tolist().index(a), b] >= total.max() - 1e-3


# --- GGUF blocks loaded natively -------------------------------------------------------------------
def _rounded_linears(model: nn.Module):
    """Forward hooks that round every linear's input and output to bf16: the fp32 model with exactly the
    activation rounding the quantized kernels add (and none of their scale rounding)."""
    def pre(_, args):
        return (args[0].to(torch.bfloat16).float(),)

    def post(_, __, out):
        return out.to(torch.bfloat16).float()

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def _give_kernel_weights(reference: nn.Module, native: nn.Module) -> None:
    """Make the fp32 `reference` (same architecture) multiply by exactly the weights `native`'s kernels use:
    each quantized layer's ``dequantize()`` (bf16-rounded scales and zeros) and, for a quantized embedding,
    the rows it looks up (fp32 scales). A tied head is untied for that: the two differ by the scale rounding."""
    with torch.no_grad():
        for name, module in native.named_modules():
            if isinstance(module, Int4Linear | Int8Linear):
                reference.get_submodule(name).weight = nn.Parameter(module.dequantize(), requires_grad=False)
        if isinstance(native.tok_embed, QuantizedEmbedding):
            rows = native.tok_embed(torch.arange(native.tok_embed.num_embeddings))  # (V, C)
            reference.tok_embed.weight = nn.Parameter(rows, requires_grad=False)


def _rms(d: torch.Tensor) -> float:
    return d.double().pow(2).mean().sqrt().item()


def _activation_rounding_ratio(native: nn.Module, reference: nn.Module, prompts: list[torch.Tensor]) -> float:
    """rms(native - reference) / rms(rounded reference - reference) over the logits of all `prompts`,
    where `reference` already holds the kernels' weights (``_give_kernel_weights``).

    Why this ratio is about 1 on every CPU, and why the tests hold it to 2: with the kernels' own weights
    the only arithmetic the native model does differently from the fp32 reference is rounding each
    quantized linear's input and output to bf16 (the kernels return the correctly rounded bf16 of the
    exact product; probed on AVX-512 and AVX2 dispatch). The hooked reference rounds exactly the same
    tensors, so (native - reference) and (hooked - reference) are two draws of one noise process: the
    same ~2^-9 relative rounding errors at the same places, pushed through the same network; they differ
    only in which way the few near-tie roundings go, which is decided by the fp32 accumulation order of
    the GEMM underneath (MKL's AVX-512 and AVX2 sgemm sum differently, and so does the int4 kernel).
    On a deep model those few flips are amplified until the two draws are independent, so a single draw's
    *maximum* is a poor yardstick (on SmolLM2's file weights it moves 0.27 -> 0.48 when MKL is limited to
    AVX2, with the kernels' weights 0.48 -> 0.31, while the native logits stay put), but the RMS over
    thousands of logits is stable: measured 0.80-1.23 per prompt over 4 prompts x {AVX-512, AVX2} GEMMs on
    SmolLM2 (1.08 and 1.23 for the slow test's two prompts together). A real defect is far outside: one of
    SmolLM2's 210 int4 layers with its zero off by one step gives 3.2, swapped nibble halves in one layer
    39, one k projection left in llama.cpp's row order 46."""
    ours, exact, rounded = [], [], []
    with torch.no_grad():
        for ids in prompts:
            ours.append(native(ids).flatten())
            exact.append(reference(ids).flatten())
        handles = _rounded_linears(reference)
        for ids in prompts:
            rounded.append(reference(ids).flatten())
        for h in handles:
            h.remove()
    ours, exact, rounded = torch.cat(ours), torch.cat(exact), torch.cat(rounded)
    return _rms(ours - exact) / _rms(rounded - exact)


def _int4_scale_zero_rounding_ok(module: Int4Linear, w: torch.Tensor) -> bool:
    """The kernel's weight ``(q - 8) * bf16(scale) + bf16(zero)`` against the file's ``w`` (N, K): rounding to
    nearest bf16 moves scale and zero by at most 2^-9 of themselves, so each weight moves by at most
    2^-9 (|q - 8| scale + |zero|); checked with U = 2^-8, twice that, which leaves room for fp32 arithmetic."""
    G = module.group_size
    q = unpack_nibbles(module.qweight).float().unflatten(-1, (-1, G)) - 8  # (N, K/G, G)
    scale, zero = module.scale[..., None], (module.min + 8 * module.scale)[..., None]  # (N, K/G, 1)
    bound = (U * (q.abs() * scale.abs() + zero.abs())).flatten(-2)  # (N, K); Q4_0 scales can be negative
    return bool(((module.dequantize() - w).abs() <= bound).all())


@pytest.mark.parametrize("qname", ["Q4_0", "Q4_1"])
def test_gguf_q4_loads_natively_and_matches_the_dequantized_model(tmp_path, qname):
    """Two separate claims, each with its own bound: (1) the weights are the file's up to the kernel's bf16
    rounding of scale and zero (per weight); (2) given those weights, the native model differs from the
    fp32 model only by bf16 rounding of each linear's input and output (see _activation_rounding_ratio)."""
    import gguf
    from test_gguf import tiny_llama, write_llama_gguf

    from lmlab.checkpoints.gguf import load_gguf_model

    path = write_llama_gguf(tmp_path / f"tiny-{qname}.gguf", tiny_llama(), getattr(gguf.GGMLQuantizationType, qname))
    native = lmlab.load_model(path, quantize="native")
    assert all(spec == {"bits": 4, "group_size": 32} for spec in native.quantization["layers"].values())
    assert isinstance(native.decoder.layers[0].attn.q, Int4Linear)
    reference = load_gguf_model(path, progress=False)
    for name, module in native.named_modules():
        if isinstance(module, Int4Linear):
            assert _int4_scale_zero_rounding_ok(module, reference.get_submodule(name).weight), name
    _give_kernel_weights(reference, native)
    prompts = [torch.tensor([[1, 40, 90, 120, 200, 7, 64]]), torch.tensor([[1, 5, 17, 33, 250, 3, 99, 12, 8]])]
    assert _activation_rounding_ratio(native, reference, prompts) <= 2
    # the yardstick can fail: one layer whose kernel zero is off by one step (w - scale) is caught
    down = native.decoder.layers[1].ffn.down
    native.decoder.layers[1].ffn.down = Int4Linear(down.qweight, down.scale, down.min - down.scale, 32)
    assert _activation_rounding_ratio(native, reference, prompts) > 2


def test_gguf_q8_0_is_requantized_per_channel_within_half_a_step(tmp_path):
    import gguf
    from test_gguf import tiny_llama, write_llama_gguf

    from lmlab.checkpoints.gguf import load_gguf_model

    path = write_llama_gguf(tmp_path / "tiny-q8.gguf", tiny_llama(), gguf.GGMLQuantizationType.Q8_0)
    native = lmlab.load_model(path, quantize="native")
    dequantized = load_gguf_model(path, progress=False)
    for name in ("decoder.layers.0.attn.q", "decoder.layers.1.attn.k", "lm_head"):
        layer, w = native.get_submodule(name), dequantized.get_submodule(name).weight
        assert isinstance(layer, Int8Linear)
        # per-channel requantization: half a step of the row's scale, plus the scale's bf16 rounding
        bound = layer.scale[:, None] / 2 + U * w.abs()
        assert ((layer.dequantize() - w).abs() <= bound * 1.01 + 1e-7).all()
    ids = torch.tensor([[1, 40, 90, 120]])
    assert torch.equal(native(ids).argmax(-1), dequantized(ids).argmax(-1))


def test_gguf_other_quant_type_is_named_and_dequantized_on_request(tmp_path, tiny_model_dir):
    import gguf
    from test_gguf import tiny_llama, write_llama_gguf

    path = write_llama_gguf(tmp_path / "tiny-q6k.gguf", tiny_llama(d_model=256, d_ff=256),
                            gguf.GGMLQuantizationType.Q6_K)
    with pytest.raises(CheckpointError, match=r"holds Q6_K tensors, which have no native lmlab kernel"):
        lmlab.load_model(path, quantize="native")
    model = lmlab.load_model(path, quantize="native", dequantize_other=True)
    assert type(model.decoder.layers[0].attn.q) is nn.Linear  # the Q6_K layers run in fp32
    assert model(torch.tensor([[1, 2, 3]])).isfinite().all()
    with pytest.raises(CheckpointError, match="quantize='native' runs a GGUF file"):
        lmlab.load_model(tiny_model_dir, quantize="native")


@pytest.mark.slow
def test_smollm2_native_q4_1_matches_the_dequantized_model(smollm2_path):
    """The real file: 210 Q4_1 layers run as int4, the Q8_0 token table as a per-channel int8 tied head.

    The same two claims as the tiny Q4 test: every int4 weight is the file's up to the bf16 rounding of its
    scale and zero (per weight; the Q8_0 head's requantization is checked per weight on the tiny Q8_0
    file above), and with those weights the native logits are within bf16 activation rounding of the fp32
    model's (RMS within 2x that of the hooked fp32 model: see _activation_rounding_ratio for why).

    Not the file's own fp32 model at the maximum: the bf16 scale/zero rounding alone moves SmolLM2's
    logits by up to 0.62 (a group's 32 weights share one rounded scale and zero, so their errors add
    coherently), more than one draw of the activation rounding does (0.27-0.48 at the maximum, depending
    on which CPU's sgemm sums the reference), which is why "3x the activation rounding's maximum" failed
    on AVX-512 machines (0.90 > 0.81) and passes when MKL is limited to AVX2, by luck of the draw (0.90 < 1.43)."""
    native = lmlab.load_model(smollm2_path, quantize="native")
    assert native.quantization["gguf_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert native.quantization["embedding"] == "tied" and isinstance(native.lm_head, Int8Linear)
    tokenizer = lmlab.load_tokenizer(smollm2_path)
    prompts = [torch.tensor([tokenizer.encode(text)]) for text in (
        "#Person1#: Hi, I'd like to book a table for two tonight.\n"
        "#Person2#: Certainly, at what time would you like to come?",
        "#Person1#: Where is the train station?\n#Person2#: Go straight and turn left at the bank.")]
    reference = lmlab.load_model(smollm2_path)
    with torch.no_grad():
        file_logits = reference(prompts[0])
    for name, module in native.named_modules():
        if isinstance(module, Int4Linear):
            assert _int4_scale_zero_rounding_ok(module, reference.get_submodule(name).weight), name
    _give_kernel_weights(reference, native)
    assert _activation_rounding_ratio(native, reference, prompts) <= 2
    with torch.no_grad():
        ours = native(prompts[0])
    assert (ours.argmax(-1) == file_logits.argmax(-1)).float().mean() >= 0.8  # sanity: the file's model


def test_lab_runs_quantized_and_keeps_its_rows_apart(tiny_model_dir, tmp_path):
    from lmlab.tasks.summarize.lab import LabSettings, run_lab

    def settings(quantize):
        return LabSettings(model=str(tiny_model_dir), experiments="zero-shot-bare", limit=2, batch_size=2,
                           max_new_tokens=4, out=tmp_path / "lab", examples=0, quantize=quantize)

    lines = []
    result = run_lab(settings("int8"), echo=lines.append, progress=False)
    # the lab says it as lmlab generate does (one lmlab.precision.apply_precision)
    assert result.new_rows == 2 and any(line.startswith("precision: fp32 activations around quantized weights (")
                                        and "layers int8" in line for line in lines)
    # float rows are others: a float run in the same folder must not reuse the int8 rows
    with pytest.raises(ConfigError, match="different settings.*quantize"):
        run_lab(settings(None), echo=lambda _: None, progress=False)


def test_generate_and_summarize_take_quantize(tiny_model_dir, capsys):
    assert main(["generate", str(tiny_model_dir), "#Person1#: Hi", "--quantize", "int4", "--max-new-tokens", "3"]) == 0
    assert "fp32 activations around quantized weights (15 layers int4 group 32" in capsys.readouterr().err
    assert main(["summarize", "#Person1#: Hi.\n#Person2#: Hello.", "--model", str(tiny_model_dir), "--no-adapter",
                 "--quantize", "int8", "--max-new-tokens", "3"]) == 0
    assert "15 layers int8" in capsys.readouterr().err
    assert main(["generate", str(tiny_model_dir), "hi", "--quantize", "int3"]) == 2
    assert "quantize='int3' is not valid" in capsys.readouterr().err
