"""BERT (``BertModel`` / ``BertForMaskedLM``, keys with or without the ``bert.`` prefix) <-> lmlab.

BERT is post-norm: the LayerNorm after each residual sum (``attention.output.LayerNorm``,
``output.LayerNorm``) becomes lmlab's ``attn_norm`` / ``ffn_norm``. The MLM head
(``cls.predictions``) is a dense+act+norm transform and a vocabulary projection tied to the word
embeddings, with its own bias. Checkpoints without it (sentence encoders such as all-MiniLM-L6-v2) get
``head="none"`` and return hidden states. The pooler and the ``position_ids`` buffer are ignored.
"""

from __future__ import annotations

import sys

import torch

from lmlab.checkpoints.families import register
from lmlab.checkpoints.hf import LMLAB_TO_HF_ACTIVATION, activation_from_hf, invert, rename_keys
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError

MODEL_TYPES = ("bert",)

_LINEAR = [
    ("attention.self.query", "attn.q"), ("attention.self.key", "attn.k"), ("attention.self.value", "attn.v"),
    ("attention.output.dense", "attn.o"), ("attention.output.LayerNorm", "attn_norm"),
    ("intermediate.dense", "ffn.up"), ("output.dense", "ffn.down"), ("output.LayerNorm", "ffn_norm"),
]
KEY_MAP = [
    ("embeddings.word_embeddings.weight", "tok_embed.weight"),
    ("embeddings.position_embeddings.weight", "pos_embed.weight"),
    ("embeddings.token_type_embeddings.weight", "type_embed.weight"),
    ("embeddings.LayerNorm.weight", "embed_norm.weight"),
    ("embeddings.LayerNorm.bias", "embed_norm.bias"),
    *[(f"encoder.layer.{{i}}.{hf}.{kind}", f"encoder.layers.{{i}}.{ours}.{kind}") for hf, ours in _LINEAR
      for kind in ("weight", "bias")],
    ("cls.predictions.transform.dense.weight", "head_transform.dense.weight"),
    ("cls.predictions.transform.dense.bias", "head_transform.dense.bias"),
    ("cls.predictions.transform.LayerNorm.weight", "head_transform.norm.weight"),
    ("cls.predictions.transform.LayerNorm.bias", "head_transform.norm.bias"),
    ("cls.predictions.decoder.weight", "lm_head.weight"),
    ("cls.predictions.bias", "lm_head.bias"),
]
# pooler / NSP head are not part of lmlab's encoder; position_ids is a buffer; decoder.bias duplicates bias
IGNORE = [r"^pooler\.", r"^cls\.seq_relationship\.", r"embeddings\.position_ids$", r"^cls\.predictions\.decoder\.bias$"]


def matches(cfg: ModelConfig) -> bool:
    return cfg.arch == "encoder" and cfg.positional == "learned" and cfg.norm_position == "post" and not cfg.gated_ffn


def _has_mlm_head(hf: dict, keys) -> bool:
    if keys is not None:
        return any(k.startswith("cls.predictions.") for k in keys)
    return any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in hf.get("architectures") or [])


def config_from_hf(hf: dict, keys=None) -> ModelConfig:
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise CheckpointError(f"BERT position_embedding_type={kind!r} is not supported; supported: absolute")
    mlm = _has_mlm_head(hf, keys)
    return ModelConfig(
        arch="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 512), positional="learned", norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12), norm_position="post", final_norm=False, embed_norm=True,
        activation=activation_from_hf(hf.get("hidden_act", "gelu")), gated_ffn=False, ffn_bias=True,
        attn_bias=True, type_vocab_size=hf.get("type_vocab_size", 2), head="mlm" if mlm else "none",
        lm_head_bias=mlm, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        pad_token_id=hf.get("pad_token_id"), name=hf.get("_name_or_path", "") or "",
        extra={"hf_model_type": "bert"},
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "model_type": "bert", "architectures": ["BertForMaskedLM" if cfg.head == "mlm" else "BertModel"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff, "hidden_act": LMLAB_TO_HF_ACTIVATION[cfg.activation],
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps, "pad_token_id": cfg.pad_token_id, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "position_embedding_type": "absolute",
    }


def to_lmlab(hf_state: dict[str, torch.Tensor], cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("bert."): v for k, v in hf_state.items()}
    return rename_keys(state, KEY_MAP, IGNORE)


def to_hf(lmlab_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state = rename_keys(lmlab_state, invert(KEY_MAP))
    mlm = cfg.head == "mlm"
    hf = {}
    for k, v in state.items():
        hf[k if k.startswith("cls.") or not mlm else "bert." + k] = v.contiguous()
    if mlm and "cls.predictions.bias" in hf:
        hf["cls.predictions.decoder.bias"] = hf["cls.predictions.bias"].clone()
    if cfg.tie_embeddings:
        hf.pop("cls.predictions.decoder.weight", None)
    return hf


register(sys.modules[__name__])
