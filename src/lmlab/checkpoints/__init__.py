"""Loading and saving models: registry names, GGUF files, Hugging Face directories and hub ids, lmlab checkpoints.

Public API (names are stable), each defined in the module named:

* ``load_model(source, dtype=None, adapter=None, quantize=None)``  -> Transformer in eval mode  (``load``)
* ``load_tokenizer(source)``           -> lmlab.Tokenizer for the same sources                   (``load``)
* ``resolve(source)``                  -> where a source points and what kind it is (``Resolved``) (``load``)
* ``load_config(source)``              -> (ModelConfig, Resolved) from config.json / GGUF metadata (``load``)
* ``from_hf_model(hf_model)``          -> Transformer converted from an in-memory transformers model (``load``)
* ``save_model(model, directory, tokenizer=None)``  lmlab's own format, written atomically       (``save``)
* ``export_hf(model, directory, tokenizer=None)``   config.json + model.safetensors for transformers (``save``)
* ``atomic_dir``, ``check_output``, ``save_tokenizer``, ``MARKER_FILE``: the output rules every writer
  follows (docs/checkpoints.md)                                                                   (``save``)
* ``export_source(source, directory)`` load + export_hf (``lmlab export``)                        (``export``)
* ``describe(source)`` / ``format_description(info)``  architecture, size and memory figures (``lmlab info``) (``info``)

Lower floors: ``native`` (lmlab's format), ``hf`` (Hugging Face machinery), ``families`` (the registry the
``hf_*`` family modules register into), ``gguf``, ``registry`` (short model names).

The names above are resolved on first use (PEP 562), so that importing a lower floor such as
``lmlab.checkpoints.native`` (as ``lmlab.quant.model`` does) does not import ``load``, which imports
``lmlab.quant``: no import circle between the two packages.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The built-in Hugging Face families register themselves in ``families`` when imported; importing them
# here, in lookup order, registers them before any lookup (every submodule import runs this file first).
from lmlab.checkpoints import hf_gpt2, hf_llama, hf_bert, hf_t5  # noqa: F401,I001

if TYPE_CHECKING:
    from lmlab.checkpoints.info import describe, format_description
    from lmlab.checkpoints.export import export_source
    from lmlab.checkpoints.load import Resolved, from_hf_model, load_config, load_model, load_tokenizer, resolve
    from lmlab.checkpoints.save import MARKER_FILE, atomic_dir, check_output, export_hf, save_model, save_tokenizer

# public name -> module that defines it
_EXPORTS = {
    **dict.fromkeys(["Resolved", "resolve", "load_model", "load_config", "load_tokenizer", "from_hf_model"],
                    "lmlab.checkpoints.load"),
    **dict.fromkeys(["save_model", "export_hf", "atomic_dir", "check_output", "save_tokenizer", "MARKER_FILE"],
                    "lmlab.checkpoints.save"),
    "export_source": "lmlab.checkpoints.export",
    "describe": "lmlab.checkpoints.info",
    "format_description": "lmlab.checkpoints.info",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmlab.checkpoints' has no attribute {name!r}")
