"""Merging a LoRA adapter into its base model: W' = W + scaling * B A, saved as a plain model."""

from __future__ import annotations

import shutil
from pathlib import Path

from lmlab.errors import CheckpointError


def merge_adapter(source: str | Path, adapter: str | Path, out_dir: str | Path, fmt: str = "lmlab") -> tuple[Path, int]:
    """Load `source` with `adapter`, fold the adapter into the weights, save to `out_dir` -> (path, layers merged).

    The base must hold plain float linear layers: a quantized or packed base cannot absorb an update
    exactly, so it is refused rather than silently rounded.
    """
    import torch

    import lmlab
    from lmlab.adapt.lora import merge_lora
    from lmlab.adapt.peft import read_adapter_config
    from lmlab.adapt.recipe import RECIPE_FILE

    from lmlab.quant.linear import is_quantized

    read_adapter_config(adapter)  # a clear error before the base model is loaded
    model = lmlab.load_model(source, adapter=adapter)
    if is_quantized(model):
        raise CheckpointError(f"cannot merge into {str(source)!r}: its weights are quantized "
                              f"({getattr(model, 'quantization', {}).get('source') or 'lmlab quantize'}); "
                              f"merge into the float model, then quantize")
    merged = merge_lora(model)
    tokenizer = lmlab.load_tokenizer(source)
    with torch.no_grad():
        path = (lmlab.export_hf if fmt == "hf" else lmlab.save_model)(model, out_dir, tokenizer)
    recipe = Path(adapter) / RECIPE_FILE
    if recipe.exists():
        shutil.copyfile(recipe, Path(path) / RECIPE_FILE)
    return Path(path), len(merged)
