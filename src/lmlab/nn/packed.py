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
* packs lazily on its first eligible call and keeps the packed copy on the module *after* the block
  ends, so the next generation with the same row count reuses it: weights are packed once per model,
  not once per ``generate()`` call. The copy is re-made when the weight's ``_version`` or ``data_ptr``
  changes (an in-place update or a new tensor; a weight created under ``torch.inference_mode`` has no
  version counter, so only a new tensor is seen), or for another row count; ``release_packed(model)``
  frees the copies.

Padding instead of re-packing: when finished rows leave a batch, R shrinks (8 -> 6 -> 4 ...).
Re-packing every weight of SmolLM2-135M for the new R takes ~0.3 s on one core (2-3 decode steps),
while a few zero rows cost little next to reading the weights, so the weights are packed once, for
the largest R, and smaller R are zero-padded up to it. Padding stops paying once R is about half of M
(measured, SmolLM2 step at R rows with M=8: R=6 116 ms padded vs 131 ms F.linear; R=4 106 vs 112;
R=2 107 vs 72), so generation passes ``min_rows = M // 2 + 1`` and smaller R use ``F.linear`` again.

Memory: every packed Linear holds a second copy of its weight in MKL's layout, for as long as the model
keeps it (``packed_bytes(model)`` reports the size of MKL's buffers: an upper bound, see below). For
SmolLM2-135M at M=8 (513 MiB of fp32 Linear weights) the process's resident memory grows by ~0.54 GB,
about one more copy of the weights; the buffers MKL asks for are larger (2.6 GB of address space in
all, 223 MiB for the 108 MiB head), but only the part MKL writes becomes resident. Tied weights work:
the packed copy belongs to the Linear, the shared ``Parameter`` is only read.

No-op (the context manager changes nothing) when the MKL ops are missing (non-MKL builds, e.g. ARM),
when any Linear weight is not an fp32 CPU tensor (CUDA, bf16), or when the model is training.
Results differ from ``F.linear`` by float rounding only (another accumulation order).

Whether it pays depends on the CPU: measured at batch 8 on an AVX2 machine it made decoding 1.5x
faster, on an AVX-512 machine 5% *slower* (MKL's plain sgemm is better there) at ~0.75 GB more memory.
So generation turns it on (``maybe_packed_linears``) only where a one-off calibration on the model's
own weight shapes measures it faster on the machine at hand (``packing_pays``; the verdict is cached
per process and in ``~/.cache/lmlab/packed_gemm.json``, keyed by CPU model, torch version, thread count,
row count and shapes). ``LMLAB_PACKED_GEMM=0`` / ``=1`` force it off / on.

Shapes: R rows of the flattened input, M the row count the weights are packed for, K in features,
N out features.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError

ENV_VAR = "LMLAB_PACKED_GEMM"
AUTO_MIN_ROWS = 4  # below this many rows packing never pays (one row is a bandwidth-bound matrix-vector product)
PAYS_BELOW = 0.95  # packing is chosen only when it takes < 95% of F.linear's time: noise must not flip it on
CALIBRATION_ROUNDS = 3  # alternating plain / packed passes over the model's weights, best of each
_STATE = "_lmlab_packed"  # attribute holding a _PackedWeight on a Linear (kept between generations)
_ACTIVE = "_lmlab_packed_active"  # set while a packed_linears block has patched the Linear's forward


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


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` (N, K) copied into MKL's blocked layout for products with `rows` rows."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)


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
            self.packed = _pack(weight, self.rows)
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
    ``F.linear``. On exit the original forwards are restored; the packed copies stay on the Linears for
    the next block with the same `max_rows` (``release_packed`` frees them). Nesting is safe: Linears
    already patched by an outer block are left to it.
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
            if getattr(m, _ACTIVE, False):
                continue  # an outer packed_linears owns this one
            state = getattr(m, _STATE, None)
            if state is None or state.rows != max_rows:  # packed for another row count: re-pack lazily
                setattr(m, _STATE, _PackedWeight(max_rows, min_rows))
            else:
                state.min_rows = min_rows
            had_forward = "forward" in m.__dict__
            old = m.__dict__.get("forward")
            m.forward = types.MethodType(_packed_forward, m)
            setattr(m, _ACTIVE, True)
            patched.append((m, had_forward, old))
        yield True
    finally:
        for m, had_forward, old in patched:
            if had_forward:
                m.forward = old
            else:
                del m.forward
            delattr(m, _ACTIVE)


def packed_bytes(model: nn.Module) -> int:
    """Bytes of MKL's buffers for the packed copies of `model`: an upper bound on the memory they cost
    (only the part MKL writes becomes resident: ~0.54 GB of 2.2 GB for SmolLM2-135M at 8 rows)."""
    total = 0
    for m in _linears(model):
        state = getattr(m, _STATE, None)
        if state is not None and state.packed is not None:
            total += state.packed.numel() * state.packed.element_size()
    return total


def release_packed(model: nn.Module) -> int:
    """Free the packed weight copies kept on `model`'s Linears -> the number of bytes they held."""
    freed = packed_bytes(model)
    for m in _linears(model):
        if hasattr(m, _STATE) and not getattr(m, _ACTIVE, False):
            delattr(m, _STATE)
    return freed


# --- calibration: does packing pay on this machine? ------------------------------------------------
# calibration key -> {"packed_pays": bool, "packed_s": float, "plain_s": float}; this process's memory
_VERDICTS: dict[str, dict] = {}


def _cache_file() -> Path:
    """``$XDG_CACHE_HOME/lmlab/packed_gemm.json`` (default ``~/.cache/lmlab/packed_gemm.json``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "lmlab" / "packed_gemm.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _weight_shapes(model: nn.Module) -> dict[tuple[int, int, bool], list[nn.Linear]]:
    """(out features, in features, has bias) -> the Linears of that shape (tied weights counted once each)."""
    shapes: dict[tuple[int, int, bool], list[nn.Linear]] = {}
    for m in _linears(model):
        shapes.setdefault((m.out_features, m.in_features, m.bias is not None), []).append(m)
    return shapes


def calibration_key(model: nn.Module, rows: int) -> str:
    """What the verdict depends on: CPU model, torch version, thread count, row count, weight shapes."""
    shapes = sorted((n, k, bias, len(ms)) for (n, k, bias), ms in _weight_shapes(model).items())
    return json.dumps([_cpu_model(), torch.__version__, torch.get_num_threads(), rows, shapes])


def _matmul_seconds(model: nn.Module, rows: int, packed: bool, repeats: int = 3) -> float:
    """Seconds for one pass of `rows`-row products through every Linear of `model`, each weight once, as
    in a decode step (best of `repeats` passes).

    Every weight once, not one weight many times: in a decode step the weights stream from memory, and a
    weight that stayed in cache would make the plain sgemm's per-call packing look cheaper than it is.
    The packed pass packs on its warm-up pass (not timed: generation pays it once per model) and leaves
    the copies on the model, for generation to reuse if packing wins.
    """
    linears = _linears(model)
    generator = torch.Generator().manual_seed(0)  # never the global RNG: a training run's dropout stream uses it
    inputs = {m.in_features: torch.randn(rows, m.in_features, generator=generator) for m in linears}  # (R, K)
    context = packed_linears(model, rows, min_rows=rows) if packed else contextlib.nullcontext()
    with torch.inference_mode(), context:
        def one_pass() -> None:
            for m in linears:
                x = inputs[m.in_features]
                m(x) if packed else F.linear(x, m.weight, m.bias)

        one_pass()  # warm-up: packs (packed), first touch of MKL's buffers
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            one_pass()
            best = min(best, time.perf_counter() - start)
    return best


def packing_pays(model: nn.Module, rows: int) -> bool:
    """Does the packed path multiply `rows` rows through `model`'s weights faster than ``F.linear`` here?

    Measured once (alternating timed passes through the model's own weights, as a decode step makes
    them, plus packing: ~1-2 s for SmolLM2 on one idle core)
    and remembered per process and in ``_cache_file()`` under ``calibration_key``; packing must take
    less than ``PAYS_BELOW`` of the plain time. A cache file that cannot be read or written is ignored.
    """
    return calibration(model, rows)["packed_pays"]


def calibration(model: nn.Module, rows: int) -> dict:
    """The calibration entry behind ``packing_pays``: {"packed_pays", "packed_s", "plain_s"}."""
    key = calibration_key(model, rows)
    if key in _VERDICTS:
        return _VERDICTS[key]
    path = _cache_file()
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    if not isinstance(stored, dict):
        stored = {}
    entry = stored.get(key)
    if not (isinstance(entry, dict) and isinstance(entry.get("packed_pays"), bool)):
        # the two alternate, so that both see the same background load (best of CALIBRATION_ROUNDS each)
        plain = packed = float("inf")
        for _ in range(CALIBRATION_ROUNDS):
            plain = min(plain, _matmul_seconds(model, rows, packed=False, repeats=1))
            packed = min(packed, _matmul_seconds(model, rows, packed=True, repeats=1))
        entry = {"packed_pays": packed < PAYS_BELOW * plain, "packed_s": packed, "plain_s": plain}
        if not entry["packed_pays"]:
            release_packed(model)  # the calibration's copies: not worth their memory here
        stored[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(stored, indent=1) + "\n")
            tmp.replace(path)  # atomic: a concurrent reader sees the old or the new file, never half
        except OSError:
            pass
    _VERDICTS[key] = entry
    return entry


def packed_gemm_enabled(model: nn.Module, rows: int) -> bool:
    """Should generation with `rows` rows per decode step use ``packed_linears``?

    ``LMLAB_PACKED_GEMM``: ``0`` never; ``1`` whenever the model supports it (even for one row, where it
    does not pay); unset, empty or ``auto``: when the model supports it, ``rows >= AUTO_MIN_ROWS`` and the
    calibration (``packing_pays``) measured it faster on this machine.
    """
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value not in ("", "auto", "0", "1"):
        raise ConfigError(f"{ENV_VAR}={value!r} is not valid; choose one of: 0, 1, auto (or leave it unset)")
    if value == "0" or not supports_packing(model):
        return False
    if value == "1":
        return True
    return rows >= AUTO_MIN_ROWS and packing_pays(model, rows)


def describe_packed_gemm(model: nn.Module, rows: int) -> str:
    """One line: which matmul path generation takes for `rows` rows, and why (for benchmarks and logs)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not supports_packing(model):
        return "plain F.linear (packing unsupported here: no MKL ops, not fp32 on the CPU, or training)"
    if value in ("0", "1"):
        return f"{'packed' if value == '1' else 'plain F.linear'} (forced by {ENV_VAR}={value})"
    if rows < AUTO_MIN_ROWS:
        return f"plain F.linear ({rows} row(s) < {AUTO_MIN_ROWS}: packing never pays)"
    entry = calibration(model, rows)
    ratio = entry["packed_s"] / entry["plain_s"] if entry.get("plain_s") else float("nan")
    return (f"{'packed' if entry['packed_pays'] else 'plain F.linear'} (calibrated on this CPU at {rows} rows: "
            f"packed matmuls take {ratio:.2f}x the plain time; packed when < {PAYS_BELOW})")


def maybe_packed_linears(model: nn.Module, rows: int) -> contextlib.AbstractContextManager:
    """``packed_linears(model, rows)`` if ``packed_gemm_enabled(model, rows)``, else a do-nothing context.

    Steps with more than half of `rows` rows left use the packed weights (zero-padded); fewer rows use
    ``F.linear`` (see the module docstring for the measurement).
    """
    if packed_gemm_enabled(model, rows):
        return packed_linears(model, rows, min_rows=rows // 2 + 1)
    return contextlib.nullcontext(False)
