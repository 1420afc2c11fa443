"""``lmlab quantize``: a float model in, a quantized lmlab checkpoint out (format: ``lmlab.quant.model``).

Apart from ``quant.model`` because it loads through ``lmlab.checkpoints.load``, which itself reads
quantized checkpoints with ``quant.model``: this module sits above both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lmlab.adapt.recipe import RECIPE_FILE
from lmlab.checkpoints.load import load_model, load_tokenizer, resolve
from lmlab.checkpoints.save import atomic_dir, check_output, save_tokenizer
from lmlab.errors import CheckpointError, ConfigError
from lmlab.quant.linear import BITS, GROUP_SIZES
from lmlab.quant.model import (QuantReport, describe_quantization, is_quantized_dir, quantize_model, read_record,
                               save_quantized)

__all__ = ["quantize_checkpoint"]


def quantize_checkpoint(source: str | Path, out_dir: str | Path, bits: int, group_size: int | None = None,
                        layers=None, force: bool = False) -> tuple[Path, QuantReport]:
    """Load `source` in fp32, quantize it, write a quantized checkpoint (with the tokenizer, and the prompt
    recipe ``lmlab_recipe.json``, when the source has them) atomically to `out_dir` -> (path, report).

    Refused before anything is loaded: bad ``bits`` / ``group_size``, a source that is already quantized,
    and an `out_dir` the output rules forbid (the source itself or inside it, a directory lmlab did not
    write, an earlier lmlab output without ``force``; see ``lmlab.checkpoints.save``).
    """
    if bits not in BITS:
        raise ConfigError(f"--bits {bits!r} is not valid; choose one of: {', '.join(map(str, BITS))}")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size!r} is not valid; choose one of: {', '.join(map(str, GROUP_SIZES))}")
    where = resolve(source)
    if where.kind == "lmlab" and is_quantized_dir(where.path):
        held = describe_quantization(read_record(where.path))
        raise CheckpointError(f"{str(source)!r} is already quantized ({held}); quantize its float source instead")
    check_output(out_dir, [where.path], force)  # before the (slow) load
    model = load_model(source)
    report = quantize_model(model, bits, group_size, layers)
    model.quantization["source"] = str(source)
    try:
        tokenizer = load_tokenizer(source)
    except (CheckpointError, ImportError, OSError):
        tokenizer = None  # a checkpoint without tokenizer files: weights only

    def write(tmp: Path) -> None:
        save_quantized(model, tmp)
        save_tokenizer(tokenizer, tmp)
        recipe = where.path / RECIPE_FILE  # a fine-tuned or distilled model keeps the prompt it learned
        if recipe.is_file():
            shutil.copyfile(recipe, tmp / RECIPE_FILE)

    return atomic_dir(out_dir, write, what="quantize", force=force, sources=[where.path]), report

