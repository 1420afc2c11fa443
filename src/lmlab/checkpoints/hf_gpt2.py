"""GPT-2 (``GPT2Model`` / ``GPT2LMHeadModel``) <-> lmlab.

GPT-2 stores its projections as ``Conv1D`` with weights shaped (in, out), the transpose of ``nn.Linear``,
and fuses q, k and v into one ``c_attn`` of width 3C. ``attn.bias`` / ``attn.masked_bias`` are causal-mask
buffers, not parameters, and are ignored.
"""

from __future__ import annotations

import sys

import torch

from lmlab.checkpoints.families import register
from lmlab.checkpoints.hf import LMLAB_TO_HF_ACTIVATION, activation_from_hf, invert, rename_keys
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError

MODEL_TYPES = ("gpt2",)

KEY_MAP = [
    ("wte.weight", "tok_embed.weight"),
    ("wpe.weight", "pos_embed.weight"),
    ("h.{i}.ln_1.weight", "decoder.layers.{i}.attn_norm.weight"),
    ("h.{i}.ln_1.bias", "decoder.layers.{i}.attn_norm.bias"),
    ("h.{i}.attn.c_proj.weight", "decoder.layers.{i}.attn.o.weight"),
    ("h.{i}.attn.c_proj.bias", "decoder.layers.{i}.attn.o.bias"),
    ("h.{i}.ln_2.weight", "decoder.layers.{i}.ffn_norm.weight"),
    ("h.{i}.ln_2.bias", "decoder.layers.{i}.ffn_norm.bias"),
    ("h.{i}.mlp.c_fc.weight", "decoder.layers.{i}.ffn.up.weight"),
    ("h.{i}.mlp.c_fc.bias", "decoder.layers.{i}.ffn.up.bias"),
    ("h.{i}.mlp.c_proj.weight", "decoder.layers.{i}.ffn.down.weight"),
    ("h.{i}.mlp.c_proj.bias", "decoder.layers.{i}.ffn.down.bias"),
    ("ln_f.weight", "decoder.final_norm.weight"),
    ("ln_f.bias", "decoder.final_norm.bias"),
    ("lm_head.weight", "lm_head.weight"),
]
IGNORE = [r"\.attn\.bias$", r"\.attn\.masked_bias$"]
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def matches(cfg: ModelConfig) -> bool:
    return (cfg.arch == "decoder" and cfg.positional == "learned" and cfg.norm == "layernorm"
            and cfg.norm_position == "pre" and not cfg.gated_ffn)


def config_from_hf(hf: dict, keys=None) -> ModelConfig:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise CheckpointError(f"GPT-2 option {flag}=True is not supported")
    d_model = hf["n_embd"]
    return ModelConfig(
        arch="decoder", vocab_size=hf["vocab_size"], d_model=d_model, n_layers=hf["n_layer"], n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d_model, max_seq_len=hf.get("n_positions", 1024), positional="learned",
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_position="pre",
        activation=activation_from_hf(hf.get("activation_function", "gelu_new")), gated_ffn=False,
        ffn_bias=True, attn_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"), name=hf.get("_name_or_path", "") or "",
        extra={"hf_model_type": "gpt2"},
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
        "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": LMLAB_TO_HF_ACTIVATION[cfg.activation], "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }


def to_lmlab(hf_state: dict[str, torch.Tensor], cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in hf_state.items():
        key = key.removeprefix("transformer.")
        if key.endswith(CONV1D):
            tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
        if key.endswith("attn.c_attn.weight") or key.endswith("attn.c_attn.bias"):
            prefix = "decoder.layers." + key.split(".")[1] + ".attn."
            kind = key.rsplit(".", 1)[1]
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):  # (3C, C) -> 3 x (C, C)
                state[f"{prefix}{name}.{kind}"] = part.contiguous()
            continue
        state[key] = tensor.contiguous()
    return rename_keys(state, KEY_MAP, IGNORE)


def to_hf(lmlab_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state = rename_keys(lmlab_state, invert(KEY_MAP))
    out = {}
    for i in range(cfg.n_layers):
        prefix = f"decoder.layers.{i}.attn."
        for kind in ("weight", "bias"):
            out[f"h.{i}.attn.c_attn.{kind}"] = torch.cat([state.pop(f"{prefix}{name}.{kind}") for name in "qkv"],
                                                         dim=0)
    out.update(state)
    for key in list(out):
        if key.endswith(CONV1D):
            out[key] = out[key].t()  # Linear (out, in) -> Conv1D (in, out)
    hf = {("transformer." + k if k != "lm_head.weight" else k): v.contiguous() for k, v in out.items()}
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)
    return hf


register(sys.modules[__name__])
