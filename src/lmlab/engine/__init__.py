"""Decode engines: what runs a decoder-only model's per-token step during generation.

The generation driver (``lmlab.generation.driver.start_run``) asks ``select(model)`` for an engine and,
when it gets one, lets it drive the whole generation; nothing else in lmlab knows engines exist. An
engine follows one protocol::

    engine.start(input_ids (B, T), attention_mask (B, T) | None, max_new_tokens) -> run
    run.prefill() -> (B, V) logits;  run.step(tokens (B,)) -> (B, V);  run.reorder(index (B',))

(the protocol of ``DecoderOnlyRun``), so greedy, sampling, beams, stop strings, streaming and batching
all run on it unchanged. ``lmlab serve``'s continuous batching asks ``decode_step_for(model)`` for its
slot-cache decode step instead (``lmlab.engine.serving``).

Engines, by name (``--engine`` on every command that generates, or ``$LMLAB_ENGINE``):

* ``eager``     the PyTorch modules themselves (``DecoderOnlyRun``); always available.
* ``native``    lmlab's C++ decode step (``lmlab.engine.native``: integer kernels, the layer loop in C++),
                built by ``scripts/setup.sh``; LLaMA-family decoder-only models.
* ``aoti``      an AOTInductor-compiled step (``lmlab.engine.aoti``), where that module is present.
* ``compiled``  the best compiled engine here: native, else aoti.
* ``auto``      (the default) native where it is built and supports the model, else eager.

An engine that was asked for but cannot run (no compiler, missing ISA, a failed build, an unsupported
model) prints one line saying why, and the eager path runs.
"""

from __future__ import annotations

import importlib
import os
import sys
import weakref

from lmlab.errors import choices_error

CHOICES = ("auto", "compiled", "native", "aoti", "eager")
ENV = "LMLAB_ENGINE"
# name -> module that provides ``available(model) -> (bool, reason)`` and ``engine_for(model) -> engine``;
# imported only when asked for (the C++ build and torch._inductor are expensive to import)
ENGINES = {"native": "lmlab.engine.native", "aoti": "lmlab.engine.aoti"}
COMPILED_ORDER = ("native", "aoti")  # what "compiled" means: the first one that runs here

_notes_printed: set[str] = set()
_engines: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {name: engine}


def check_name(name: str) -> str:
    if name not in CHOICES:
        raise choices_error("engine", name, CHOICES)
    return name


def default_name() -> str:
    """``$LMLAB_ENGINE`` (validated), else "auto"."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return "auto"
    if text not in CHOICES:
        raise choices_error(ENV, text, CHOICES)
    return text


def set_default(name: str | None) -> None:
    """Make `name` the engine of this process and of the processes it starts (``--engine`` sets it)."""
    if name is not None:
        os.environ[ENV] = check_name(name)


def note(text: str) -> None:
    """Print a one-line note to stderr once per process."""
    if text not in _notes_printed:
        _notes_printed.add(text)
        print(f"note: {text}", file=sys.stderr)


def _module(name: str):
    try:
        return importlib.import_module(ENGINES[name])
    except ImportError as exc:  # aoti.py is another branch's module: absent until merged, or torch without inductor
        return exc


def availability(model, name: str) -> tuple[bool, str]:
    """Whether engine `name` can run `model` here, and why (not)."""
    module = _module(name)
    if isinstance(module, Exception):
        return False, f"engine {name!r} is not available ({module})"
    return module.available(model)


def _build(model, name: str):
    per_model = _engines.setdefault(model, {})
    if name not in per_model:
        module = _module(name)
        per_model[name] = module.engine_for(model) if hasattr(module, "engine_for") else module.AOTIEngine(model)
    return per_model[name]


def resolve(model, name: str | None = None) -> tuple[str, str]:
    """-> (the engine that runs, one line saying why) for `name` (default: ``default_name()``)."""
    name = check_name(name) if name is not None else default_name()
    if name == "eager":
        return "eager", "eager: asked for (--engine eager)"
    candidates = ("native",) if name == "auto" else COMPILED_ORDER if name == "compiled" else (name,)
    reasons = []
    for candidate in candidates:
        ok, reason = availability(model, candidate)
        if ok:
            return candidate, f"{candidate}: {reason}"
        reasons.append(reason)
    return "eager", "eager: " + "; ".join(reasons)


def select(model, name: str | None = None):
    """The engine object for `model` (None: run eager), printing a one-line note when a requested one cannot run."""
    requested = check_name(name) if name is not None else default_name()
    chosen, why = resolve(model, requested)
    if chosen == "eager":
        if requested not in ("auto", "eager"):
            note(f"engine {requested!r} unavailable, running eager ({why.removeprefix('eager: ')})")
        return None
    try:
        return _build(model, chosen)
    except Exception as exc:  # a failed build or an unsupported layer found late: never fail the generation
        note(f"engine {chosen!r} failed ({type(exc).__name__}: {exc}); running eager")
        _engines.setdefault(model, {})[chosen] = None
        return None


def decode_step_for(model, name: str | None = None):
    """The serving decode step (``lmlab.serve.runner.DecodeStep``) of engine `name` for `model`, or None: the
    eager step runs (see ``lmlab.engine.serving``)."""
    from lmlab.engine.serving import decode_step_for as step_for

    return step_for(model, name)


def describe(model=None, name: str | None = None, config=None) -> str:
    """One line for ``lmlab info``: which engine generation uses for `model` (or a model of `config`)."""
    name = check_name(name) if name is not None else default_name()
    if model is not None:
        return resolve(model, name)[1]
    if name == "eager":
        return "eager (asked for)"
    if name == "aoti":
        return "aoti where it supports the model (decided when the model is loaded)"
    module = _module("native")
    if isinstance(module, Exception):
        return f"eager (native engine not importable: {module})"
    return module.describe_build(config)


__all__ = ["CHOICES", "select", "decode_step_for", "resolve", "describe", "set_default", "default_name", "check_name", "note"]
