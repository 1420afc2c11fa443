"""lmlab's own checkpoint format: a directory with config.json (ModelConfig fields + ``"lmlab_format": 1``)
and model.safetensors holding ``Transformer.state_dict()`` with tied weights stored once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmlab.checkpoints.hf import build_model, read_safetensors
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, ConfigError

FORMAT_KEY = "lmlab_format"
FORMAT_VERSION = 1


def is_native(directory: Path) -> bool:
    try:
        return FORMAT_KEY in json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    version = data.pop(FORMAT_KEY, None)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: {FORMAT_KEY}={version!r} is not supported; this lmlab reads version {FORMAT_VERSION}")
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def write_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """save_file, cloning tensors that share memory (safetensors refuses aliased tensors)."""
    seen_storages: set[int] = set()
    out = {}
    for key, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        out[key] = tensor.clone().contiguous() if storage in seen_storages else tensor.contiguous()
        if storage is not None:
            seen_storages.add(storage)
    save_file(out, str(path), metadata=metadata)


def write(model, directory: Path) -> None:
    """Write config.json and model.safetensors into an existing (temporary) directory."""
    cfg: ModelConfig = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings and "lm_head.weight" in state:
        del state["lm_head.weight"]  # the same tensor as tok_embed.weight
    data = {FORMAT_KEY: FORMAT_VERSION, **cfg.to_dict()}
    (Path(directory) / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    write_safetensors(state, Path(directory) / "model.safetensors", {"format": "pt", "lmlab_format": str(FORMAT_VERSION)})


def load(directory: str | Path, dtype: torch.dtype = torch.float32):
    directory = Path(directory)
    cfg = read_config(directory)
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"no model.safetensors in {directory}")
    return build_model(cfg, read_safetensors(weights), dtype, str(weights))
