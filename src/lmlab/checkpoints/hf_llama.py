"""LLaMA-style decoders (``llama``, ``mistral``, ``qwen2``) <-> lmlab.

The three share one layout: RMSNorm pre-norm blocks, rotary positions (half-split, as lmlab), SwiGLU
feed-forward and grouped-query attention; they differ only in config fields (``attention_bias``,
``head_dim``, ``rope_scaling``/``rope_parameters``, ``tie_word_embeddings``). Qwen2 puts biases on q/k/v
but not on the output projection. Mistral's ``sliding_window`` is not modelled: logits are exact for
sequences up to the window (4096 tokens for Mistral-7B v0.1), and the value is kept in ``cfg.extra``.
"""

from __future__ import annotations

import sys

import torch

from lmlab.checkpoints.families import register
from lmlab.checkpoints.hf import LMLAB_TO_HF_ACTIVATION, activation_from_hf, invert, rename_keys
from lmlab.config import ModelConfig

MODEL_TYPES = ("llama", "mistral", "qwen2")

_PROJ = [("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"), ("self_attn.v_proj", "attn.v"),
         ("self_attn.o_proj", "attn.o"), ("mlp.gate_proj", "ffn.gate"), ("mlp.up_proj", "ffn.up"),
         ("mlp.down_proj", "ffn.down")]
KEY_MAP = [
    ("embed_tokens.weight", "tok_embed.weight"),
    *[(f"layers.{{i}}.{hf}.{kind}", f"decoder.layers.{{i}}.{ours}.{kind}") for hf, ours in _PROJ for kind in ("weight", "bias")],
    ("layers.{i}.input_layernorm.weight", "decoder.layers.{i}.attn_norm.weight"),
    ("layers.{i}.post_attention_layernorm.weight", "decoder.layers.{i}.ffn_norm.weight"),
    ("norm.weight", "decoder.final_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
IGNORE = [r"rotary_emb\.inv_freq$"]


def matches(cfg: ModelConfig) -> bool:
    return cfg.arch == "decoder" and cfg.positional == "rope" and cfg.norm == "rmsnorm" and cfg.gated_ffn


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 5's ``rope_parameters`` or the older ``rope_theta``/``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = params or hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def config_from_hf(hf: dict, keys=None) -> ModelConfig:
    model_type = hf.get("model_type", "llama")
    theta, scaling = _rope(hf)
    qkv_bias = bool(hf.get("attention_bias", model_type == "qwen2"))
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        arch="decoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), positional="rope", rope_theta=theta,
        rope_scaling=scaling, norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), norm_position="pre",
        activation=activation_from_hf(hf.get("hidden_act", "silu")), gated_ffn=True,
        ffn_bias=bool(hf.get("mlp_bias", False)), attn_bias=qkv_bias,
        attn_out_bias=qkv_bias and model_type != "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
        name=hf.get("_name_or_path", "") or "",
        extra={"hf_model_type": model_type, **({"sliding_window": hf["sliding_window"]} if hf.get("sliding_window") else {})},
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    model_type = cfg.extra.get("hf_model_type", "llama")
    if cfg.attn_bias and not cfg.attn_out_bias:
        model_type = "qwen2"  # the only family here with biases on q/k/v but not o
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope.update(cfg.rope_scaling)
    return {
        "model_type": model_type, "architectures": [arch], "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": LMLAB_TO_HF_ACTIVATION[cfg.activation],
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "rope_parameters": rope,
        "attention_bias": cfg.attn_bias, "mlp_bias": cfg.ffn_bias, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
    }


def to_lmlab(hf_state: dict[str, torch.Tensor], cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("model."): v for k, v in hf_state.items()}
    return rename_keys(state, KEY_MAP, IGNORE)


def to_hf(lmlab_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state = rename_keys(lmlab_state, invert(KEY_MAP))
    hf = {(k if k == "lm_head.weight" else "model." + k): v.contiguous() for k, v in state.items()}
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)
    return hf


register(sys.modules[__name__])
