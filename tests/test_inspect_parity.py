"""The recorded attention weights and next-token probabilities equal transformers' eager attention
(``output_attentions=True``) within the fp32 bound: GPT-2, LLaMA, BERT and T5 on random weights of their real
configs (2 layers), and the real SmolLM2 and MiniLM checkpoints. The recorded weights also rebuild each
attention layer's output (``verify=True``)."""

from __future__ import annotations

import pytest
import torch
import transformers

from parity import fp32_bound, perturb
from test_parity_bert import BERT_CONFIG
from test_parity_gpt2 import GPT2_CONFIG
from test_parity_llama import SMOLLM2_CONFIG
from test_parity_t5 import T5_SMALL
from lmlab.checkpoints import export_hf, from_hf_model, load_model
from lmlab.inspect import Recorder, inspect_model


class IdTokenizer:
    """Text is space-separated token ids: the parity tests feed exact ids through inspect_model."""

    special_ids: set = set()
    mask_token_id = None
    name_or_path = "ids"

    def encode(self, text, add_special_tokens=False):
        return [int(t) for t in text.split()]

    def id_to_token(self, i):
        return f"t{i}"


def _eager(cls, config: dict):
    hf_config = cls.config_class.from_dict(config)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    return perturb(cls(hf_config).eval())


def _bound(cfg, T):
    # attention weights and probabilities are rounded relative to 1 (they sum to 1), not to their own size
    return fp32_bound(torch.ones(1), cfg, seq_len=T, scale=1.0)


def _check_attn(recorded: torch.Tensor, reference, cfg, T):
    ref = torch.stack([a[0] for a in reference])  # (L, H, T, S)
    assert recorded.shape == ref.shape
    assert (recorded - ref).abs().max().item() <= _bound(cfg, T)


FAMILIES = {
    "gpt2": (transformers.GPT2LMHeadModel, GPT2_CONFIG),
    "llama": (transformers.LlamaForCausalLM, SMOLLM2_CONFIG),
    "bert": (transformers.BertForMaskedLM, BERT_CONFIG),
}


@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_and_next_token_match_transformers(family):
    hf = _eager(*FAMILIES[family])
    model = from_hf_model(hf)
    ids = torch.randint(5, 1000, (13,)).tolist()
    insp = inspect_model(model, IdTokenizer(), " ".join(map(str, ids)), verify=True, top_k=7)
    ref = hf(input_ids=torch.tensor([ids]), output_attentions=True)
    stack = "encoder" if family == "bert" else "decoder"
    _check_attn(insp.attentions[stack], ref.attentions, model.config, len(ids))
    probs = ref.logits[0, -1].softmax(-1)  # BERT: the last position (no [MASK], no specials in the ids)
    assert (insp.output["probs"] - probs).abs().max().item() <= _bound(model.config, len(ids))
    assert float(insp.notes[0].rsplit("=", 1)[1]) <= fp32_bound(ref.logits, model.config, len(ids))
    top = insp.next_token()
    assert [t["id"] for t in top[:7]] == torch.topk(probs, 7).indices.tolist()
    assert sum(t["kept"] for t in top) == 7 and all(t["kept"] for t in top[:7])


@torch.no_grad()
def test_t5_encoder_decoder_and_cross_attention_match_transformers():
    hf = _eager(transformers.T5ForConditionalGeneration, T5_SMALL)
    with torch.no_grad():
        hf.shared.weight.normal_(0.0, 0.05)
        for name, p in hf.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)  # visible position bias: a wrong bucket or sign would show
    model = from_hf_model(hf)
    ids = torch.randint(5, 1000, (11,)).tolist()
    target = torch.randint(5, 1000, (4,)).tolist()
    insp = inspect_model(model, IdTokenizer(), " ".join(map(str, ids)), " ".join(map(str, target)), verify=True)
    dec = [model.config.decoder_start_token_id] + target
    ref = hf(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([dec]), output_attentions=True)
    _check_attn(insp.attentions["encoder"], ref.encoder_attentions, model.config, len(ids))
    _check_attn(insp.attentions["decoder"], ref.decoder_attentions, model.config, len(ids))
    _check_attn(insp.attentions["cross"], ref.cross_attentions, model.config, len(ids))
    assert (insp.output["probs"] - ref.logits[0, -1].softmax(-1)).abs().max().item() <= _bound(model.config, len(ids))
    assert insp.target_ids == dec
    j = insp.to_json()
    assert "attentions" not in j and len(j["cross_attentions"]) == 2 and len(j["cross_attentions"][0][0]) == len(dec)


@torch.no_grad()
def test_real_minilm_attention_matches_transformers(minilm_path):
    import lmlab

    model, tok = load_model("all-minilm-l6-v2"), lmlab.load_tokenizer("all-minilm-l6-v2")
    text = "The cat sat on the mat because it was warm."
    insp = inspect_model(model, tok, text, verify=True)
    hf = transformers.BertModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    ref = hf(input_ids=torch.tensor([insp.ids]), output_attentions=True)
    _check_attn(insp.attentions["encoder"], ref.attentions, model.config, len(insp.ids))
    assert insp.tokens[0] == "[CLS]" and insp.tokens[-1] == "[SEP]" and insp.special[0] and not insp.special[1]
    assert insp.output is None and insp.to_json()["next_token"] == []


@torch.no_grad()
def test_real_smollm2_attention_and_next_token_match_transformers(smollm2_path, tmp_path):
    import lmlab

    model, tok = load_model("smollm2-135m-instruct"), lmlab.load_tokenizer("smollm2-135m-instruct")
    text = "The capital of France is"
    insp = inspect_model(model, tok, text, layers=[0, 14, 29], verify=True)
    export_hf(model, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ref = hf(input_ids=torch.tensor([insp.ids]), output_attentions=True)
    _check_attn(insp.attentions["decoder"], [ref.attentions[i] for i in (0, 14, 29)], model.config, len(insp.ids))
    probs = ref.logits[0, -1].softmax(-1)
    assert (insp.output["probs"] - probs).abs().max().item() <= _bound(model.config, len(insp.ids))
    assert insp.next_token()[0]["token"] == "ĠParis"


def test_recorder_leaves_no_hooks_behind():
    """Recording is off by default: outside a Recorder the model has no hooks, so attention stays on SDPA."""
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer

    model = Transformer(ModelConfig.from_name("tiny-encoder-decoder")).eval()
    hooked = lambda: [n for n, m in model.named_modules()  # noqa: E731
                      if m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs]
    assert hooked() == []
    ids = torch.randint(0, 256, (1, 9))
    dec = torch.randint(0, 256, (1, 4))
    with Recorder(model) as rec:
        assert hooked()
        model(ids, decoder_input_ids=dec)
    assert hooked() == []
    assert set(rec.stacked()) == {"encoder", "decoder", "cross"}
    assert rec.stacked()["cross"].shape == (2, 4, 4, 9)
