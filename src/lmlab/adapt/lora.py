"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al., 2021).

    y = W x + b + (alpha / r) * B (A dropout(x))        A: (r, in), B: (out, r), B starts at zero

so a fresh adapter leaves the model unchanged. rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r)
instead, which keeps the update's size stable as the rank grows (:func:`lora_scaling`, the one place
the scale is computed). Only A and B train: the base is the original ``nn.Linear`` held inside as
``base_layer`` (PEFT's name), frozen and never copied — or a quantized linear (``lmlab.quant``): the
base runs on its integer kernel, A and B stay fp32, ``weight`` reads the dequantized matrix, and
merging is refused.

``apply_lora(model, targets, ...)`` swaps (through ``lmlab.nn.swap``, the walker quantization uses too)
every linear whose short name is in `targets` (``q,k,v,o`` attention, ``gate,up,down`` feed-forward, ``lm_head``)
for a ``LoRALinear``; the model code never knows which kind of linear it holds. It returns what it
replaced. ``merge_lora`` folds the updates into plain linears again; ``lora_disabled`` switches every
adapter off for a block (a frozen reference model without a second copy of the weights).

Shapes: N any leading dims, I in_features, O out_features, r rank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.nn.swap import parent_of as _parent
from lmlab.nn.swap import swap_modules
from lmlab.quant.linear import QuantizedLinear

BASE_LAYER = "base_layer"  # the attribute (and module-path component) that holds a LoRALinear's frozen base


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """The factor on ``B @ A``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if rslora else r)


def adapted_name(name: str) -> str:
    """The layer a module path belongs to: ``"...q.base_layer"`` (a LoRA layer's frozen base) -> ``"...q"``."""
    return name.removesuffix(f".{BASE_LAYER}")


@dataclass
class LoraConfig:
    """The hyper-parameters of a LoRA adapter (PEFT's names in parentheses)."""

    r: int = 16  # rank (r)
    alpha: float = 32.0  # scale numerator (lora_alpha)
    dropout: float = 0.05  # on the adapter's input (lora_dropout)
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")  # lmlab short names (target_modules)
    rslora: bool = False  # alpha / sqrt(r) instead of alpha / r (use_rslora)

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora r={self.r!r} must be a positive integer")
        if self.alpha <= 0:
            raise ConfigError(f"lora alpha={self.alpha!r} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout={self.dropout!r} must be in [0, 1)")
        if not self.targets:
            raise ConfigError("lora targets is empty; name the linear layers to adapt, e.g. q,k,v,o,gate,up,down")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.rslora)


class LoRALinear(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` with ``base_layer`` frozen."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer  # an nn.Linear or a QuantizedLinear
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.r, self.scaling = r, lora_scaling(r, alpha, rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if isinstance(base_layer, QuantizedLinear):  # integer base weights: the adapter stays fp32
            factory = {"device": base_layer.qweight.device, "dtype": torch.float32}
        else:
            factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)  # weight (r, I)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)  # weight (O, r)
        # PEFT's initialisation: A Kaiming-uniform, B zero, so the adapted model starts as the base model
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.enabled = True

    def get_base_layer(self) -> nn.Module:
        """The frozen layer the adapter wraps (PEFT's accessor)."""
        return self.base_layer

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, (O, I), so code that reads ``linear.weight`` (weight tying, packing) still works.

        An ``nn.Linear`` base gives its parameter itself. A quantized base has no float weight: it gives the
        dequantized matrix, fp32, computed on each read (a copy: writing to it changes nothing). The update
        is never included (that is :meth:`merged`).
        """
        if isinstance(self.base_layer, QuantizedLinear):
            return self.base_layer.dequantize()
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, I) -> (N, O)
        y = self.base_layer(x)
        if not self.enabled:
            return y
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))  # (N, O)
        return y + (self.scaling * update).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense matrix: scaling * B @ A, shape (O, I)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the update folded into the weight (a quantized base is refused)."""
        base = self.base_layer
        if isinstance(base, QuantizedLinear):
            raise ConfigError(f"cannot merge a LoRA adapter into a quantized {type(base).__name__}: the update "
                              f"would be rounded to its {base.bits}-bit grid; merge into the float model, then quantize")
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(base.weight + self.delta_weight().to(base.weight.dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


@dataclass
class LoraReport:
    """What ``apply_lora`` did: the modules it replaced and the parameter counts."""

    replaced: list[str] = field(default_factory=list)
    trainable: int = 0
    total: int = 0

    def __str__(self) -> str:
        return (f"LoRA on {len(self.replaced)} linear layers: {self.trainable:,} trainable of {self.total:,} "
                f"parameters ({100 * self.trainable / max(self.total, 1):.2f}%)")


def linear_names(model: nn.Module) -> dict[str, list[str]]:
    """Short name (last path component) -> full names of every nn.Linear (LoRALinear, quantized linear) in `model`."""
    names: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if (isinstance(module, (nn.Linear, LoRALinear, QuantizedLinear)) and ".lora_" not in name
                and adapted_name(name) == name):
            names.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return names


def apply_lora(model: nn.Module, config: LoraConfig, freeze_base: bool = True) -> LoraReport:
    """Swap the target linears for LoRALinear (in place); freeze everything else -> what was replaced.

    Targets are short names (``q``, ``down``, ``lm_head``) or full module names; a target that matches
    nothing is an error that lists the available names.
    """
    available = linear_names(model)
    full = {n for names in available.values() for n in names}
    chosen: list[str] = []
    for target in config.targets:
        if target in available:
            chosen += available[target]
        elif target in full:
            chosen.append(target)
        else:
            raise ConfigError(f"LoRA target {target!r} matches no linear layer; available: "
                              f"{', '.join(sorted(available))}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    report = LoraReport()
    chosen = list(dict.fromkeys(chosen))  # keep order, drop repeats
    for name in chosen:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ConfigError(f"{name!r} already holds a LoRA adapter; merge it first (lmlab merge)")
        if type(module) is not nn.Linear and not isinstance(module, QuantizedLinear):
            raise ConfigError(f"LoRA target {name!r} is a {type(module).__name__}, not a plain nn.Linear "
                              f"or a quantized linear (lmlab.quant)")
    report.replaced = swap_modules(model, lambda _, module: LoRALinear(module, config.r, config.alpha, config.dropout,
                                                                      config.rslora), chosen)
    unique = {id(p): p for p in model.parameters()}.values()
    report.trainable = sum(p.numel() for p in unique if p.requires_grad)
    report.total = sum(p.numel() for p in unique)
    return report


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module}.lora_A.weight`` / ``.lora_B.weight`` for every adapter, in lmlab's module names."""
    state = {}
    for name, module in lora_modules(model):
        state[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return state


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and put plain nn.Linear back (in place) -> merged names."""
    merged = []
    for name, module in list(lora_modules(model)):
        parent, child = _parent(model, name)
        setattr(parent, child, module.merged())
        merged.append(name)
    return merged


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every adapter switched off inside the block (no copy of any weight)."""
    modules = [m for _, m in lora_modules(model)]
    states = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, s in zip(modules, states):
            m.enabled = s


def set_lora_trainable(model: nn.Module) -> None:
    """Make exactly the adapters' A and B matrices trainable (after loading an adapter to continue training)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in lora_modules(model):
        module.lora_A.weight.requires_grad_(True)
        module.lora_B.weight.requires_grad_(True)
