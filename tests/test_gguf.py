"""GGUF checkpoints: lmlab logits == transformers' GGUF loading (tiny files written here, and real SmolLM2).

The tiny files are written with `gguf.GGUFWriter` from a random `transformers` LLaMA, with q/k rows
permuted the way llama.cpp's converter does. Three-way checks catch both a missing un-permutation and
a permutation that does not match llama.cpp's: lmlab vs the original HF model (ground truth) and
lmlab vs transformers' own GGUF loader (an independent reader of the same bytes).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from lmlab.checkpoints.gguf import (SUPPORTED_QUANT_TYPES, gguf_config, load_gguf_model, permute_qk, read_gguf,
                                    read_gguf_config, read_gguf_metadata, unpermute_qk)
from lmlab.errors import CheckpointError
from lmlab.model import Transformer
from lmlab.tokenizer import byte_alphabet
from parity import fp32_bound

Q = gguf.GGMLQuantizationType

# --- a tiny byte-level BPE vocabulary (gpt2-style) ---------------------------------------------------
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ w", "o r", "l l", "Ġw or", "l d", "Ġwor ld",
          "e l", "el l", "H ell", "Hell o", "Ġ in", "Ġa n", "Ġan d", "Ġ 1", "2 3"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): 3 control tokens, the 256 byte symbols, one token per merge."""
    tokens = SPECIALS + [byte_alphabet()[b] for b in range(256)]
    tokens += [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, MERGES


def tiny_llama(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2, tie=False):
    """A random transformers LLaMA with the tiny vocabulary's size."""
    cfg = transformers.LlamaConfig(
        vocab_size=len(tiny_vocab()[0]), hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, i, *rest = hf_name.split(".")  # model.layers.{i}.self_attn.q_proj.weight
    return f"blk.{i}.{_HF_TO_GGUF['.'.join(rest[:-1])]}.weight"


def _encode_tensor(array: np.ndarray, qtype, rng: np.random.Generator):
    """(data, raw_dtype) for GGUFWriter.add_tensor. K-quants have no Python quantizer: random blocks whose
    bytes stay below 0x3C, so every fp16 scale inside them is finite."""
    if qtype == Q.F32:
        return array.astype(np.float32), None
    if qtype == Q.F16:
        return array.astype(np.float16), None
    if qtype in (Q.Q4_K, Q.Q6_K, Q.Q5_K):
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = array.shape
        return rng.integers(0, 0x3C, size=(rows, cols // block * nbytes), dtype=np.uint8), qtype
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def write_llama_gguf(path: Path, model, qtype=Q.F32, arch: str = "llama", pre: str = "gpt2",
                     extra_tensors: dict | None = None) -> Path:
    """Write `model` (a transformers LlamaForCausalLM) as llama.cpp's converter would: q/k rows permuted,
    2-D weights in `qtype`, norms in F32, tokenizer metadata of the tiny vocabulary."""
    cfg = model.config
    tokens, types, merges = tiny_vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            array = permute_qk(tensor, cfg.num_attention_heads).numpy()
        elif name.endswith("k_proj.weight"):
            array = permute_qk(tensor, cfg.num_key_value_heads).numpy()
        data, raw = _encode_tensor(array, qtype if array.ndim == 2 else Q.F32, rng)
        writer.add_tensor(_gguf_name(name), data, raw_dtype=raw)
    for name, (array, qt) in (extra_tensors or {}).items():
        data, raw = _encode_tensor(array, qt, rng)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_from_gguf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@torch.no_grad()
def _logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module")
def tiny_hf():
    return tiny_llama()


@pytest.fixture(scope="module")
def tiny_f32(tiny_hf, tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", tiny_hf)


# --- permutation --------------------------------------------------------------------------------------
def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.randn(4 * 8, 5)  # 4 heads of head_dim 8
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    # llama.cpp's layout interleaves each head's halves: stored row 1 is original row D/2 of head 0
    assert torch.equal(permute_qk(w, 4)[1], w[4])
    assert not torch.equal(permute_qk(w, 4), w)


# --- config and metadata ------------------------------------------------------------------------------
def test_metadata_and_config(tiny_f32, tiny_hf):
    meta = read_gguf_metadata(tiny_f32)
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.model"] == "gpt2"
    cfg = gguf_config(meta)
    hf = tiny_hf.config
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.intermediate_size)
    assert cfg.vocab_size == len(tiny_vocab()[0]) and cfg.max_seq_len == 256
    assert cfg.norm_eps == 1e-5 and cfg.rope_theta == 10000.0
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert cfg.tie_embeddings is False  # output.weight present
    assert read_gguf_config(tiny_f32) == cfg


def test_rope_scaling_linear(tmp_path, tiny_hf):
    meta = read_gguf_metadata(write_llama_gguf(tmp_path / "t.gguf", tiny_hf))
    cfg = gguf_config({**meta, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    with pytest.raises(CheckpointError, match="yarn"):
        gguf_config({**meta, "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})


# --- weights: parity --------------------------------------------------------------------------------
def test_f32_matches_original_and_transformers(tiny_f32, tiny_hf):
    cfg, state, _ = read_gguf(tiny_f32, progress=False)
    assert "lm_head.weight" in state
    model = Transformer(cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    ours = _logits(model, ids)
    # references: the model the file was written from, and transformers' reading of the file
    for ref in (_logits(tiny_hf, ids), _logits(hf_from_gguf(tiny_f32), ids)):
        assert (ours - ref).abs().max() <= fp32_bound(ref, cfg)  # the same weights: fp32 rounding only


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_quantized_matches_transformers(tmp_path, tiny_hf, qtype):
    path = write_llama_gguf(tmp_path / f"tiny-{qtype.name}.gguf", tiny_hf, qtype)
    model = load_gguf_model(path)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    ours, ref = _logits(model, ids), _logits(hf_from_gguf(path), ids)
    assert (ours - ref).abs().max() <= fp32_bound(ref, model.config)  # both dequantize to the same fp32 weights
    # and the quantized model is still close to the original weights
    assert (ours - _logits(tiny_hf, ids)).abs().max() < 0.2


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_k_quants_match_transformers(tmp_path, qtype):
    # K-quant blocks hold 256 values: every 2-D weight needs rows of a multiple of 256
    hf = tiny_llama(d_model=256, n_heads=4, n_kv_heads=2, d_ff=256, n_layers=1, tie=True)
    path = write_llama_gguf(tmp_path / f"tiny-{qtype.name}.gguf", hf, qtype)
    model = load_gguf_model(path)
    assert model.config.tie_embeddings
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    ours, ref = _logits(model, ids), _logits(hf_from_gguf(path), ids)
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max() <= fp32_bound(ref, model.config)


# --- bad input ----------------------------------------------------------------------------------------
def test_truncated_file(tmp_path, tiny_f32):
    data = tiny_f32.read_bytes()
    for n in (3, 24, 200, len(data) // 2, len(data) - 10):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="truncated") as info:
            read_gguf(cut, progress=False)
        assert str(cut) in str(info.value)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a GGUF file at all, just some text " * 20)
    with pytest.raises(CheckpointError, match="not a GGUF") as info:
        read_gguf_metadata(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")


def test_other_architecture_is_named(tmp_path, tiny_hf):
    path = write_llama_gguf(tmp_path / "gpt2.gguf", tiny_hf, arch="gpt2")
    with pytest.raises(CheckpointError, match="'gpt2'.*supported: llama"):
        read_gguf(path, progress=False)


def test_unsupported_quant_type_names_tensor(tmp_path):
    hf = tiny_llama(d_model=256, n_heads=4, n_kv_heads=2, d_ff=256, n_layers=1, tie=True)
    path = write_llama_gguf(tmp_path / "q5k.gguf", hf, Q.Q5_K)
    with pytest.raises(CheckpointError) as info:
        read_gguf(path, progress=False)
    message = str(info.value)
    assert "Q5_K" in message and "token_embd.weight" in message
    assert all(name in message for name in SUPPORTED_QUANT_TYPES)


def test_unknown_tensor_is_named(tmp_path, tiny_hf):
    extra = {"blk.0.attn_q.bias": (np.zeros(64, dtype=np.float32), Q.F32)}
    path = write_llama_gguf(tmp_path / "bias.gguf", tiny_hf, extra_tensors=extra)
    with pytest.raises(CheckpointError, match="blk.0.attn_q.bias"):
        read_gguf(path, progress=False)


# --- real weights -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_models(smollm2_path):
    ours = load_gguf_model(smollm2_path)
    ref = hf_from_gguf(smollm2_path)
    return ours, ref


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers(smollm2_models, smollm2_path):
    ours, ref = smollm2_models
    cfg = ours.config
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.max_seq_len == 8192
    from lmlab.tokenizer import Tokenizer

    text = ("The Transformer replaces recurrence with attention: every token looks at every earlier token, "
            "weighs them by similarity of queries and keys, and mixes their values. Stacking such layers with "
            "feed-forward blocks and residual connections gives a model that trains in parallel over the sequence, "
            "which is why it scales so well on modern accelerators and large text corpora.")
    prompt = Tokenizer.from_gguf(smollm2_path).encode(text)[:64]
    assert len(prompt) == 64
    ids = torch.tensor([prompt])
    a, b = _logits(ours, ids), _logits(ref, ids)
    assert a.abs().max() > 1.0  # real, non-degenerate logits
    assert (a - b).abs().max() <= fp32_bound(b, cfg, seq_len=64)  # 30 layers: ~0.01 for logits of ~20


@pytest.mark.slow
def test_smollm2_gguf_greedy_continuation_is_sensible(smollm2_models, smollm2_path):
    from lmlab.tokenizer import Tokenizer

    ours, _ = smollm2_models
    tok = Tokenizer.from_gguf(smollm2_path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=True)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(12):
            next_id = ours(ids)[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    assert "Paris" in tok.decode(ids[0, len(prompt):])


def test_header_parser_matches_gguf_reader(tiny_f32):
    reader = gguf.GGUFReader(tiny_f32)
    expected = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    expected["gguf.tensor_names"] = [t.name for t in reader.tensors]
    expected["gguf.tensor_types"] = [t.tensor_type.name for t in reader.tensors]
    assert read_gguf_metadata(tiny_f32) == expected
