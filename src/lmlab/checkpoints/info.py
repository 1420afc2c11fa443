"""Describing a model without loading its weights (``lmlab info``): architecture, size, memory figures.

(Named ``info``, not ``describe``: a submodule named like the function would shadow it in the package.)
"""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.checkpoints.families import family_for_config
from lmlab.checkpoints.gguf import read_gguf_metadata
from lmlab.checkpoints.load import Resolved, load_config
from lmlab.errors import CheckpointError
from lmlab.quant.gguf import FLOAT_TYPES, NATIVE_TYPES
from lmlab.quant.model import QUANT_FILE, describe_quantization
from lmlab.scaling import format_bytes, format_count, kv_cache_bytes

__all__ = ["describe", "format_description"]


def describe(source: str | Path) -> dict:
    """Architecture, size, context and memory needs of a source, from its config alone where possible.

    Memory figures are the weights only (parameters x bytes per parameter). The KV cache figure is the
    decoder self-attention cache per token in fp32: layers x 2 (k and v) x kv_heads x head_dim x 4 bytes.
    """
    cfg, where = load_config(source)
    try:
        family = family_for_config(cfg).MODEL_TYPES[0]
    except CheckpointError:
        family = "lmlab"
    if cfg.extra.get("hf_model_type"):
        family = cfg.extra["hf_model_type"]
    elif where.kind == "gguf":
        family = "llama (gguf)"
    total = cfg.num_parameters()
    no_embed = total - cfg.vocab_size * cfg.d_model
    kv_per_token = int(kv_cache_bytes(cfg, batch=1, seq_len=1, encoder_len=0))  # decoder self-attention only
    layers = (f"{cfg.n_layers} encoder + {cfg.n_decoder_layers} decoder" if cfg.arch == "encoder_decoder"
              else str(cfg.n_layers))
    return {
        "source": str(source), "resolved": str(where.path), "format": where.kind, "arch": cfg.arch,
        "family": family, "layers": layers, "d_model": cfg.d_model, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "d_ff": cfg.d_ff, "positional": cfg.positional,
        "norm": f"{cfg.norm} ({cfg.norm_position})", "activation": cfg.activation + (" (gated)" if cfg.gated_ffn else ""),
        "parameters": total, "parameters_without_embeddings": no_embed, "context_length": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "weights_bytes": {"fp32": total * 4, "bf16": total * 2, "int8": total},
        "kv_cache_bytes_per_token_fp32": kv_per_token,
        "quantization": _describe_quantization(where),
    }


def _describe_quantization(where: Resolved) -> str:
    """At which precision the weights run: a quantized checkpoint's layers, or a GGUF's block types."""
    if where.kind == "lmlab" and (where.path / QUANT_FILE).exists():
        return describe_quantization(json.loads((where.path / QUANT_FILE).read_text()))
    if where.kind == "gguf":
        types = read_gguf_metadata(where.path).get("gguf.tensor_types", [])
        counts = {t: types.count(t) for t in dict.fromkeys(types)}
        listed = ", ".join(f"{n} {t}" for t, n in counts.items())
        other = [t for t in counts if t not in NATIVE_TYPES + FLOAT_TYPES]
        if other:
            return f"GGUF tensors {listed}; {', '.join(other)} have no native kernel: runs dequantized to fp32"
        if any(t in NATIVE_TYPES for t in counts):
            return (f"GGUF tensors {listed}; runs at the file's own precision with --quantize native "
                    f"(int4/int8 kernels), else dequantized to fp32")
        return f"GGUF tensors {listed} (float)"
    return "none (float weights)"


def format_description(info: dict) -> str:
    """The human-readable table `lmlab info` prints."""
    w = info["weights_bytes"]
    kv = info["kv_cache_bytes_per_token_fp32"]
    rows = [
        ("source", f"{info['source']} -> {info['resolved']} ({info['format']})"),
        ("architecture", f"{info['arch']}, family {info['family']}"),
        ("layers", info["layers"]),
        ("d_model", info["d_model"]),
        ("heads / kv heads", f"{info['heads']} / {info['kv_heads']}"),
        ("head_dim", info["head_dim"]),
        ("d_ff", info["d_ff"]),
        ("positional", info["positional"]),
        ("norm", info["norm"]),
        ("activation", info["activation"]),
        ("parameters", f"{info['parameters']:,} ({format_count(info['parameters'])}); "
                       f"{info['parameters_without_embeddings']:,} without embeddings"),
        ("context length", f"{info['context_length']:,} tokens"),
        ("vocabulary", f"{info['vocab_size']:,} tokens"),
        ("weights memory", f"fp32 {format_bytes(w['fp32'])}, bf16 {format_bytes(w['bf16'])}, int8 {format_bytes(w['int8'])}"),
        ("KV cache (fp32)", f"{kv:,} bytes/token ({format_bytes(kv)}); "
                            f"{format_bytes(kv * info['context_length'])} at full context" if kv else "none (no decoder)"),
        ("quantization", info.get("quantization", "none (float weights)")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
