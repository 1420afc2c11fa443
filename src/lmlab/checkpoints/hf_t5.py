"""T5 v1.0 (t5-small: ReLU, tied embeddings) and v1.1 / FLAN-T5 (gated-GELU, untied) <-> lmlab.

T5 scores are not scaled by 1/sqrt(d) (``attn_scale=1.0``); ``d_kv`` is the head dim, independent of
d_model. Each stack learns one relative-position bias table, stored in layer 0's self-attention, which
becomes ``{encoder,decoder}.rel_bias.weight``. The decoder output is rescaled by ``d_model**-0.5``
before the LM head exactly when the HF config does so: transformers reads ``scale_decoder_outputs``
(5.x) and otherwise derives it from ``tie_word_embeddings`` (absent counts as True), see
``T5Config.__post_init__`` and ``T5ForConditionalGeneration.forward``.
"""

from __future__ import annotations

import sys

import torch

from lmlab.checkpoints.families import register
from lmlab.checkpoints.hf import LMLAB_TO_HF_ACTIVATION, activation_from_hf, invert, rename_keys
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError

MODEL_TYPES = ("t5",)


def _stack_map(stack: str) -> list[tuple[str, str]]:
    hf, ours = f"{stack}.block.{{i}}.layer", f"{stack}.layers.{{i}}"
    ffn_layer = 2 if stack == "decoder" else 1
    pairs = [
        (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", f"{stack}.rel_bias.weight"),
        *[(f"{hf}.0.SelfAttention.{p}.weight", f"{ours}.attn.{p}.weight") for p in "qkvo"],
        (f"{hf}.0.layer_norm.weight", f"{ours}.attn_norm.weight"),
        (f"{hf}.{ffn_layer}.DenseReluDense.wi.weight", f"{ours}.ffn.up.weight"),
        (f"{hf}.{ffn_layer}.DenseReluDense.wi_0.weight", f"{ours}.ffn.gate.weight"),
        (f"{hf}.{ffn_layer}.DenseReluDense.wi_1.weight", f"{ours}.ffn.up.weight"),
        (f"{hf}.{ffn_layer}.DenseReluDense.wo.weight", f"{ours}.ffn.down.weight"),
        (f"{hf}.{ffn_layer}.layer_norm.weight", f"{ours}.ffn_norm.weight"),
        (f"{stack}.final_layer_norm.weight", f"{stack}.final_norm.weight"),
    ]
    if stack == "decoder":
        pairs += [(f"{hf}.1.EncDecAttention.{p}.weight", f"{ours}.cross_attn.{p}.weight") for p in "qkvo"]
        pairs += [(f"{hf}.1.layer_norm.weight", f"{ours}.cross_norm.weight")]
    return pairs


KEY_MAP = [("shared.weight", "tok_embed.weight"), *_stack_map("encoder"), *_stack_map("decoder"),
           ("lm_head.weight", "lm_head.weight")]
IGNORE = [r"^(encoder|decoder)\.embed_tokens\.weight$",  # copies of shared.weight
          r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$"]


def matches(cfg: ModelConfig) -> bool:
    return cfg.arch == "encoder_decoder" and cfg.positional == "t5_relative" and cfg.norm == "rmsnorm"


def config_from_hf(hf: dict, keys=None) -> ModelConfig:
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise CheckpointError(f"T5 feed_forward_proj={proj!r} is not supported; use 'relu', 'gelu' or 'gated-<act>'")
    gated = parts[0] == "gated"
    act_name = "gelu_new" if proj == "gated-gelu" else parts[-1]  # HF's backwards-compatible alias
    tie = hf.get("tie_word_embeddings", True) is not False
    scale = hf["scale_decoder_outputs"] if "scale_decoder_outputs" in hf else tie
    d_model = hf["d_model"]
    return ModelConfig(
        arch="encoder_decoder", vocab_size=hf["vocab_size"], d_model=d_model, n_layers=hf["num_layers"],
        n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], n_heads=hf["num_heads"],
        head_dim=hf.get("d_kv", d_model // hf["num_heads"]), d_ff=hf["d_ff"],
        max_seq_len=hf.get("n_positions", 512),
        positional="t5_relative", rel_num_buckets=hf.get("relative_attention_num_buckets", 32),
        rel_max_distance=hf.get("relative_attention_max_distance", 128), norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), norm_position="pre", activation=activation_from_hf(act_name),
        gated_ffn=gated, ffn_bias=False, attn_bias=False, attn_scale=1.0, tie_embeddings=tie,
        head_input_scale=d_model ** -0.5 if scale else 1.0, pad_token_id=hf.get("pad_token_id", 0),
        eos_token_id=hf.get("eos_token_id", 1), decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
        name=hf.get("_name_or_path", "") or "", extra={"hf_model_type": "t5"},
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    scale = cfg.head_input_scale != 1.0
    if scale and abs(cfg.head_input_scale - cfg.d_model ** -0.5) > 1e-12:
        raise CheckpointError(f"head_input_scale={cfg.head_input_scale} cannot be expressed in a T5 config "
                              f"(only 1.0 or d_model**-0.5={cfg.d_model ** -0.5})")
    if scale and not cfg.tie_embeddings:
        raise CheckpointError("a T5 config with head_input_scale != 1 must tie embeddings (tie_embeddings=True)")
    act = LMLAB_TO_HF_ACTIVATION[cfg.activation]
    if cfg.gated_ffn:
        proj = "gated-gelu" if cfg.activation == "gelu_tanh" else f"gated-{act}"
    else:
        proj = act
    return {
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.d_ff, "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.n_decoder_layers, "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.rel_num_buckets, "relative_attention_max_distance": cfg.rel_max_distance,
        "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": proj, "dropout_rate": 0.0,
        # HF 4.x derives the output rescale from tie_word_embeddings; 5.x reads scale_decoder_outputs
        "tie_word_embeddings": scale, "scale_decoder_outputs": scale, "n_positions": cfg.max_seq_len,
        "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id, "is_encoder_decoder": True,
    }


def to_lmlab(hf_state: dict[str, torch.Tensor], cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    return rename_keys(hf_state, KEY_MAP, IGNORE)


def to_hf(lmlab_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    inverse = invert(KEY_MAP)
    if not cfg.gated_ffn:  # ffn.up is wi for ReLU T5, wi_1 for gated; drop the pattern that does not apply
        inverse = [(o, h) for o, h in inverse if not h.endswith(("wi_0.weight", "wi_1.weight"))]
    else:
        inverse = [(o, h) for o, h in inverse if not h.endswith("DenseReluDense.wi.weight")]
    hf = {k: v.contiguous() for k, v in rename_keys(lmlab_state, inverse).items()}
    if "lm_head.weight" not in hf:  # tied in lmlab: HF 5.x always has an lm_head; store it explicitly
        hf["lm_head.weight"] = hf["shared.weight"]
    if cfg.head_input_scale != 1.0:
        hf.pop("lm_head.weight")  # HF ties it to shared.weight
    return hf


register(sys.modules[__name__])
