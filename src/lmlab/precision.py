"""Compute precision chosen by what the hardware does fast: the one place that decides it.

bf16 halves memory traffic, but it is only *fast* where the hardware multiplies bf16 natively:
CPUs with AVX-512 BF16 / AMX (oneDNN reports them through
``torch.ops.mkldnn._is_mkldnn_bf16_supported()``) and CUDA GPUs from Ampere on. Measured on such a
CPU, a bf16 matmul runs at about 4x the fp32 rate; on an AVX2-only CPU, bf16 is emulated and
10-100x *slower* than fp32. So ``"auto"`` picks bf16 where it is native and fp32 everywhere else;
an explicit ``"bf16"`` is honoured anyway (it still saves memory), but the description says it is slow.

Every command that computes (``generate``, ``summarize``, ``lab``, training, the benchmarks) asks
:func:`resolve_precision` for the dtype (or :func:`apply_precision` to cast a model) and prints
:func:`describe_precision`, so a reader always sees which path was taken and why. The CLI and the
library call the same functions: ``lmlab generate --precision auto`` runs exactly what
``apply_precision(model, "auto")`` followed by ``lmlab.generate`` runs.

``LMLAB_NATIVE_BF16=1`` (or ``0``) overrides the hardware probe, so that one machine can take both
classes' decisions: the test suite uses it to check the AVX2 decision on an AVX-512 machine and the
reverse, and a user can keep ``auto`` at fp32 on a machine whose probe says bf16.
"""

from __future__ import annotations

import os

import torch

from lmlab.errors import ConfigError, choices_error
from lmlab.quant.linear import is_quantized
from lmlab.quant.model import describe_quantization

PRECISIONS = ("auto", "fp32", "bf16")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _device_type(device) -> str:
    """'cpu', 'cuda', ... from a torch.device, a string like 'cuda:0', or None (= CPU)."""
    if device is None:
        return "cpu"
    return torch.device(device).type


NATIVE_BF16_ENV = "LMLAB_NATIVE_BF16"


def native_bf16_override() -> bool | None:
    """What ``LMLAB_NATIVE_BF16`` says (``"1"``: native, ``"0"``: not native), or None when it is unset or empty.

    Any other value is a one-line ConfigError naming it.
    """
    value = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ConfigError(f"{NATIVE_BF16_ENV}={value!r} is not valid; choose one of: 0, 1 (or leave it unset)")
    return value == "1"


def native_bf16_supported(device=None) -> bool:
    """True when `device` (default: the CPU) multiplies bf16 natively, i.e. faster than fp32.

    ``LMLAB_NATIVE_BF16=0|1`` overrides the probe on every device. The capability probes are private
    or optional in some torch builds, so a failing probe means "not native" (the safe answer: fp32 is
    never the slow path).
    """
    override = native_bf16_override()
    if override is not None:
        return override
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
    if native_bf16_override() is not None:  # say so: the decision is not the hardware's
        where = f"{NATIVE_BF16_ENV}={int(native)} says {where}"
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
    return the one-line description to print. The one call the CLI (generate, summarize, lab) and
    library code make before computing with a loaded model.

    Only parameters are cast: buffers such as RoPE's inverse frequencies stay fp32, because positions
    times a bf16 frequency lose the angle (bf16 keeps 8 bits of mantissa: at position 1000 the rotation
    would be off by several radians). The KV cache follows the parameters (``model.new_cache``).
    A quantized model is left as it is: its integer kernels take bf16 inside each matmul and fp32
    around it, so ``name`` is only validated and the line says it is not used.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    dtype, why = _choose(name, device)
    if is_quantized(model):
        return f"fp32 activations around quantized weights ({describe_quantization(model)}); --precision is not used"
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return why
