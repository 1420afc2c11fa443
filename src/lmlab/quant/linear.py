"""Weight-only quantized linear layers on PyTorch's fused CPU kernels, and the embedding a tied head shares.

Two formats, both *weight-only*: activations stay float, only the weight matrix is stored in few bits.

* **int8**, symmetric, one scale per output channel::

      w[n, k] = scale[n] * q[n, k]            q in [-127, 127] (int8)

  run by ``torch._weight_int8pack_mm(x_bf16, q, scale_bf16)``.
* **int4**, group-wise scale and minimum over `G` consecutive inputs (G = 32, 64 or 128)::

      w[n, k] = scale[n, k // G] * q[n, k] + min[n, k // G]      q in [0, 15]

  (GGUF Q4_1's convention, so its blocks load unchanged; Q4_0's ``d * (q - 8)`` is min = -8 d). The
  kernel ``torch._weight_int4pack_mm_for_cpu`` uses another zero point, ``(q - 8) * scale + zero``,
  so the kernel's zero is ``min + 8 * scale`` (probed on torch 2.13: that reproduces a
  dequantize-then-matmul reference to bf16 rounding, ``q * scale + zero`` misses by the size of the
  output). The kernel wants the weight re-laid out by ``torch._convert_weight_to_int4pack_for_cpu``
  (a CPU-specific, opaque layout), so what is *stored* is the plain layout: two 4-bit values per byte,
  ``byte[n, j] = q[n, 2j] | q[n, 2j + 1] << 4``, shape (N, K/2) uint8; the packed copy is made when the
  module is built.

Both kernels have vectorised paths only for bf16 activations (fp32 falls to a scalar loop 20-50x
slower), so ``forward`` casts its input to bf16 just around the matmul and casts the result back;
norms, attention and softmax outside stay fp32. The kernels take the scales in bf16 too: the weight a
layer actually multiplies by is ``dequantize()`` (bf16-rounded scales and zeros), which is what the
tests compare against.

CPU only: the CUDA kernels exist (``torch._weight_int4pack_mm`` with its own tile layout) but lmlab has
no tested path for them yet, so a quantized layer on another device raises an error that says so.

Shapes: N out features, K in features, G group size, R rows of the flattened input.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.errors import CheckpointError, ConfigError

GROUP_SIZES = (32, 64, 128)
BITS = (8, 4)
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs out_features divisible by 16: padded with zero rows


def _require(name: str) -> None:
    if not hasattr(torch, name):
        raise CheckpointError(f"this torch ({torch.__version__}) has no torch.{name}, the kernel lmlab's quantized "
                              f"layers run on; install a torch >= 2.6 CPU build")


def _check_cpu(module: nn.Module, x: torch.Tensor) -> None:
    if x.device.type != "cpu":
        raise ConfigError(f"{type(module).__name__} runs on CPU kernels only; got input on {x.device} "
                          f"(lmlab has no CUDA path for quantized weights yet: torch._weight_int4pack_mm / "
                          f"_weight_int8pack_mm on CUDA are not wired and tested)")


# --- quantizing a float weight ---------------------------------------------------------------------
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int8, scale (N,) fp32 with ``w ~= scale[:, None] * q`` (round to nearest)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127  # (N,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8, ``q[:, 2j] | q[:, 2j+1] << 4``."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., K/2) uint8 -> (..., K) uint8 values in [0, 15] (the inverse of ``pack_nibbles``)."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)  # (..., K/2, 2) -> (..., K)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> nibbles (N, K/2) uint8, scale (N, K/G) fp32, min (N, K/G) fp32.

    Asymmetric per group: the group's [min, max] is cut into 15 steps, ``q = round((w - min) / scale)``.
    """
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group_size, group_size)  # (N, K/G, G)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # (N, K/G)
    scale = (high - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0, w = min exactly
    q = torch.round((w - low[..., None]) / safe[..., None]).clamp(0, 15).reshape(N, K)
    return pack_nibbles(q), scale, low


# --- the modules ----------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """Common part: shapes, optional fp32 bias, and the bf16 cast around the kernel."""

    bits: int = 0

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        _check_cpu(self, x)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (R, K)
        y = self._matmul(rows).to(x.dtype if x.dtype.is_floating_point else torch.float32)  # (R, N)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The (N, K) fp32 weight this layer multiplies by (bf16-rounded scales, as the kernel uses them)."""
        raise NotImplementedError

    def embedding_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the dequantized weight, (..., K) fp32: the lookup of an embedding tied to this head."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of the stored tensors (what a checkpoint holds), not counting the kernel's packed copy."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    """y = x W^T (+ b) with W stored as int8 and one scale per output channel."""

    bits = 8

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        _require("_weight_int8pack_mm")
        N, K = qweight.shape
        super().__init__(K, N, bias)
        if qweight.dtype != torch.int8 or tuple(scale.shape) != (N,):
            raise CheckpointError(f"int8 weight must be int8 (N, K) with scale (N,); got {qweight.dtype} "
                                  f"{tuple(qweight.shape)} and scale {tuple(scale.shape)}")
        self.register_buffer("qweight", qweight.contiguous())  # (N, K) int8
        self.register_buffer("scale", scale.float().contiguous())  # (N,) fp32, as stored
        self.register_buffer("_scale_bf16", self.scale.to(torch.bfloat16), persistent=False)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        q, scale = quantize_int8(linear.weight)
        return cls(q, scale, linear.bias)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(rows, self.qweight, self._scale_bf16)  # (R, N) bf16

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self._scale_bf16.float()[:, None]

    def embedding_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids][..., None]  # (..., K)


class Int4Linear(QuantizedLinear):
    """y = x W^T (+ b) with W stored as 4-bit values, a scale and a minimum per group of `group_size` inputs."""

    bits = 4

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, name: str = ""):
        _require("_weight_int4pack_mm_for_cpu")
        _require("_convert_weight_to_int4pack_for_cpu")
        N, K = qweight.shape[0], qweight.shape[1] * 2
        check_int4_shape(name or "layer", K, N, group_size)
        super().__init__(K, N, bias)
        if qweight.dtype != torch.uint8 or tuple(scale.shape) != (N, K // group_size) or scale.shape != minimum.shape:
            raise CheckpointError(f"int4 weight must be uint8 (N, K/2) with scale and min (N, K/{group_size}); got "
                                  f"{qweight.dtype} {tuple(qweight.shape)}, {tuple(scale.shape)}, {tuple(minimum.shape)}")
        self.group_size = group_size
        self.register_buffer("qweight", qweight.contiguous())  # (N, K/2) uint8, two values per byte
        self.register_buffer("scale", scale.float().contiguous())  # (N, K/G) fp32
        self.register_buffer("min", minimum.float().contiguous())  # (N, K/G) fp32
        # the kernel's operands: its packed layout and (K/G, N, 2) bf16 [scale, zero] with zero = min + 8 scale;
        # the kernel takes N in multiples of 16, so other widths get zero rows that forward() drops again
        self._pad = -N % INT4_N_MULTIPLE
        values = unpack_nibbles(self.qweight).to(torch.int32)  # (N, K)
        scale, zero = self.scale, self.min + 8 * self.scale
        if self._pad:
            values, scale, zero = (torch.cat([t, t.new_zeros(self._pad, t.shape[1])]) for t in (values, scale, zero))
        self.register_buffer("_packed", torch._convert_weight_to_int4pack_for_cpu(values, 2), persistent=False)
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # (N, K/G, 2) -> (K/G, N, 2)
        self.register_buffer("_scales_zeros", scales_zeros.to(torch.bfloat16).contiguous(), persistent=False)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int, name: str = "") -> "Int4Linear":
        check_int4_shape(name or "layer", linear.in_features, linear.out_features, group_size)
        q, scale, low = quantize_int4(linear.weight, group_size)
        return cls(q, scale, low, group_size, linear.bias, name)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(rows, self._packed, self.group_size, self._scales_zeros)  # (R, N+pad)
        return y[:, :self.out_features] if self._pad else y

    def _dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """(..., K) values with (..., K/G) scale and kernel zero -> (..., K) fp32 ``(q - 8) * scale + zero``."""
        G = self.group_size
        grouped = q.float().unflatten(-1, (-1, G)) - 8  # (..., K/G, G)
        return (grouped * scale[..., None] + zero[..., None]).flatten(-2)

    def dequantize(self) -> torch.Tensor:
        scale, zero = self._scales_zeros.float().transpose(0, 1)[:self.out_features].unbind(-1)  # (N, K/G) each
        return self._dequantize(unpack_nibbles(self.qweight), scale, zero)

    def embedding_rows(self, ids: torch.Tensor) -> torch.Tensor:
        # the stored fp32 scale and minimum: a lookup needs no kernel, so it skips the kernel's bf16 rounding
        q = unpack_nibbles(self.qweight[ids])  # (..., K)
        scale = self.scale[ids]
        return self._dequantize(q, scale, self.min[ids] + 8 * scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def check_int4_shape(name: str, in_features: int, out_features: int, group_size: int) -> None:
    """One-line errors for shapes the int4 kernel cannot take, naming the layer and the width.

    (Any output width works: widths that are not a multiple of 16 are padded with zero rows.)"""
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"group_size={group_size!r} is not valid; choose one of: {', '.join(map(str, GROUP_SIZES))}")
    if in_features % group_size:
        raise ConfigError(f"cannot quantize {name!r} to int4 with group_size={group_size}: its input width "
                          f"{in_features} is not divisible by {group_size} (try a group size that divides it, "
                          f"or leave the layer out)")


class QuantizedEmbedding(nn.Module):
    """An embedding lookup that reads rows of a quantized weight (fp32 out).

    With tied embeddings the table *is* the output head's weight: the head is quantized as a linear
    and this module reads the same integer tensors, so no float copy of the table is kept. The head is
    held outside the module tree (``tied=True``) so its tensors are stored once, under ``lm_head``.
    """

    def __init__(self, table: QuantizedLinear, tied: bool):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.tied = tied
        if tied:
            self._table = (table,)  # a tuple: not registered as a submodule, its tensors belong to lm_head
        else:
            self.table = table

    @property
    def source(self) -> QuantizedLinear:
        return self._table[0] if self.tied else self.table

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.source.qweight.device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return self.source.embedding_rows(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied={self.tied}"


def is_quantized(model: nn.Module) -> bool:
    """True when any layer of `model` holds quantized weights."""
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


def float_linear(linear: nn.Module) -> nn.Linear:
    """A plain fp32 nn.Linear with a quantized layer's dequantized weight (for tests and explicit fallbacks)."""
    if not isinstance(linear, QuantizedLinear):
        return linear
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(linear.dequantize())
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out


__all__ = ["Int8Linear", "Int4Linear", "QuantizedLinear", "QuantizedEmbedding", "quantize_int8", "quantize_int4",
           "pack_nibbles", "unpack_nibbles", "check_int4_shape", "is_quantized", "float_linear"]
