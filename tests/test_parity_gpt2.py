"""GPT-2 checkpoints: lmlab matches transformers logit for logit (real gpt2 config, 2 layers, random weights)."""

import pytest
import torch
import transformers

from parity import fp32_bound, max_diff, perturb, right_padded_batch
from lmlab.checkpoints import export_hf, from_hf_model, load_model
from lmlab.config import ModelConfig
from lmlab.model import Transformer

# the real gpt2 config.json, with n_layer shrunk from 12 to 2
GPT2_CONFIG = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 50256,
    "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 2, "n_positions": 1024,
    "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True, "vocab_size": 50257,
}


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return perturb(transformers.GPT2LMHeadModel(transformers.GPT2Config.from_dict(GPT2_CONFIG)).eval())


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_from_hf_model_logits_match(hf_model, padded):
    model = from_hf_model(hf_model)
    ids, mask = right_padded_batch(model.config.vocab_size)
    if not padded:
        mask = torch.ones_like(ids)
    ref = hf_model(input_ids=ids, attention_mask=mask).logits
    assert max_diff(model(ids, attention_mask=mask), ref, mask) <= fp32_bound(ref, model.config)


@torch.no_grad()
def test_hf_directory_logits_match(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.config.tie_embeddings and model.lm_head.weight is model.tok_embed.weight
    ids, mask = right_padded_batch(model.config.vocab_size)
    ref = hf_model(input_ids=ids, attention_mask=mask).logits
    assert max_diff(model(ids, attention_mask=mask), ref, mask) <= fp32_bound(ref, model.config)


@torch.no_grad()
def test_export_round_trip(tmp_path):
    model = perturb(Transformer(ModelConfig.from_name("gpt2-124m", n_layers=2)).eval())
    export_hf(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ids, mask = right_padded_batch(model.config.vocab_size)
    ref = hf(input_ids=ids, attention_mask=mask).logits
    assert max_diff(model(ids, attention_mask=mask), ref, mask) <= fp32_bound(ref, model.config)
