"""LLaMA checkpoints: lmlab matches transformers (real SmolLM2-135M config, 2 layers, random weights)."""

import pytest
import torch
import transformers

from parity import fp32_bound, max_diff, perturb, right_padded_batch
from lmlab.checkpoints import export_hf, from_hf_model, load_model
from lmlab.config import ModelConfig
from lmlab.model import Transformer

# HuggingFaceTB/SmolLM2-135M config.json, num_hidden_layers shrunk from 30 to 2
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 2, "num_key_value_heads": 3, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49152,
}


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return perturb(transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(SMOLLM2_CONFIG)).float().eval())


def test_config_fields(hf_model):
    cfg = from_hf_model(hf_model).config
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta) == (9, 3, 64, 100000.0)
    assert cfg.tie_embeddings and cfg.activation == "silu" and cfg.gated_ffn


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_from_hf_model_logits_match(hf_model, padded):
    model = from_hf_model(hf_model)
    ids, mask = right_padded_batch(model.config.vocab_size, pad_from=7)
    if not padded:
        mask = torch.ones_like(ids)
    ref = hf_model(input_ids=ids, attention_mask=mask).logits
    assert max_diff(model(ids, attention_mask=mask), ref, mask) <= fp32_bound(ref, model.config)


@torch.no_grad()
def test_hf_directory_logits_match(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids, mask = right_padded_batch(model.config.vocab_size, pad_from=7)
    ref = hf_model(input_ids=ids, attention_mask=mask).logits
    assert max_diff(model(ids, attention_mask=mask), ref, mask) <= fp32_bound(ref, model.config)


@torch.no_grad()
def test_rope_scaling_and_bias_variants():
    """qwen2-style q/k/v biases and llama3 rope scaling travel through the converter."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    perturb(hf, std=0.5)  # zero-initialised biases: make them matter
    model = from_hf_model(hf)
    assert model.config.attn_bias and not model.config.attn_out_bias
    ids = torch.randint(0, 100, (2, 9))
    ref = hf(input_ids=ids).logits
    assert (model(ids) - ref).abs().max() <= fp32_bound(ref, model.config)

    lcfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=100, max_position_embeddings=64,
                                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 16})
    hf = perturb(transformers.LlamaForCausalLM(lcfg).eval())
    model = from_hf_model(hf)
    assert model.config.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, 100, (1, 40))
    ref = hf(input_ids=ids).logits
    assert (model(ids) - ref).abs().max() <= fp32_bound(ref, model.config)


@torch.no_grad()
def test_export_round_trip(tmp_path):
    model = perturb(Transformer(ModelConfig.from_name("smollm2-135m", n_layers=2)).eval())
    export_hf(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids, mask = right_padded_batch(model.config.vocab_size, pad_from=7)
    ref = hf(input_ids=ids, attention_mask=mask).logits
    assert max_diff(model(ids, attention_mask=mask), ref, mask) <= fp32_bound(ref, model.config)
