"""Recording what each part of a Transformer computes, with forward hooks that exist only while recording.

``Recorder(model, layers)`` is a context manager. Inside it, one forward pass of the model leaves behind:

* ``attentions[stack]``   (L_rec, H, T, S) softmax weights of each recorded layer (stack: "encoder", "decoder",
                          "cross"), computed explicitly from the same q, k, mask, RoPE and T5 bias the layer used;
* ``residual[stack]``     (L+1, T, C) the residual stream: the embeddings, then each block's output;
* ``ffn_zero[stack]``     (L,) the share of feed-forward activations with |a| < ``ffn_tol``;
* ``reconstruction``      the largest |o(w v) - attention output| seen (``verify=True``): proof that the
                          recorded weights are the ones that produced the layer's output.

Nothing in the model changes: the hooks are registered on entry and removed on exit, so ordinary runs keep
the fused scaled_dot_product_attention path at zero cost. The model's own attention still runs through SDPA
(its output is the model's output); the hook recomputes softmax(q k^T * scale + mask) for the layers asked for.

Shapes: B batch (always 1 here), T query length, S key length, H heads, Hkv key/value heads, D head dim, C d_model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lmlab.errors import DataError
from lmlab.nn.positional import apply_rotary


def stacks_of(model: nn.Module) -> dict[str, nn.Module]:
    """The model's stacks by role: {"encoder": Stack} and/or {"decoder": Stack}."""
    return {name: stack for name, stack in (("encoder", model.encoder), ("decoder", model.decoder)) if stack is not None}


def check_layers(layers: Sequence[int] | None, n_layers: int, what: str = "layer") -> list[int]:
    """Validate requested layer (or head) indices against a count -> sorted unique list (None: all)."""
    if layers is None:
        return list(range(n_layers))
    out = sorted(set(int(i) for i in layers))
    for i in out:
        if not 0 <= i < n_layers:
            raise DataError(f"{what} {i} is out of range: this model has {n_layers} {what}s (0-{n_layers - 1})")
    return out


@torch.no_grad()
def attention_weights(attn: nn.Module, x: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute an ``lmlab.nn.Attention`` call explicitly -> (weights (B, H, T, S) fp32, values (B, H, S, D)).

    Mirrors Attention.forward: same projections, RoPE, cross-attention context, additive mask (padding,
    causality, T5 bias) or SDPA's is_causal, same scale (None: 1/sqrt(D)); GQA key/value heads are shared by
    H/Hkv consecutive query heads, as SDPA's enable_gqa does.
    """
    if kwargs.get("cache") is not None:
        raise DataError("attention recording runs on a full forward pass, not on a KV-cache step")
    q = attn._heads(attn.q(x), attn.n_heads)  # (B, H, T, D)
    if attn.cross:
        cross_kv = kwargs.get("cross_kv")
        if cross_kv is None:
            context = kwargs["context"]
            cross_kv = (attn._heads(attn.k(context), attn.n_kv_heads), attn._heads(attn.v(context), attn.n_kv_heads))
        k, v = cross_kv  # (B, Hkv, S, D)
    else:
        k, v = attn._heads(attn.k(x), attn.n_kv_heads), attn._heads(attn.v(x), attn.n_kv_heads)
        rope = kwargs.get("rope")
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    group = attn.n_heads // attn.n_kv_heads
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, D)
    scale = attn.scale if attn.scale is not None else 1.0 / math.sqrt(attn.head_dim)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, T, S)
    mask = kwargs.get("mask")
    if mask is not None:
        scores = scores + mask.float()
    elif kwargs.get("is_causal"):
        T, S = scores.shape[-2:]
        blocked = torch.ones(T, S, dtype=torch.bool, device=scores.device).triu(S - T + 1)
        scores = scores.masked_fill(blocked, float("-inf"))
    return scores.softmax(-1), v


class Recorder:
    """Hooks that record attention, the residual stream and feed-forward sparsity for one forward pass.

    ``layers``: indices of the layers whose attention weights are recorded (None: all), per stack; the
    residual stream and FFN statistics are cheap and always recorded for every layer.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None, verify: bool = False,
                 ffn_tol: float = 1e-2):
        self.model, self.verify, self.ffn_tol = model, verify, ffn_tol
        self.stacks = stacks_of(model)
        self.layers = {name: check_layers(layers, len(stack.layers)) for name, stack in self.stacks.items()}
        self.attentions: dict[str, list[torch.Tensor]] = {}
        self.residual: dict[str, list[torch.Tensor]] = {}
        self.ffn_zero: dict[str, list[float]] = {}
        self.reconstruction = 0.0
        self._handles: list = []

    # --- hooks -------------------------------------------------------------------------------
    def _attention_hook(self, key: str):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            w, v = attention_weights(module, x, kwargs)
            self.attentions.setdefault(key, []).append(w[0].cpu())  # (H, T, S)
            if self.verify:
                B, H, T, _ = w.shape
                y = (w @ v.float()).transpose(1, 2).reshape(B, T, H * module.head_dim)  # (B, T, H*D)
                rebuilt = module.o(y.to(x.dtype)).float()
                self.reconstruction = max(self.reconstruction, float((rebuilt - output[0].float()).abs().max()))
        return hook

    def _block_hook(self, key: str):
        def hook(module, args, output):
            self.residual.setdefault(key, []).append(output[0][0].detach().float().cpu())  # (T, C)
        return hook

    def _stack_pre_hook(self, key: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            self.residual[key] = [x[0].detach().float().cpu()]  # the embeddings: (T, C)
        return hook

    def _ffn_hook(self, key: str):
        def hook(module, args):
            a = args[0].detach()  # (B, T, d_ff) the activation entering the down projection
            self.ffn_zero.setdefault(key, []).append(float((a.abs() < self.ffn_tol).float().mean()))
        return hook

    def __enter__(self) -> "Recorder":
        add = self._handles.append
        for name, stack in self.stacks.items():
            add(stack.register_forward_pre_hook(self._stack_pre_hook(name), with_kwargs=True))
            for i, block in enumerate(stack.layers):
                add(block.register_forward_hook(self._block_hook(name)))
                add(block.ffn.down.register_forward_pre_hook(self._ffn_hook(name)))
                if i in self.layers[name]:
                    add(block.attn.register_forward_hook(self._attention_hook(name), with_kwargs=True))
                    if block.cross_attn is not None:
                        add(block.cross_attn.register_forward_hook(self._attention_hook("cross"), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stacked(self) -> dict[str, torch.Tensor]:
        """Recorded attentions as one tensor per stack: (L_rec, H, T, S)."""
        return {key: torch.stack(ws) for key, ws in self.attentions.items()}
