"""GGUF block-quantized tensors straight into lmlab's quantized layers, at the file's own precision.

llama.cpp's blocks, 32 weights each, along a row (``d``, ``m`` are fp16; ``qs`` 4-bit values, low
nibbles are the block's elements 0-15 and high nibbles 16-31):

    Q4_1  d, m, qs[16]    w = d * q + m          -> int4 group 32: scale = d, min = m        (exact)
    Q4_0  d, qs[16]       w = d * (q - 8)        -> int4 group 32: scale = d, min = -8 d     (exact)
    Q8_0  d, q[32] int8   w = d * q              -> int8, one scale per row (requantized, see below)

The int4 mappings are exact: the same 4-bit values, the same scales (the kernel rounds the scale and
zero to bf16, as it does for any int4 layer). Q8_0 has a scale per 32 weights, which the int8 kernel
(one scale per output channel) cannot take, so its rows are requantized to per-channel int8:
``s = max|w_row| / 127``, ``q' = round(w / s)``. That adds at most s/2 per weight on top of the file's
own rounding, i.e. the layer ends up as good as int8 per-channel quantization of the float weights.
The alternatives are worse: int4 would throw away 4 of the 8 bits, and keeping Q8_0's blocks needs a
kernel torch does not have. (Measured on SmolLM2's Q8_0 token table: see docs/quantization.md.)

No tensor is dequantized to float on the way: blocks are split with numpy views into the integer
tensors and scales. Norms (F32) stay float. Other quant types (Q4_K, Q6_K, ...) have no native path:
loading names the type and stops, unless ``dequantize_other=True`` dequantizes just those tensors to
float (their layers then run as fp32 ``nn.Linear``).

llama.cpp's q/k row permutation (see ``lmlab.checkpoints.gguf``) is undone on the quantized rows: each
output row keeps its own blocks, so permuting the rows of the values, scales and minimums together is
exactly the permutation of the float weight.

Shapes: N rows (out features), K row length (in features), B = K/32 blocks per row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmlab.checkpoints.gguf import (_open, dequantize_tensor, gguf_config, lmlab_key, read_gguf_metadata,
                                    unpermute_qk)
from lmlab.errors import CheckpointError
from lmlab.quant.linear import Int4Linear, Int8Linear, pack_nibbles, quantize_int8
from lmlab.quant.model import QUANT_FORMAT, attach_embedding, fill_float, float_skeleton, set_quantized

NATIVE_TYPES = ("Q4_0", "Q4_1", "Q8_0")
FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK = 32


def _blocks(tensor, block_bytes: int) -> np.ndarray:
    """The raw bytes of a quantized GGUF tensor as (N, B, block_bytes) uint8 (a view, no copy)."""
    data = np.asarray(tensor.data)
    N = data.shape[0]
    return data.reshape(N, -1, block_bytes)


def _fp16(raw: np.ndarray) -> torch.Tensor:
    """(..., 2) uint8 little-endian fp16 bytes -> (...) fp32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """(N, B, 16) llama.cpp nibbles -> (N, B*32) uint8 values in [0, 15], in weight order."""
    low, high = qs & 0x0F, qs >> 4  # elements 0-15 and 16-31 of each block
    values = np.concatenate([low, high], axis=-1)  # (N, B, 32)
    return torch.from_numpy(values.reshape(values.shape[0], -1))


def int4_parts(tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 tensor -> (values (N, K) uint8 in [0, 15], scale (N, B), min (N, B)) fp32."""
    kind = tensor.tensor_type.name
    if kind == "Q4_1":
        blocks = _blocks(tensor, 20)  # (N, B, 20): d, m, qs[16]
        scale, minimum = _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4])
        values = _nibbles(blocks[..., 4:])
    else:
        blocks = _blocks(tensor, 18)  # (N, B, 18): d, qs[16]
        scale = _fp16(blocks[..., 0:2])
        minimum = -8 * scale
        values = _nibbles(blocks[..., 2:])
    return values, scale, minimum


def q8_0_values(tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 tensor -> (q (N, K) int8, block scale (N, B) fp32)."""
    blocks = _blocks(tensor, 34)  # (N, B, 34): d, q[32]
    scale = _fp16(blocks[..., 0:2])
    q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(blocks.shape[0], -1))
    return q, scale


def requantize_q8_0(q: torch.Tensor, block_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 (per-32 scales) -> per-channel int8, one row-block at a time (no full-size float copy)."""
    out_q, out_scale = torch.empty_like(q), torch.empty(q.shape[0])
    for start in range(0, q.shape[0], 4096):
        rows = slice(start, start + 4096)
        w = (q[rows].float().unflatten(-1, (-1, BLOCK)) * block_scale[rows][..., None]).flatten(-2)  # (n, K)
        out_q[rows], out_scale[rows] = quantize_int8(w)
    return out_q, out_scale


def load_gguf_native(path: str | Path, dequantize_other: bool = False) -> nn.Module:
    """A GGUF file -> Transformer whose Q4_0/Q4_1/Q8_0 layers run on int4/int8 kernels (eval mode)."""
    path = Path(path)
    metadata = read_gguf_metadata(path)
    cfg = gguf_config(metadata)
    reader = _open(path)
    other = sorted({t.tensor_type.name for t in reader.tensors
                    if t.tensor_type.name not in NATIVE_TYPES + FLOAT_TYPES})
    if other and not dequantize_other:
        raise CheckpointError(f"{path.name} holds {', '.join(other)} tensors, which have no native lmlab kernel "
                              f"(native: {', '.join(NATIVE_TYPES)}); pass --dequantize-other / dequantize_other=True "
                              f"to run those layers in fp32, or load without quantize='native'")
    model = float_skeleton(cfg)
    record = {"format": QUANT_FORMAT, "layers": {}, "embedding": "float", "source": f"GGUF {path.name}",
              "gguf_types": {}}
    floats: dict[str, torch.Tensor] = {}
    embed_tensor = None
    for tensor in reader.tensors:
        key, kind = lmlab_key(tensor.name), tensor.tensor_type.name
        if key is None:
            raise CheckpointError(f"{path} has a tensor lmlab's llama layout has no place for: {tensor.name}")
        record["gguf_types"][kind] = record["gguf_types"].get(kind, 0) + 1
        heads = (cfg.n_heads if tensor.name.endswith("attn_q.weight")
                 else cfg.n_kv_heads if tensor.name.endswith("attn_k.weight") else None)
        if key == "tok_embed.weight":
            embed_tensor = tensor  # handled after the loop: a tied head, or a float table
            continue
        if kind not in NATIVE_TYPES or not key.endswith(".weight") or tensor.data.ndim != 2:
            weight = torch.from_numpy(dequantize_tensor(tensor, path))
            floats[key] = unpermute_qk(weight, heads) if heads else weight
            continue
        name = key.removesuffix(".weight")
        set_quantized(model, name, _native_layer(tensor, name, heads))
        record["layers"][name] = _spec(kind)
    if embed_tensor is not None:
        kind = embed_tensor.tensor_type.name
        if cfg.tie_embeddings and kind in NATIVE_TYPES:
            set_quantized(model, "lm_head", _native_layer(embed_tensor, "lm_head", None))
            record["layers"]["lm_head"] = _spec(kind)
            record["embedding"] = "tied"
            attach_embedding(model, record, str(path))
        else:  # an untied table is only looked up: float (one tensor dequantized)
            floats["tok_embed.weight"] = torch.from_numpy(dequantize_tensor(embed_tensor, path))
    fill_float(model, floats, str(path))
    model.quantization = record
    return model.eval()


def _spec(kind: str) -> dict:
    return {"bits": 8} if kind == "Q8_0" else {"bits": 4, "group_size": BLOCK}


def _native_layer(tensor, name: str, heads: int | None) -> nn.Module:
    """One GGUF tensor -> Int4Linear / Int8Linear, q/k rows un-permuted when `heads` is given."""
    permute = (lambda t: unpermute_qk(t, heads)) if heads else (lambda t: t)
    if tensor.tensor_type.name == "Q8_0":
        q, block_scale = q8_0_values(tensor)
        q, scale = requantize_q8_0(q, block_scale)
        q, scale = permute(q), permute(scale[:, None])[:, 0]
        return Int8Linear(q, scale)
    values, scale, minimum = int4_parts(tensor)
    return Int4Linear(pack_nibbles(permute(values)), permute(scale), permute(minimum), BLOCK, name=name)
