"""Decode engines in serving: the slot-cache decode step of ``lmlab serve`` run by a compiled engine.

``lmlab.serve.runner.ModelRunner`` executes one decode step through a pluggable ``DecodeStep``
(``(tokens (A,), slot_cache) -> logits (A, V)``); ``decode_step_for(model, name)`` is what it asks the
registry for. ``NativeDecodeStep`` runs the step with the native engine's ``step_slots`` directly over
the ``SlotCache``'s own (N, Hkv, L, D) tensors, with the eager step's semantics: the active rows
0..A-1, row i's new key/value written at position ``lengths[i]`` (its rotary position too, as the slot
cache hands out no left padding), attention over keys 0..lengths[i] only (a shorter row never sees a
longer row's stale entries), and every row counting one more entry afterwards. ``SlotCache.decode()``
does the bookkeeping (capacity, positions, lengths) for both steps, so they cannot drift apart.

Shapes: A active rows, V vocabulary.
"""

from __future__ import annotations

import torch

import os

from lmlab.engine import ENV, check_name, default_name, note, select


class NativeDecodeStep:
    """The serving decode step on lmlab's C++ engine (``lmlab.engine.native.NativeEngine.step_slots``)."""

    name = "native"

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """tokens (A,) for the active rows of `cache` (a ``SlotCache``) -> next-token logits (A, V) fp32."""
        view, positions, _ = cache.decode()  # capacity ensured; positions (A, 1); lengths now one more each
        return self.engine.step_slots(tokens, [layer.k for layer in cache.layers], [layer.v for layer in cache.layers],
                                      view.rows, positions[:, 0])


def serving_default() -> str:
    """The engine a server runs when none is named: ``$LMLAB_ENGINE`` where it is set (``lmlab serve`` sets it
    from ``--engine``, default auto), else "eager": a ``Scheduler`` or ``create_app`` used as a library keeps
    the plain PyTorch forward (the one its hooks and tests see) unless asked."""
    return default_name() if os.environ.get(ENV, "").strip() else "eager"


def decode_step_for(model, name: str | None = None):
    """The serving decode step of engine `name` for `model` (None: ``serving_default()``), or None when the
    eager step runs (asked for, or the engine cannot run here: then one line says why, as for generation)."""
    name = check_name(name) if name is not None else serving_default()
    if name == "eager":
        return None
    engine = select(model, name)
    if engine is None:
        return None
    if not hasattr(engine, "step_slots"):  # e.g. aoti: a fixed-shape step without per-row positions
        note(f"engine {name!r} has no slot-cache step; serving runs eager")
        return None
    return NativeDecodeStep(engine)


__all__ = ["NativeDecodeStep", "decode_step_for", "serving_default"]
