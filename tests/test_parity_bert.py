"""BERT checkpoints: lmlab matches transformers (real bert-base-uncased config, 2 layers, random weights),
and the real all-MiniLM-L6-v2 weights give the same hidden states as transformers.BertModel."""

import pytest
import torch
import transformers

from parity import fp32_bound, max_diff, perturb
from lmlab.checkpoints import export_hf, from_hf_model, load_model
from lmlab.config import ModelConfig
from lmlab.model import Transformer

# bert-base-uncased config.json, num_hidden_layers shrunk from 12 to 2
BERT_CONFIG = {
    "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
    "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
    "num_attention_heads": 12, "num_hidden_layers": 2, "pad_token_id": 0, "position_embedding_type": "absolute",
    "type_vocab_size": 2, "use_cache": True, "vocab_size": 30522,
}


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return perturb(transformers.BertForMaskedLM(transformers.BertConfig.from_dict(BERT_CONFIG)).eval())


def _batch(vocab):
    ids = torch.randint(1, vocab, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids = ids * mask  # pad id 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_from_hf_model_mlm_logits_match(hf_model, padded):
    model = from_hf_model(hf_model)
    assert model.config.head == "mlm"
    ids, mask, types = _batch(model.config.vocab_size)
    if not padded:
        mask = torch.ones_like(ids)
    ref = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    out = model(ids, attention_mask=mask, token_type_ids=types)
    assert max_diff(out, ref, mask) <= fp32_bound(ref, model.config)


@torch.no_grad()
def test_bert_model_without_head_gives_hidden_states(hf_model, tmp_path):
    """A BertModel checkpoint (no cls.* keys, 'bert.'-less names, pooler) loads with head='none'."""
    hf_model.bert.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.config.head == "none"
    ids, mask, types = _batch(model.config.vocab_size)
    ref = hf_model.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert max_diff(model(ids, attention_mask=mask, token_type_ids=types), ref, mask) <= fp32_bound(ref, model.config)


@torch.no_grad()
def test_minilm_real_weights(minilm_path):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["A man is playing a guitar.", "The weather is lovely today, isn't it?", "Hi"],
                padding=True, return_tensors="pt")
    ref = transformers.BertModel.from_pretrained(minilm_path).eval()(**batch).last_hidden_state
    model = load_model("all-minilm-l6-v2")
    assert model.config.head == "none" and model.config.n_layers == 6
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    assert max_diff(out, ref, batch["attention_mask"]) <= fp32_bound(ref, model.config)


@torch.no_grad()
@pytest.mark.parametrize("head", ["mlm", "none"])
def test_export_round_trip(tmp_path, head):
    cfg = ModelConfig.from_name("bert-base", n_layers=2, head=head, lm_head_bias=head == "mlm")
    model = perturb(Transformer(cfg).eval())
    export_hf(model, tmp_path / "out")
    auto = transformers.AutoModelForMaskedLM if head == "mlm" else transformers.AutoModel
    hf = auto.from_pretrained(tmp_path / "out").eval()
    ids, mask, types = _batch(cfg.vocab_size)
    out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    ref = out.logits if head == "mlm" else out.last_hidden_state
    assert max_diff(model(ids, attention_mask=mask, token_type_ids=types), ref, mask) <= fp32_bound(ref, model.config)
