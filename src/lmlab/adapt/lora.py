"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al., 2021).

    y = W x + b + (alpha / r) * B (A dropout(x))        A: (r, in), B: (out, r), B starts at zero

so a fresh adapter leaves the model unchanged. rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r)
instead, which keeps the update's size stable as the rank grows. Only A and B train: the base weight
is the original ``nn.Linear`` held inside, frozen and never copied — or a quantized linear
(``lmlab.quant``): the base runs on its integer kernel, A and B stay fp32, and merging is refused.

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
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALinear(nn.Module):
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))`` with `base` frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.scaling = r, alpha / (math.sqrt(r) if rslora else r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if _is_quantized(base):  # integer base weights (lmlab.quant): the adapter stays fp32
            factory = {"device": base.qweight.device, "dtype": torch.float32}
        else:
            factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)  # weight (r, I)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)  # weight (O, r)
        # PEFT's initialisation: A Kaiming-uniform, B zero, so the adapted model starts as the base model
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.enabled = True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (so code that reads ``linear.weight``, e.g. weight tying or packing, still works)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, I) -> (N, O)
        y = self.base(x)
        if not self.enabled:
            return y
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))  # (N, O)
        return y + (self.scaling * update).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense matrix: scaling * B @ A, shape (O, I)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the update folded into the weight (a quantized base is refused)."""
        if _is_quantized(self.base):
            raise ConfigError(f"cannot merge a LoRA adapter into a quantized {type(self.base).__name__}: the update "
                              f"would be rounded to its {self.base.bits}-bit grid; merge into the float model, then quantize")
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta_weight().to(self.base.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
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


def _is_quantized(module: nn.Module) -> bool:
    from lmlab.quant.linear import QuantizedLinear

    return isinstance(module, QuantizedLinear)


def linear_names(model: nn.Module) -> dict[str, list[str]]:
    """Short name (last path component) -> full names of every nn.Linear (LoRALinear, quantized linear) in `model`."""
    names: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if ((isinstance(module, (nn.Linear, LoRALinear)) or _is_quantized(module)) and ".lora_" not in name
                and not name.endswith(".base")):
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
        if type(module) is not nn.Linear and not _is_quantized(module):
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
