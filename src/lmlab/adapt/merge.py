"""Merging a LoRA adapter into its base model: W' = W + scaling * B A, saved as a plain model."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lmlab.adapt.lora import merge_lora
from lmlab.adapt.peft import read_adapter_config
from lmlab.adapt.recipe import RECIPE_FILE
from lmlab.checkpoints.load import load_model, load_tokenizer, resolve
from lmlab.checkpoints.save import check_output, export_hf, save_model
from lmlab.errors import CheckpointError, ConfigError
from lmlab.quant.model import is_quantized_dir

FORMATS = ("lmlab", "hf")


def merge_adapter(source: str | Path, adapter: str | Path, out_dir: str | Path, fmt: str = "lmlab",
                  force: bool = False) -> tuple[Path, int]:
    """Load `source` with `adapter`, fold the adapter into the weights, save to `out_dir` -> (path, layers merged).

    The base must hold plain float linear layers: a quantized or packed base cannot absorb an update
    exactly, so it is refused rather than silently rounded. `out_dir` follows the output rules
    (``lmlab.checkpoints.save``): neither the base nor the adapter may be it, hold it or lie inside it;
    a directory lmlab did not write is refused; an earlier lmlab output is replaced only with ``force``.
    All of this is checked before the base model is loaded.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not valid; choose one of: {', '.join(FORMATS)}")
    read_adapter_config(adapter)  # a clear error before the base model is loaded
    base = resolve(source)
    if base.kind == "lmlab" and is_quantized_dir(base.path):
        raise CheckpointError(f"cannot merge into {str(source)!r}: its weights are quantized; merge into the "
                              f"float model, then quantize")
    sources = [base.path, Path(adapter)]
    check_output(out_dir, sources, force)
    model = load_model(source, adapter=adapter)
    merged = merge_lora(model)
    tokenizer = load_tokenizer(source)
    recipe = Path(adapter) / RECIPE_FILE

    def copy_recipe(tmp: Path) -> None:  # a fine-tuned adapter's prompt recipe travels with the merged model
        if recipe.is_file():
            shutil.copyfile(recipe, tmp / RECIPE_FILE)

    save = export_hf if fmt == "hf" else save_model
    with torch.no_grad():
        path = save(model, out_dir, tokenizer, force=force, what="merge", sources=sources, extra=copy_recipe)
    return Path(path), len(merged)
