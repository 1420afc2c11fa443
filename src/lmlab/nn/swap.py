"""Swapping layer variants in place: the one walker LoRA, quantization and packing use (STYLE habit 11).

``swap_modules(model, make)`` walks the model's named modules once, asks ``make(name, module)`` for a
replacement and puts it at the same place; the model code never learns which kind of linear it holds.
It returns the names it replaced, in module order, so the caller can report what changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module holding `name`, the attribute name within it)."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = parent_of(model, name)
    setattr(parent, child, new)


def swap_modules(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None],
                 names: Iterable[str] | None = None) -> list[str]:
    """Replace every module for which ``make(name, module)`` returns a module -> the replaced names.

    `names` limits the walk to those full names (in that order); otherwise every named module is offered,
    children of a replaced module included only if they were listed before it was swapped.
    """
    candidates = list(names) if names is not None else [n for n, _ in model.named_modules() if n]
    replaced = []
    for name in candidates:
        new = make(name, model.get_submodule(name))
        if new is not None:
            replace_module(model, name, new)
            replaced.append(name)
    return replaced
