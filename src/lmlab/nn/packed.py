"""Pre-packed GEMM weights for batched CPU decoding: an opt-in fast path for ``nn.Linear`` (generation opts in).

Why: a decode step multiplies a skinny activation (M = rows still decoding, e.g. 8) by every weight
matrix. For such a skinny M, MKL's ``sgemm`` copies ("packs") the whole weight matrix into its
blocked layout on *every* call, so a batch-8 step pays for reading each weight twice plus writing it
once. MKL can pack a weight once for a fixed M (``cblas_sgemm_pack``, exposed by PyTorch as
``torch.ops.mkl._mkl_reorder_linear_weight`` / ``_mkl_linear``; inductor uses the same pair for frozen
CPU linears) and reuse it for every later call. On SmolLM2-135M at batch 8 this makes the lm_head
(49152x576) ~3x faster and a whole decode step ~1.3-1.4x faster. At M=1 the product is a
matrix-vector product bound by memory bandwidth, and packing does not help.

How: ``packed_linears(model, max_rows)`` swaps the ``forward`` of every plain ``nn.Linear`` (not
subclasses, which may compute something else) for one that

* flattens its input to 2-D, (R, K); when ``min_rows <= R <= max_rows`` it zero-pads the rows to
  ``max_rows``, multiplies with the weight packed for ``max_rows`` rows and drops the padding rows;
  any other row count (the prefill's B*T rows, a single row), dtype, device, or a call that needs
  gradients goes to ``F.linear`` unchanged;
* packs lazily on its first eligible call and caches the packed copy on the module; the cache is
  re-made when the weight's ``_version`` or ``data_ptr`` changes (an in-place update or a new tensor;
  a weight created under ``torch.inference_mode`` has no version counter, so only a new tensor is seen).

Padding instead of re-packing: when finished rows leave a batch, R shrinks (8 -> 6 -> 4 ...).
Re-packing every weight of SmolLM2-135M for the new R takes ~0.3 s on one core (2-3 decode steps),
while a few zero rows cost little next to reading the weights, so the weights are packed once, for
the largest R, and smaller R are zero-padded up to it. Padding stops paying once R is about half of M
(measured, SmolLM2 step at R rows with M=8: R=6 116 ms padded vs 131 ms F.linear; R=4 106 vs 112;
R=2 107 vs 72), so generation passes ``min_rows = M // 2 + 1`` and smaller R use ``F.linear`` again.

Memory: while active, every packed Linear holds a second copy of its weight in MKL's layout. For
SmolLM2-135M at M=8 (513 MiB of fp32 Linear weights) the process's resident memory grows by ~0.54 GB,
about one more copy of the weights; the buffers MKL asks for are larger (2.6 GB of address space in
all, 223 MiB for the 108 MiB head), but only the part MKL writes becomes resident. The copies are
freed when the context exits. Tied weights work: the packed copy belongs to the Linear, the shared
``Parameter`` is only read.

No-op (the context manager changes nothing) when the MKL ops are missing (non-MKL builds, e.g. ARM),
when any Linear weight is not an fp32 CPU tensor (CUDA, bf16), or when the model is training.
Results differ from ``F.linear`` by float rounding only (another accumulation order).

Generation turns it on through ``maybe_packed_linears`` (see ``packed_gemm_enabled`` for the rule and the
``LMLAB_PACKED_GEMM`` environment variable).

Shapes: R rows of the flattened input, M the row count the weights are packed for, K in features,
N out features.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError

ENV_VAR = "LMLAB_PACKED_GEMM"
AUTO_MIN_ROWS = 4  # unless LMLAB_PACKED_GEMM says otherwise, generation packs from this many rows on
_STATE = "_lmlab_packed"  # attribute holding a _PackedWeight on a patched Linear


def packed_gemm_available() -> bool:
    """True when this torch build has MKL's pre-packed sgemm ops (x86 builds with MKL)."""
    mkl = torch.ops.mkl
    return (torch.backends.mkl.is_available() and hasattr(mkl, "_mkl_reorder_linear_weight")
            and hasattr(mkl, "_mkl_linear"))


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear]


def supports_packing(model: nn.Module) -> bool:
    """True when packing can apply: ops present, model not training, every Linear weight fp32 on the CPU."""
    linears = _linears(model)
    return (packed_gemm_available() and not model.training and bool(linears)
            and all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 for m in linears))


class _PackedWeight:
    """One Linear's weight packed for `rows` rows, with the weight identity it was made from."""

    def __init__(self, rows: int, min_rows: int):
        self.rows, self.min_rows = rows, min_rows
        self.packed: torch.Tensor | None = None
        self.key: tuple[int, int] | None = None  # (weight._version, weight.data_ptr()) when packed

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        # inference tensors (made under inference_mode) have no version counter: only a new tensor is seen
        key = (-1 if weight.is_inference() else weight._version, weight.data_ptr())
        if self.packed is None or key != self.key:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), self.rows)
            self.key = key
        return self.packed


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` through the packed weight when the row count fits; ``F.linear`` otherwise."""
    state: _PackedWeight = getattr(self, _STATE)
    weight = self.weight
    R = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (not state.min_rows <= R <= state.rows or x.dtype != torch.float32 or x.device.type != "cpu"
            or weight.dtype != torch.float32 or weight.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (self.bias is not None and self.bias.requires_grad)))):
        return F.linear(x, weight, self.bias)
    M = state.rows
    x2 = x.reshape(R, x.shape[-1]).contiguous()  # (R, K)
    if R < M:
        x2 = F.pad(x2, (0, 0, 0, M - R))  # (M, K) zero rows: the packed weight only serves M rows
    y = torch.ops.mkl._mkl_linear(x2, state.get(weight), weight, self.bias, M)  # (M, N)
    return y[:R].view(*x.shape[:-1], y.shape[-1])  # (..., N)


@contextlib.contextmanager
def packed_linears(model: nn.Module, max_rows: int, min_rows: int = 2) -> Iterator[bool]:
    """Within the block, plain ``nn.Linear`` layers of `model` use weights pre-packed for `max_rows` rows.

    Yields True when the fast path was installed, False when it is a no-op here (see the module
    docstring). Inputs with ``min_rows <= rows <= max_rows`` rows take the packed path; others use
    ``F.linear``. On exit the original forwards are restored and the packed copies freed. Nesting is
    safe: Linears already patched by an outer block are left to it.
    """
    if max_rows < 1 or min_rows < 1:
        raise ConfigError(f"packed_linears needs max_rows >= 1 and min_rows >= 1, got max_rows={max_rows}, "
                          f"min_rows={min_rows}")
    if not supports_packing(model) or min_rows > max_rows:
        yield False
        return
    patched = []
    try:
        for m in _linears(model):
            if hasattr(m, _STATE):
                continue  # an outer packed_linears owns this one
            had_forward = "forward" in m.__dict__
            setattr(m, _STATE, _PackedWeight(max_rows, min_rows))
            old = m.__dict__.get("forward")
            m.forward = types.MethodType(_packed_forward, m)
            patched.append((m, had_forward, old))
        yield True
    finally:
        for m, had_forward, old in patched:
            if had_forward:
                m.forward = old
            else:
                del m.forward
            delattr(m, _STATE)


def packed_gemm_enabled(model: nn.Module, rows: int) -> bool:
    """Should generation with `rows` rows per decode step use ``packed_linears``?

    ``LMLAB_PACKED_GEMM``: ``0`` never; ``1`` whenever the model supports it (even for one row, where it
    does not pay); unset or empty: when it pays, i.e. the model supports it and ``rows >= AUTO_MIN_ROWS``
    (SmolLM2-135M, one core: packing gains ~20% per step at 8 rows and ~15% at 4, loses ~15% at 2).
    """
    value = os.environ.get(ENV_VAR, "").strip()
    if value not in ("", "0", "1"):
        raise ConfigError(f"{ENV_VAR}={value!r} is not valid; choose one of: 0, 1 (or leave it unset)")
    if value == "0" or not supports_packing(model):
        return False
    return value == "1" or rows >= AUTO_MIN_ROWS


def maybe_packed_linears(model: nn.Module, rows: int) -> contextlib.AbstractContextManager:
    """``packed_linears(model, rows)`` if ``packed_gemm_enabled(model, rows)``, else a do-nothing context.

    Steps with more than half of `rows` rows left use the packed weights (zero-padded); fewer rows use
    ``F.linear`` (see the module docstring for the measurement).
    """
    if packed_gemm_enabled(model, rows):
        return packed_linears(model, rows, min_rows=rows // 2 + 1)
    return contextlib.nullcontext(False)
