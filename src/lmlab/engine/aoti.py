"""A decode step compiled ahead of time by PyTorch's own compiler (Inductor + AOTInductor), cached on disk.

The eager decode step of a small model is mostly per-op overhead (see docs/decode.md): about 1,500
kernels and views, each a trip through Python and the dispatcher. Here the *whole* step -- embedding,
every layer, final norm and head -- is one static-shape graph, exported with ``torch.export``,
compiled by Inductor into C++ (AOTInductor: no Python between ops) and packaged into one ``.pt2`` file
(``torch._inductor.aoti_compile_and_package``). The cost is paid once per model, shape bucket, torch
version and CPU; later runs load the package in a fraction of a second.

The static step (``StaticStep``)::

    tokens (B,), positions (B,), slot (1,), valid (B, L), k, v (N, B, Hkv, L, D)  ->  logits (B, V)

writes the new keys/values at cache ``slot`` in place (the caches are inputs the graph mutates) and
attends over all L slots, with a mask built inside the graph: slot j is seen when ``j <= slot`` and
``valid[b, j]`` (0 for a left-padded row's pads). Rotary positions are per row (``positions``), as
``DecoderOnlyRun`` gives them for a left-padded batch.

Shapes are bucketed so that few packages cover every call: batch rows B pad up to 1, 2, 4, 8, 16 or 32
(``BATCH_BUCKETS``; pad rows compute garbage that is dropped), capacity L (prompt + new tokens) rounds
up to a power of two, at least ``MIN_CAPACITY``. Prefill runs the eager model over the prompt and
copies its KV cache into the static one; each step then is one call of the compiled package.

The cache (``~/.cache/lmlab/aoti``, or ``$LMLAB_CACHE_DIR/aoti``) holds one ``.pt2`` per key: a digest of
the model (config, quantization layout, and per tensor its name, shape, dtype, sum and a strided
sample: cheap, and any retrained or re-quantized weight changes it), the shapes, the torch version,
the CPU's flags and this module's ``ENGINE_VERSION``. An entry is written to a temporary name and
renamed into place (a killed compile leaves no half-written entry); a file lock per entry makes a
second process wait for the first one's compile instead of duplicating it. Every load is checked by
one probe step against the eager model; an entry that fails to load or to match is deleted and
rebuilt. Where no C++ compiler exists or a compile fails, ``AOTIEngine.start`` says so in one line
(``warnings``) and returns the eager ``DecoderOnlyRun``.

Shapes: B batch rows (a bucket), T prompt length, N layers, Hkv key/value heads, G query heads per
key/value head, L cache capacity, D head dim, C d_model, V vocabulary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from lmlab.errors import ConfigError

ENGINE_VERSION = 1  # bump when the step's graph changes: old cache entries are then never hit
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
MIN_CAPACITY = 128

# Inductor settings of the packaged step (measured in docs/engine-aoti.md):
# freezing folds the weights into the graph as constants (and lets Inductor pre-pack them);
# max_autotune with the CPP backend lets Inductor's C++ GEMM templates (AMX/AVX-512, incl. weight-only
# int8/int4) compete with ATen's kernels per shape, chosen by benchmarking at compile time.
INDUCTOR_CONFIGS = {"freezing": True}
# A loaded package must reproduce the eager model's logits for one probe token within this relative error
# (norm of the difference / norm of the logits): far above rounding, far below what a corrupt or mismatched
# package gives (~1). bf16 activations: Inductor fuses chains of bf16 ops and rounds once per kernel where
# eager rounds after every op; on SmolLM2-135M that alone measured 0.107.
PROBE_TOLERANCE = {torch.bfloat16: 0.25, torch.float16: 0.25}
AUTOTUNE_CONFIGS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


# --- what can run compiled ----------------------------------------------------------------------------
def _compiler() -> str | None:
    """The C++ compiler Inductor would use, or None."""
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


def available(model) -> tuple[bool, str]:
    """Whether this model's decode step can be compiled here -> (ok, one-line reason)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "decoder"):
        return False, f"the AOTInductor engine runs lmlab Transformers; got {type(model).__name__}"
    if cfg.arch != "decoder":
        return False, f"the AOTInductor engine runs decoder-only models; this one has arch={cfg.arch!r}"
    if cfg.norm_position != "pre":
        return False, f"the AOTInductor engine runs pre-norm decoders; this one has norm_position={cfg.norm_position!r}"
    if cfg.positional != "rope":
        return False, f"the AOTInductor engine runs rotary decoders (LLaMA family); this one has positional={cfg.positional!r}"
    if model.device.type != "cpu":
        return False, f"the AOTInductor engine is CPU-only; the model is on {model.device}"
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        return False, f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package"
    if _compiler() is None:
        return False, "no C++ compiler found (set CXX or install g++); AOTInductor needs one"
    return True, f"AOTInductor compiled step (torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()})"


# --- the static step ---------------------------------------------------------------------------------
class StaticStep(nn.Module):
    """One decode step of a decoder-only lmlab Transformer over a fixed-capacity KV cache (see the module
    docstring). Reuses the model's own modules (norms, projections -- plain, LoRA or quantized --, FFN,
    rotary, head), so the step computes what the eager model computes."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        cfg = model.config
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def forward(self, tokens, positions, slot, valid, *caches):
        model, stack = self.model, self.model.decoder
        cfg = model.config
        B, L = valid.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        x = model.tok_embed(tokens[:, None])  # (B, 1, C)
        if cfg.embed_scale:
            x = x * math.sqrt(cfg.d_model)
        if model.embed_norm is not None:
            x = model.embed_norm(x)
        cos, sin = stack.rotary(positions[:, None])  # (B, 1, 1, D)
        seen = valid & (torch.arange(L, device=valid.device)[None, :] <= slot)  # (B, L)
        blocked = ~seen[:, None, None, :]  # (B, 1, 1, L)
        from lmlab.nn.positional import apply_rotary

        for i, block in enumerate(stack.layers):
            attn = block.attn
            h = block.attn_norm(x)
            q = attn.q(h).view(B, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
            k = attn.k(h).view(B, 1, Hkv, D).transpose(1, 2)  # (B, Hkv, 1, D)
            v = attn.v(h).view(B, 1, Hkv, D).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            keys, values = caches[2 * i], caches[2 * i + 1]  # (B, Hkv, L, D)
            keys.index_copy_(2, slot, k.to(keys.dtype))  # write slot `slot` in place
            values.index_copy_(2, slot, v.to(values.dtype))
            q = q.reshape(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D): grouped query heads share one kv head
            scale = attn.scale if attn.scale is not None else 1 / math.sqrt(D)
            scores = (q @ keys.transpose(-1, -2)).float() * scale  # (B, Hkv, G, L)
            scores = scores.masked_fill(blocked, torch.finfo(torch.float32).min)
            probs = scores.softmax(-1).to(values.dtype)
            y = (probs @ values).reshape(B, 1, H * D)  # (B, Hkv, G, D) -> (B, 1, H*D)
            x = x + attn.o(y.to(x.dtype))
            x = x + block.ffn(block.ffn_norm(x))
        if stack.final_norm is not None:
            x = stack.final_norm(x)
        return model.logits(x)[:, -1]  # (B, V)


def batch_bucket(rows: int) -> int:
    for b in BATCH_BUCKETS:
        if rows <= b:
            return b
    raise ConfigError(f"batch of {rows} rows exceeds the largest AOTInductor bucket ({BATCH_BUCKETS[-1]})")


def capacity_bucket(positions: int) -> int:
    return max(MIN_CAPACITY, 1 << (positions - 1).bit_length())


# --- the cache on disk -------------------------------------------------------------------------------
def cache_root(cache_dir=None) -> Path:
    """``cache_dir``, else ``$LMLAB_CACHE_DIR/aoti``, else ``~/.cache/lmlab/aoti``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("LMLAB_CACHE_DIR")
    return Path(env) / "aoti" if env else Path.home() / ".cache" / "lmlab" / "aoti"


def _cpu_flags() -> str:
    """The CPU's model name and feature flags (the package is built with -march=native)."""
    name, flags = platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == platform.machine():
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{name} | {torch.backends.cpu.get_cpu_capability()} | {flags}"


def model_fingerprint(model) -> str:
    """A cheap, stable digest of a model: config, quantization layout, module types, and per tensor its
    name, dtype, shape, sum and a strided sample of at most 4096 values (one pass of reads, no copies:
    ~0.1 s for SmolLM2-135M in fp32, where hashing every byte would take seconds)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(json.dumps(getattr(model, "quantization", None), sort_keys=True, default=str).encode())
    digest.update(" ".join(sorted({type(m).__name__ for m in model.modules()})).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t = t.detach()
            flat = t.reshape(-1)
            wide = torch.float64 if t.is_floating_point() else torch.int64
            total = flat.sum(dtype=wide).item() if flat.numel() else 0
            sample = flat[:: max(1, flat.numel() // 4096)].contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{total!r}|".encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return digest.hexdigest()


@contextlib.contextmanager
def _entry_lock(path: Path):
    """An exclusive lock on `path` + ".lock" (a second process building the same entry waits, then loads)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename alone keeps entries whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _example_inputs(model, batch: int, capacity: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the step for one bucket: a zero cache where only slot 0 is seen, position 0."""
    cfg = model.config
    caches = [torch.zeros(batch, cfg.n_kv_heads, capacity, cfg.head_dim, dtype=model.dtype)
              for _ in range(2 * len(model.decoder.layers))]
    tokens = torch.arange(batch, dtype=torch.long) % cfg.vocab_size
    valid = torch.ones(batch, capacity, dtype=torch.bool)
    return (tokens, torch.zeros(batch, dtype=torch.long), torch.zeros(1, dtype=torch.long), valid, *caches)


@contextlib.contextmanager
def _class_forwards(model):
    """Trace the modules' own class ``forward``: an instance-level override (``lmlab.nn.packed`` patches
    Linears during a batched generation) is set aside while exporting and put back afterwards."""
    patched = [(m, m.__dict__.pop("forward")) for m in model.modules() if "forward" in m.__dict__]
    try:
        yield
    finally:
        for m, forward in patched:
            m.forward = forward


def _compile(model, batch: int, capacity: int, target: Path, configs: dict) -> None:
    """Export the step for one bucket, compile and package it to a temporary file, rename it to `target`."""
    step = StaticStep(model).eval()
    handle, tmp = tempfile.mkstemp(prefix=f".tmp-{target.stem}.", suffix=".pt2", dir=target.parent)
    os.close(handle)
    try:
        with torch.inference_mode(False), torch.no_grad(), _class_forwards(model):
            program = torch.export.export(step, _example_inputs(model, batch, capacity))
            torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs=dict(configs))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, target)  # atomic: readers see no entry or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _probe_ok(model, compiled, batch: int, capacity: int) -> tuple[bool, str]:
    """One step of the package against the eager model on the same token at position 0 (row 0; the rows
    share every weight, and one eager row keeps a hit cheap): a package that loads but computes something
    else (a corrupt or mismatched entry) fails here."""
    inputs = _example_inputs(model, batch, capacity)
    with torch.inference_mode():
        want = model(inputs[0][:1, None])[:, -1].float()  # (1, V): one token, no cache
        got = compiled(*inputs)[:1].float()
    if got.shape != want.shape or not torch.isfinite(got).all():
        return False, f"probe gave shape {tuple(got.shape)} (finite: {bool(torch.isfinite(got).all())})"
    err = ((got - want).norm() / want.norm().clamp(min=1e-6)).item()
    limit = PROBE_TOLERANCE.get(model.dtype, 0.05)
    return err < limit, f"probe relative error {err:.2e} (limit {limit})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


class _Failed(Exception):
    """A compile or load that did not work: the caller falls back to eager with a one-line note."""


# --- the engine --------------------------------------------------------------------------------------
class AOTIEngine:
    """Compiled decode steps for one model: ``start(input_ids, attention_mask, max_new_tokens)`` -> a run
    with ``prefill()``, ``step(tokens)`` and ``reorder(index)`` (the protocol of ``DecoderOnlyRun``).

    Packages are looked up in, or built into, ``cache_dir`` (see ``cache_root``) on first use of a bucket
    and kept loaded for the engine's lifetime. ``last_note`` holds the last one-line note (what was
    compiled or loaded, and in how long, or why the eager path runs)."""

    def __init__(self, model, cache_dir=None):
        self.model = model
        self.cache_dir = cache_root(cache_dir)
        self.ok, self.reason = available(model)
        self._loaded: dict[tuple[int, int], object] = {}
        self._fingerprint: str | None = None
        self.autotune = os.environ.get("LMLAB_AOTI_AUTOTUNE", "0") == "1"
        self.configs = {**INDUCTOR_CONFIGS, **(AUTOTUNE_CONFIGS if self.autotune else {})}
        self.last_note = self.reason
        self.timings: list[dict] = []  # {"bucket", "capacity", "action": compiled|loaded, "seconds"}

    def key(self, batch: int, capacity: int) -> str:
        """The cache key of one bucket (a file name)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        parts = json.dumps([ENGINE_VERSION, self._fingerprint, batch, capacity, str(self.model.dtype),
                            torch.__version__, _cpu_flags(), torch.get_num_threads(), sorted(self.configs.items())])
        return f"b{batch}-L{capacity}-{hashlib.sha256(parts.encode()).hexdigest()[:24]}"

    def path(self, batch: int, capacity: int) -> Path:
        return self.cache_dir / f"{self.key(batch, capacity)}.pt2"

    def cached(self, batch: int, capacity: int) -> bool:
        """Whether a bucket is loaded here or has an entry on disk (no compile needed)."""
        return (batch, capacity) in self._loaded or self.path(batch, capacity).exists()

    def step_fn(self, batch: int, capacity: int):
        """The loaded package of one bucket: from memory, else from disk, else compiled now (raises _Failed)."""
        if (batch, capacity) in self._loaded:
            return self._loaded[(batch, capacity)]
        start = time.perf_counter()  # a hit's cost: the model digest, the load and the probe step
        target = self.path(batch, capacity)
        try:
            with _entry_lock(target):
                compiled, action = self._load_or_build(target, batch, capacity)
        except OSError as exc:  # compile and load errors are _Failed already: this is the directory or lock
            raise _Failed(f"cannot use the cache directory {self.cache_dir}: {exc}") from exc
        seconds = time.perf_counter() - start
        self.timings.append({"bucket": batch, "capacity": capacity, "action": action, "seconds": seconds})
        self.last_note = f"AOTInductor step b{batch} L{capacity}: {action} in {seconds:.2f} s ({target.name})"
        self._loaded[(batch, capacity)] = compiled
        return compiled

    def _load_or_build(self, target: Path, batch: int, capacity: int):
        """Under the entry's lock: -> (package, "loaded" | "compiled"); raises _Failed."""
        if target.exists():
            compiled, why = self._load(target, batch, capacity)
            if compiled is not None:
                return compiled, "loaded"
            warnings.warn(f"AOTInductor cache entry {target.name} is unusable ({why}); rebuilding it", stacklevel=4)
            target.unlink(missing_ok=True)
        try:
            _compile(self.model, batch, capacity, target, self.configs)
        except Exception as exc:  # noqa: BLE001 -- any compiler failure means: run eager
            raise _Failed(f"compiling failed: {_first_line(exc)}") from exc
        compiled, why = self._load(target, batch, capacity)
        if compiled is None:
            target.unlink(missing_ok=True)
            raise _Failed(f"the freshly compiled package is unusable ({why})")
        return compiled, "compiled"

    def _load(self, target: Path, batch: int, capacity: int):
        """-> (package, "") or (None, why)."""
        try:
            compiled = torch._inductor.aoti_load_package(str(target))
            ok, why = _probe_ok(self.model, compiled, batch, capacity)
        except Exception as exc:  # noqa: BLE001 -- a corrupt file raises anything from zip to C++ errors
            return None, _first_line(exc)
        return (compiled, "") if ok else (None, why)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int):
        """A run over this generation's prompt: compiled where possible, else the eager ``DecoderOnlyRun``
        (with a one-line warning saying why)."""
        from lmlab.generation.driver import DecoderOnlyRun

        B = input_ids.shape[0]
        if not self.ok:
            self.last_note = f"AOTInductor engine unavailable, running eager: {self.reason}"
        elif B > BATCH_BUCKETS[-1]:
            self.last_note = f"batch of {B} rows exceeds the largest AOTInductor bucket ({BATCH_BUCKETS[-1]}); running eager"
        else:
            try:
                return AOTIRun(self, input_ids, attention_mask, max_new_tokens)
            except _Failed as exc:
                self.last_note = f"AOTInductor engine unavailable, running eager: {exc}"
        warnings.warn(self.last_note, stacklevel=2)
        return DecoderOnlyRun(self.model, input_ids, attention_mask, max_new_tokens)


class AOTIRun:
    """One generation over a compiled step: eager prefill into a static cache, then one package call per token.

    Rows: the first A of the bucket's B rows are real; the rest are padding whose outputs are dropped.
    """

    def __init__(self, engine: AOTIEngine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int):
        model, cfg = engine.model, engine.model.config
        self.engine, self.model, self.input_ids = engine, model, input_ids
        A, T = input_ids.shape
        self.rows, self.capacity = A, capacity_bucket(T + max_new_tokens)
        self.bucket = batch_bucket(A)
        self.fn = engine.step_fn(self.bucket, self.capacity)
        self.padded = attention_mask is not None and not bool(attention_mask.all())
        self.attention_mask = attention_mask
        B, L = self.bucket, self.capacity
        self.caches = [torch.zeros(B, cfg.n_kv_heads, L, cfg.head_dim, dtype=model.dtype)
                       for _ in range(2 * len(model.decoder.layers))]  # k0, v0, k1, v1, ... (B, Hkv, L, D)
        self.valid = torch.ones(B, L, dtype=torch.bool)  # (B, L) False: a left-padded row's pad slots
        if self.padded:
            self.valid[:A, :T] = attention_mask.bool()
            last = attention_mask.long().sum(-1)  # (A,) each row's next rotary position
        else:
            last = torch.full((A,), T, dtype=torch.long)
        self.positions = torch.full((B,), T, dtype=torch.long)
        self.positions[:A] = last
        self.slot = T  # the cache slot the next token is written to
        self.tokens = torch.zeros(B, dtype=torch.long)

    def prefill(self) -> torch.Tensor:
        """The eager model over the prompt, its KV cache copied into the static one -> logits (A, V)."""
        model, (A, T) = self.model, self.input_ids.shape
        cache = model.new_cache(A, T)
        if self.padded:
            positions = (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (A, T) pads get 0
            logits = model(self.input_ids, attention_mask=self.attention_mask, position_ids=positions, cache=cache,
                           logits_to_keep=1, mask_has_padding=True)
        else:
            logits = model(self.input_ids, cache=cache, logits_to_keep=1)
        for i, layer in enumerate(cache.layers):
            self.caches[2 * i][:A, :, :T] = layer.k
            self.caches[2 * i + 1][:A, :, :T] = layer.v
        return logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (A,) -> next-token logits (A, V)."""
        A = tokens.shape[0]
        if self.slot >= self.capacity:
            from lmlab.errors import DataError

            raise DataError(f"KV cache overflow: need {self.slot + 1} positions, capacity is {self.capacity}")
        self.tokens[:A] = tokens
        logits = self.fn(self.tokens, self.positions, torch.tensor([self.slot]), self.valid, *self.caches)
        self.positions += 1
        self.slot += 1
        return logits[:A]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (A',) in that order. The batch moves to a smaller bucket only when that bucket
        needs no compile (loaded, or on disk); otherwise it stays and carries more padding rows."""
        A = index.shape[0]
        bucket = batch_bucket(A)
        if bucket != self.bucket and not self.engine.cached(bucket, self.capacity):
            bucket = self.bucket
        if bucket != self.bucket:
            try:
                self.fn = self.engine.step_fn(bucket, self.capacity)
            except _Failed:
                bucket = self.bucket
        self.bucket = bucket
        rows = torch.cat([index, index[:1].expand(bucket - A)]) if bucket > A else index  # pad with copies
        self.caches = [c.index_select(0, rows) for c in self.caches]
        self.valid, self.positions = self.valid.index_select(0, rows), self.positions.index_select(0, rows)
        self.tokens = torch.zeros(bucket, dtype=torch.long)
