"""``lmlab export``: any loadable source written as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

from lmlab.checkpoints.load import load_model, load_tokenizer, resolve
from lmlab.checkpoints.save import check_output, export_hf
from lmlab.errors import CheckpointError

__all__ = ["export_source"]


def export_source(source: str | Path, directory: str | Path, with_tokenizer: bool = True, force: bool = False) -> Path:
    """Load any supported source and write it as a Hugging Face directory (with its tokenizer when it has one).

    The output rules (``lmlab.checkpoints.save``) are checked before the model is loaded: `directory`
    may not be the source or inside it, a directory lmlab did not write is refused, and an earlier
    lmlab output is replaced only with ``force``.
    """
    sources = [resolve(source).path]
    check_output(directory, sources, force)  # before the (slow) load
    model = load_model(source)
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = load_tokenizer(source)
        except (CheckpointError, ImportError, OSError):
            tokenizer = None  # a checkpoint without tokenizer files exports weights only
    return export_hf(model, directory, tokenizer, force=force, what="export", sources=sources)
