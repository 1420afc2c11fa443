"""Compute precision chosen by what the hardware does fast: the one place that decides it.

bf16 halves memory traffic, but it is only *fast* where the hardware multiplies bf16 natively:
CPUs with AVX-512 BF16 / AMX (oneDNN reports them through
``torch.ops.mkldnn._is_mkldnn_bf16_supported()``) and CUDA GPUs from Ampere on. Measured on such a
CPU, a bf16 matmul runs at about 4x the fp32 rate; on an AVX2-only CPU, bf16 is emulated and
10-100x *slower* than fp32. So ``"auto"`` picks bf16 where it is native and fp32 everywhere else;
an explicit ``"bf16"`` is honoured anyway (it still saves memory), but the description says it is slow.

Every command that computes (``generate``, ``summarize``, ``lab``, training, the benchmarks) asks
:func:`resolve_precision` for the dtype and prints :func:`describe_precision`, so a reader always
sees which path was taken and why.
"""

from __future__ import annotations

import torch

from lmlab.errors import choices_error

PRECISIONS = ("auto", "fp32", "bf16")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _device_type(device) -> str:
    """'cpu', 'cuda', ... from a torch.device, a string like 'cuda:0', or None (= CPU)."""
    if device is None:
        return "cpu"
    return torch.device(device).type


def native_bf16_supported(device=None) -> bool:
    """True when `device` (default: the CPU) multiplies bf16 natively, i.e. faster than fp32.

    The capability probes are private or optional in some torch builds, so a failing probe means
    "not native" (the safe answer: fp32 is never the slow path).
    """
    kind = _device_type(device)
    try:
        if kind == "cpu":
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if kind == "cuda":
            return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return False


def _choose(name: str, device) -> tuple[torch.dtype, str]:
    """(dtype, why) for a precision name on a device; the single decision both public functions report."""
    if name not in PRECISIONS:
        raise choices_error("precision", name, PRECISIONS)
    kind = _device_type(device)
    where = "this CPU" if kind == "cpu" else f"this {kind} device"
    native = native_bf16_supported(device)
    if name == "auto":
        if native:
            return torch.bfloat16, f"bf16 (auto: {where} has native bf16)"
        return torch.float32, f"fp32 (auto: {where} has no native bf16)"
    if name == "bf16" and not native:
        return torch.bfloat16, (f"bf16 (requested; {where} has no native bf16, so it is emulated "
                                "and much slower than fp32)")
    return _DTYPES[name], f"{name} (requested)"


def resolve_precision(name: str = "auto", device=None) -> torch.dtype:
    """The compute dtype for ``name`` in ("auto", "fp32", "bf16") on ``device`` (default: CPU).

    "auto" is bf16 where the device has native bf16, else fp32; explicit choices are honoured.
    An unknown name raises a one-line ConfigError naming it.
    """
    return _choose(name, device)[0]


def describe_precision(name: str = "auto", device=None) -> str:
    """One line saying which precision ``name`` resolves to on ``device`` and why.

    For example "fp32 (auto: this CPU has no native bf16)".
    """
    return _choose(name, device)[1]


def apply_precision(model: torch.nn.Module, name: str = "auto") -> str:
    """Cast `model`'s floating-point parameters to the precision ``name`` resolves to on its device;
    return the one-line description to print.

    Only parameters are cast: buffers such as RoPE's inverse frequencies stay fp32, because positions
    times a bf16 frequency lose the angle (bf16 keeps 8 bits of mantissa: at position 1000 the rotation
    would be off by several radians). The KV cache follows the parameters (``model.new_cache``).
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    dtype, why = _choose(name, device)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return why
