"""T5 checkpoints: lmlab matches transformers for T5 v1.0 (t5-small: ReLU, tied, rescaled head) and
v1.1/FLAN (flan-t5-base: gated-GELU, untied), real configs with 2 layers per stack and random weights."""

import pytest
import torch
import transformers

from parity import fp32_bound, perturb
from lmlab.checkpoints import export_hf, from_hf_model, load_model
from lmlab.config import ModelConfig
from lmlab.model import Transformer

T5_SMALL = {
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 2048, "d_kv": 64, "d_model": 512,
    "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
    "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
    "num_heads": 8, "num_layers": 2, "output_past": True, "pad_token_id": 0, "relative_attention_num_buckets": 32,
    "vocab_size": 32128,
}
FLAN_T5_BASE = {
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 2048, "d_kv": 64, "d_model": 768,
    "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
    "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512, "num_decoder_layers": 2, "num_heads": 12,
    "num_layers": 2, "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "use_cache": True, "vocab_size": 32128,
}
CONFIGS = {"t5-small": T5_SMALL, "flan-t5-base": FLAN_T5_BASE}



def _hf_model(name):
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config.from_dict(CONFIGS[name])).eval()
    with torch.no_grad():
        model.shared.weight.normal_(0.0, 0.05)  # HF's std-1 embeddings give logits in the hundreds; keep them O(1)
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)  # HF's init makes the position bias nearly invisible in the logits
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # norms start at 1: perturb so a swapped one shows
    return model


def _batch(vocab):
    ids = torch.randint(2, vocab, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids = ids * mask
    dec = torch.randint(2, vocab, (2, 5))
    dec[:, 0] = 0  # decoder_start_token_id
    return ids, mask, dec


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config(name):
    cfg = from_hf_model(_hf_model(name)).config
    if name == "t5-small":
        assert cfg.activation == "relu" and not cfg.gated_ffn and cfg.head_input_scale == pytest.approx(512 ** -0.5)
    else:
        assert cfg.activation == "gelu_tanh" and cfg.gated_ffn and cfg.head_input_scale == 1.0
    assert cfg.attn_scale == 1.0 and cfg.head_dim == 64


@torch.no_grad()
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padded", [False, True])
def test_from_hf_model_logits_match(name, padded):
    hf = _hf_model(name)
    model = from_hf_model(hf)
    ids, mask, dec = _batch(model.config.vocab_size)
    if not padded:
        mask = torch.ones_like(ids)
    ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    out = model(ids, attention_mask=mask, decoder_input_ids=dec)
    assert (out - ref).abs().max().item() <= fp32_bound(ref, model.config)


@torch.no_grad()
def test_hf_directory_with_untied_head(tmp_path):
    """A v1.1-style directory whose lm_head differs from shared.weight keeps its own head, unscaled."""
    hf = _hf_model("flan-t5-base")
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight) * 0.05)
    hf.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"tie_word_embeddings": true', '"tie_word_embeddings": false')
    (tmp_path / "config.json").write_text(config)
    model = load_model(tmp_path)
    assert not model.config.tie_embeddings and model.config.head_input_scale == 1.0
    ids, mask, dec = _batch(model.config.vocab_size)
    ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    out = model(ids, attention_mask=mask, decoder_input_ids=dec)
    assert (out - ref).abs().max().item() <= fp32_bound(ref, model.config)


@torch.no_grad()
@pytest.mark.parametrize("preset", ["t5-small", "flan-t5-base"])
def test_export_round_trip(tmp_path, preset):
    model = perturb(Transformer(ModelConfig.from_name(preset, n_layers=2)).eval())
    export_hf(model, tmp_path / "out")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
    ids, mask, dec = _batch(model.config.vocab_size)
    ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    out = model(ids, attention_mask=mask, decoder_input_ids=dec)
    assert (out - ref).abs().max().item() <= fp32_bound(ref, model.config)


@pytest.mark.parametrize("name, scaled", [("t5-small", True), ("flan-t5-base", False)])
def test_head_rescale_from_config_json(name, scaled):
    """transformers 4.x-style config.json (no scale_decoder_outputs): the rescale follows tie_word_embeddings."""
    from lmlab.checkpoints.hf_t5 import config_from_hf

    cfg = config_from_hf(CONFIGS[name])
    assert cfg.tie_embeddings == scaled
    assert cfg.head_input_scale == (pytest.approx(cfg.d_model ** -0.5) if scaled else 1.0)
