"""The native decode engine: one C++ call per decode step for a LLaMA-family decoder (``engine/csrc``).

What the C++ step does for B new tokens (one per row), all layers in one call, no Python or torch
dispatcher between ops: RMSNorm -> q/k/v projections -> RoPE on q and k, k and v written into the KV
cache -> attention of the new token over the cache (grouped-query heads share one pass over their
key/value head) -> output projection + residual -> RMSNorm -> gate/up -> SiLU·up -> down + residual,
then the final norm and the head. Weight products by kind:

* int8 / int4 layers (``lmlab.quant``): the activations are quantized to int8 per block of 32 and the
  dot products run on integers (AVX2 ``vpmaddubsw``, AVX-512 VNNI ``vpdpbusd``), llama.cpp's Q4_1 x
  Q8_1 scheme. Weights are repacked once from the layers' tensors into the kernels' layout
  (``csrc/ops.h``), with the scales and zeros the eager kernels use (bf16-rounded), so the weights are
  the same numbers; the activations' int8 rounding (eager: bf16) is the difference.
* fp32 / bf16 ``nn.Linear``: read in place (no copy), fp32 accumulation.
* a LoRA adapter (``LoRALinear``): ``+ scaling * B (A x)`` in fp32, switched off with the model's
  adapters (``lmlab.adapt.lora_disabled``).

Prefill stays on the eager model (torch's batched GEMMs are already efficient for T > 1 tokens) and
hands its KV cache over as is: the native step writes into the same ``Cache`` tensors, so ``reorder``
(beams, finished rows leaving) is the eager one.

The repacked weights are rebuilt when the model's tensors change (a fingerprint of every parameter and
buffer: identity, storage and in-place version counter), e.g. between the evaluations of a training run.

Shapes: B batch rows, T prompt length, C d_model, V vocabulary, N out features, K in features.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.engine import build
from lmlab.errors import DataError
from lmlab.generation.driver import DecoderOnlyRun
from lmlab.nn.subset_head import SubsetHead

KIND = {"f32": 0, "bf16": 1, "q8": 2, "q4": 3}


# --- what the engine supports ---------------------------------------------------------------------
def config_reason(cfg) -> str | None:
    """None if the native step supports a model of this ``ModelConfig``, else why not (one phrase)."""
    checks = [
        (cfg.arch == "decoder", f"arch={cfg.arch!r} (decoder only)"),
        (cfg.norm == "rmsnorm" and cfg.norm_position == "pre" and cfg.final_norm and not cfg.embed_norm,
         "needs pre-RMSNorm blocks"),
        (cfg.positional == "rope", f"positional={cfg.positional!r} (rope only)"),
        (cfg.gated_ffn and cfg.activation == "silu", "needs a SwiGLU feed-forward"),
        (cfg.head == "lm" and cfg.head_input_scale == 1.0, "needs a plain LM head"),
        (cfg.n_heads % cfg.n_kv_heads == 0 and cfg.head_dim % 2 == 0, "head layout"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    return None


def _config_reason(model) -> str | None:
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(model, "decoder", None) is None:
        return "not an lmlab Transformer"
    why = config_reason(cfg)
    if why:
        return why
    if model.device.type != "cpu":
        return f"model on {model.device} (CPU only)"
    if model.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {model.dtype} (fp32, bf16 or quantized)"
    return None


def _linear_reason(name: str, module: nn.Module) -> str | None:
    from lmlab.adapt.lora import LoRALinear
    from lmlab.quant.linear import Int4Linear, Int8Linear

    if isinstance(module, LoRALinear):
        return _linear_reason(name, module.base_layer)
    if isinstance(module, (Int8Linear, Int4Linear)):
        return None if module.in_features % 32 == 0 else f"{name}: in_features {module.in_features} not a multiple of 32"
    if type(module) is nn.Linear:
        return None if module.weight.dtype in (torch.float32, torch.bfloat16) else f"{name}: {module.weight.dtype}"
    return f"{name} is a {type(module).__name__}"


def _linears(model) -> list[tuple[str, nn.Module]]:
    out = []
    for i, block in enumerate(model.decoder.layers):
        for part, attr in (("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"),
                           ("ffn", "gate"), ("ffn", "up"), ("ffn", "down")):
            out.append((f"decoder.layers.{i}.{part}.{attr}", getattr(getattr(block, part), attr)))
    out.append(("lm_head", _head_projection(model)))
    return out


def _head_projection(model) -> nn.Module:
    """The linear that computes the logits: a trimmed head's projection (K outputs), else lm_head itself."""
    head = model.lm_head
    return head.proj if isinstance(head, SubsetHead) else head


def _expand(model, logits: torch.Tensor) -> torch.Tensor:
    """(B, K) logits of a trimmed head -> (B, V) with -inf outside its ids; any other head's unchanged."""
    head = model.lm_head
    return head.expand(logits) if isinstance(head, SubsetHead) else logits


def model_reason(model) -> str | None:
    """None if the native step can run `model`, else why not (one phrase)."""
    why = _config_reason(model)
    if why:
        return why
    for name, module in _linears(model):
        why = _linear_reason(name, module)
        if why:
            return why
    return None


def available(model) -> tuple[bool, str]:
    why = model_reason(model)
    if why:
        return False, f"native engine does not support this model ({why})"
    try:
        module = build.load(build_if_missing=False)
    except Exception as exc:  # noqa: BLE001
        return False, f"native engine unavailable: {exc}"
    return True, f"lmlab's C++ decode step ({module.isa()} kernels, {torch.get_num_threads()} threads)"


def describe_build(cfg=None) -> str:
    """Which engine generation would use: from the build alone, or for a model of config `cfg` (on CPU)."""
    if cfg is not None:
        why = config_reason(cfg)
        if why:
            return f"eager (the native engine does not support this model: {why})"
    try:
        module = build.load(build_if_missing=False)
    except Exception as exc:  # noqa: BLE001
        return f"eager (native engine unavailable: {exc})"
    where = "native" if cfg is not None else "native where the model is supported"
    return f"{where} ({module.isa()} kernels, {torch.get_num_threads()} threads; {build.library_path()})"


# --- repacking lmlab's layers into the kernels' layouts ---------------------------------------------
def _pad_rows(t: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    pad = -t.shape[0] % multiple
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


def interleave(values: torch.Tensor) -> torch.Tensor:
    """(N, K) per-input values -> (Np/16, K/32, 8, 64): for row group g, block b and j < 8, lane r (4 bytes)
    holds rows 16g + r's inputs 32b + 4j .. 32b + 4j + 3 (csrc/ops.h)."""
    v = _pad_rows(values)
    Np, K = v.shape
    v = v.reshape(Np // 16, 16, K // 32, 8, 4)  # (g, r, b, j, i)
    return v.permute(0, 2, 3, 1, 4).reshape(Np // 16, K // 32, 8, 64).contiguous()  # (g, b, j, r*4+i)


def deinterleave(packed: torch.Tensor, N: int) -> torch.Tensor:
    """The inverse of ``interleave`` -> (N, K)."""
    g, nb = packed.shape[:2]
    v = packed.reshape(g, nb, 8, 16, 4).permute(0, 3, 1, 2, 4)  # (g, r, b, j, i)
    return v.reshape(g * 16, nb * 32)[:N]


def pack_q4(values: torch.Tensor) -> torch.Tensor:
    """(N, K) ints in [0, 15] -> (Np/16, K/32, 4, 64) uint8: vector j low nibbles, vector j + 4 high ones."""
    v = interleave(values.to(torch.uint8))  # (g, b, 8, 64)
    return (v[:, :, :4] | (v[:, :, 4:] << 4)).contiguous()


def unpack_q4(packed: torch.Tensor, N: int) -> torch.Tensor:
    """The inverse of ``pack_q4`` -> (N, K) uint8."""
    return deinterleave(torch.cat([packed & 0x0F, packed >> 4], dim=2), N)


def _per_block(t: torch.Tensor) -> torch.Tensor:
    """(N, K/32) per-row-and-block floats -> (Np/16, K/32, 16), the kernels' order."""
    v = _pad_rows(t.float())
    return v.reshape(v.shape[0] // 16, 16, -1).transpose(1, 2).contiguous()


def linear_tensors(module: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """-> (kind, weight, scale, min) in the kernels' layout for one lmlab linear (see csrc/ops.h)."""
    from lmlab.adapt.lora import LoRALinear
    from lmlab.quant.linear import Int4Linear, Int8Linear, unpack_nibbles

    if isinstance(module, LoRALinear):
        module = module.base_layer
    if isinstance(module, Int8Linear):
        return KIND["q8"], interleave(module.qweight), _pad_rows(module._scale_bf16.float()).contiguous(), None
    if isinstance(module, Int4Linear):
        N, G = module.out_features, module.group_size
        # what the eager kernel multiplies by: (q - 8) * scale + zero with bf16 scale and zero (lmlab.quant.linear)
        scale, zero = module._scales_zeros.float().transpose(0, 1)[:N].unbind(-1)  # (N, K/G) each
        minimum = zero - 8 * scale
        per32 = G // 32
        scale, minimum = (_per_block(t.repeat_interleave(per32, dim=1)) for t in (scale, minimum))
        return KIND["q4"], pack_q4(unpack_nibbles(module.qweight)), scale, minimum
    weight = module.weight.detach()
    kind = KIND["bf16"] if weight.dtype == torch.bfloat16 else KIND["f32"]
    return kind, weight.contiguous(), None, None


def native_linear(ext, module: nn.Module):
    """The extension's Linear for one lmlab linear (with its LoRA adapter, if any)."""
    from lmlab.adapt.lora import LoRALinear

    kind, weight, scale, minimum = linear_tensors(module)
    bias = module.bias.detach().float() if module.bias is not None else None
    lin = ext.Linear(kind, weight, scale, minimum, bias, module.in_features, module.out_features)
    if isinstance(module, LoRALinear):
        lin.set_lora(module.lora_A.weight.detach().float(), module.lora_B.weight.detach().float(), module.scaling)
    return lin


def fingerprint(model: nn.Module) -> tuple:
    """Identity, storage and in-place version of every tensor: changes when any weight is replaced or updated."""
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((id(t), t.data_ptr(), t._version, t.dtype) for t in tensors)


def lora_state(model: nn.Module) -> bool | None:
    """True / False when every adapter is on / off, None when there are none; mixed states are refused."""
    from lmlab.adapt.lora import LoRALinear

    states = {m.enabled for m in model.modules() if isinstance(m, LoRALinear)}
    if len(states) > 1:
        raise DataError("some LoRA adapters are enabled and others not: the native engine switches them together")
    return states.pop() if states else None


class NativeEngine:
    """The C++ step for one model; ``start(...)`` follows the generation driver's protocol (``lmlab.engine``)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.ext = build.load(build_if_missing=False)
        self._native, self._fingerprint = None, None

    def _build(self):
        model, ext, cfg = self.model, self.ext, self.model.config
        stack = model.decoder
        scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        head = _head_projection(model)  # a trimmed head computes K logits; _expand widens them to V
        native = ext.NativeModel(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, head.out_features,
                                 cfg.norm_eps, scale, stack.rotary.inv_freq.float(), stack.final_norm.weight.detach().float(),
                                 native_linear(ext, head))
        for block in stack.layers:
            attn, ffn = block.attn, block.ffn
            native.add_layer(block.attn_norm.weight.detach().float(), block.ffn_norm.weight.detach().float(),
                             [native_linear(ext, m) for m in (attn.q, attn.k, attn.v, attn.o, ffn.gate, ffn.up, ffn.down)])
        return native

    def native_model(self):
        """The C++ model, rebuilt if the weights changed since it was built."""
        fp = fingerprint(self.model)
        if self._native is None or fp != self._fingerprint:
            self._native, self._fingerprint = self._build(), fp
        lora = lora_state(self.model)
        self._native.set_lora_enabled(bool(lora) if lora is not None else True)
        return self._native

    shares_prefill = True  # start(..., expand): each prompt prefilled once for its `expand` rows

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
              expand: int = 1) -> "NativeRun":
        return NativeRun(self, input_ids, attention_mask, max_new_tokens, expand)

    @torch.inference_mode()
    def step_slots(self, tokens: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                   rows: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step over rows of a shared (slot) cache -> logits (B, V) fp32.

        tokens (B,): each row's new token; k_caches / v_caches: one (R, Hkv, L, D) fp32 or bf16 tensor per
        layer (R slots, contiguous); rows (B,): the slot of each token; lengths (B,): positions the slot
        already holds (the new key/value is written at that position, the token attends to [start,
        length]); starts (B,): hidden positions at the slot's start (left padding; default 0). The
        caller advances its lengths by one afterwards. This is the step a serving runner with a slot
        cache calls: rows at different lengths decode together.
        """
        x = self.model.embed(tokens[:, None])[:, 0]  # (B, C); rope models add no position here
        return _expand(self.model, self.native_model().step(x, k_caches, v_caches, 0, starts, lengths, rows))


class NativeRun(DecoderOnlyRun):
    """``DecoderOnlyRun`` whose steps run in C++: the eager prefill fills the cache, the native step continues it."""

    def __init__(self, engine: NativeEngine, input_ids, attention_mask, max_new_tokens: int, expand: int = 1):
        super().__init__(engine.model, input_ids, attention_mask, max_new_tokens, expand)
        self.native = engine.native_model()
        T = input_ids.shape[1]
        # left padding of each row: its first keys are hidden and its positions start after them
        self.pads = (T - attention_mask.long().sum(-1)) if self.padded else None  # (B,)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> next-token logits (B, V) fp32."""
        cache = self.cache
        if cache.length + 1 > cache.capacity:
            raise DataError(f"KV cache overflow: need {cache.length + 1} positions, capacity is {cache.capacity}")
        x = self.model.embed(tokens[:, None], offset=cache.length)[:, 0]  # (B, C)
        logits = self.native.step(x, [layer.k for layer in cache.layers], [layer.v for layer in cache.layers],
                                  cache.length, self.pads)
        cache.length += 1
        return _expand(self.model, logits)

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        if self.pads is not None:
            self.pads = self.pads.index_select(0, index)


def engine_for(model: nn.Module) -> NativeEngine:
    return NativeEngine(model)


__all__ = ["available", "describe_build", "engine_for", "NativeEngine", "NativeRun", "model_reason", "pack_q4",
           "unpack_q4", "interleave", "deinterleave", "linear_tensors", "native_linear", "fingerprint"]
