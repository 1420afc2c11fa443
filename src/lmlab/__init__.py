"""lmlab: Transformers from their parts, through the whole generative-AI lifecycle.

The public API is imported lazily so that `import lmlab` stays cheap (the CLI starts fast).
"""

from __future__ import annotations

import importlib

# the single source of the version: pyproject.toml reads it (dynamic = ["version"]); CHANGELOG.md says what each added
__version__ = "0.7.0"

# public name -> module that defines it
_EXPORTS = {
    "ModelConfig": "lmlab.config",
    "Transformer": "lmlab.model",
    "Tokenizer": "lmlab.tokenizer",
    "load_model": "lmlab.checkpoints",
    "load_tokenizer": "lmlab.checkpoints",
    "save_model": "lmlab.checkpoints",
    "export_hf": "lmlab.checkpoints",
    "GenerationConfig": "lmlab.generation.config",
    "generate": "lmlab.generation.decode",
    "generate_tokens": "lmlab.generation.decode",
    "stream": "lmlab.generation.streaming",
    "LmlabError": "lmlab.errors",
    "ConfigError": "lmlab.errors",
    "CheckpointError": "lmlab.errors",
    "DataError": "lmlab.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmlab' has no attribute {name!r}")
