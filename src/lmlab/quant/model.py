"""Quantizing a whole model, and lmlab's quantized checkpoint format.

``quantize_model(model, bits=4, group_size=32)`` swaps the chosen ``nn.Linear`` layers (all of them by
default, the output head included) for ``Int8Linear`` / ``Int4Linear`` through the one module walker
(``lmlab.nn.swap``) and returns a ``QuantReport`` of what it replaced. A LoRA adapter keeps working: its
frozen base (``x.base_layer``) is quantized, its A and B stay float. With tied embeddings the head is
quantized as a linear and the embedding becomes a ``QuantizedEmbedding`` that reads the head's rows, so
no float copy of the 49152 x 576 table stays behind.

The quantization of each layer is recorded in ``model.quantization`` (a dict, see ``QUANT_FILE``);
``save_quantized`` / ``load_quantized`` write and read a directory (see docs/quantization.md;
``lmlab.quant.checkpoint.quantize_checkpoint`` is ``lmlab quantize``):

    config.json         the ModelConfig, as in a float lmlab checkpoint (``lmlab_format``)
    quantization.json   {"format": 1, "layers": {name: {"bits": 8} | {"bits": 4, "group_size": G}},
                         "embedding": "tied" | "float", "source": ...}
    model.safetensors   float tensors (norms, untied embedding, biases) and, per quantized layer,
                        ``{name}.qweight`` (int8 (N, K) | uint8 (N, K/2)), ``{name}.scale`` and, for int4, ``{name}.min``

Loading builds the model with its parameters on the meta device (``float_skeleton``), so no fp32 copy
of the weights is ever allocated: the quantized tensors go straight into their layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmlab.checkpoints import native
from lmlab.checkpoints.hf import parameterless_model, read_safetensors
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, ConfigError
from lmlab.nn.swap import replace_module, swap_modules
from lmlab.quant.linear import (BITS, GROUP_SIZES, Int4Linear, Int8Linear, QuantizedEmbedding, QuantizedLinear,
                                check_int4_shape, is_quantized)

QUANT_FILE = "quantization.json"
QUANT_FORMAT = 1
MODES = ("int8", "int4", "native")


@dataclass
class QuantReport:
    """What ``quantize_model`` did: layer name -> format, and the bytes of the linear weights before/after."""

    replaced: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    embedding: str = "float"

    def __str__(self) -> str:
        kinds = sorted(set(self.replaced.values()))
        return (f"quantized {len(self.replaced)} linear layers to {', '.join(kinds) or 'nothing'}: "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB; embedding {self.embedding}")


def parse_mode(mode: str | None) -> tuple[int, int | None] | str | None:
    """``"int8"`` -> (8, None), ``"int4"`` / ``"int4-g64"`` -> (4, 32|64), ``"native"`` -> "native"; None -> None."""
    if mode is None or mode == "none":
        return None
    if mode == "native":
        return mode
    text = str(mode)
    bits, _, group = text.partition("-g")
    valid = "int8, int4, int4-g32, int4-g64, int4-g128, native"
    if bits not in ("int8", "int4") or (group and (bits == "int8" or not group.isdigit())):
        raise ConfigError(f"quantize={mode!r} is not valid; choose one of: {valid}")
    return (8, None) if bits == "int8" else (4, int(group) if group else 32)


def _quantizable(model: nn.Module) -> dict[str, nn.Linear]:
    """Full name -> every plain nn.Linear a quantized layer can replace (a LoRA layer's frozen base included)."""
    return {name: m for name, m in model.named_modules()
            if type(m) is nn.Linear and ".lora_" not in name and name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B")}


def _select(model: nn.Module, layers) -> list[str]:
    available = _quantizable(model)
    if layers is None:
        return list(available)
    if isinstance(layers, str):
        layers = [t.strip() for t in layers.split(",") if t.strip()]
    chosen = []
    for target in layers:
        # a short name (q, down, lm_head) matches the layer and a LoRA layer's base under it
        match = [n for n in available if n == target or n.removesuffix(".base_layer").rsplit(".", 1)[-1] == target]
        if not match:
            short = sorted({n.removesuffix(".base_layer").rsplit(".", 1)[-1] for n in available})
            raise ConfigError(f"quantize layer {target!r} matches no linear layer; available: {', '.join(short)}")
        chosen += match
    return list(dict.fromkeys(chosen))


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None, layers=None) -> QuantReport:
    """Swap the chosen linears (default: all) for int8 or int4 layers, in place -> QuantReport.

    Every shape is checked before anything is replaced, so a layer the kernel cannot take leaves the
    model untouched and the error names the layer and its width.
    """
    if bits not in BITS:
        raise ConfigError(f"bits={bits!r} is not valid; choose one of: {', '.join(map(str, BITS))}")
    if bits == 4:
        group_size = 32 if group_size is None else group_size
        if group_size not in GROUP_SIZES:
            raise ConfigError(f"group_size={group_size!r} is not valid; choose one of: "
                              f"{', '.join(map(str, GROUP_SIZES))}")
    elif group_size is not None:
        raise ConfigError(f"group_size={group_size} applies to int4 only; int8 has one scale per output channel")
    names = _select(model, layers)
    linears = _quantizable(model)
    if bits == 4:
        for name in names:
            check_int4_shape(name, linears[name].in_features, linears[name].out_features, group_size)
    tied = _tied_head(model)
    report = QuantReport()
    record = getattr(model, "quantization", None) or {"format": QUANT_FORMAT, "layers": {}, "embedding": "float"}

    def make(name: str, module: nn.Module) -> nn.Module:
        report.bytes_before += module.weight.numel() * module.weight.element_size()
        new = Int8Linear.from_float(module) if bits == 8 else Int4Linear.from_float(module, group_size, name)
        report.bytes_after += new.nbytes()
        report.replaced[name] = "int8" if bits == 8 else f"int4 g{group_size}"
        record["layers"][_record_name(name)] = {"bits": 8} if bits == 8 else {"bits": 4, "group_size": group_size}
        return new

    with torch.no_grad():
        swap_modules(model, make, names)
        head = getattr(model, "lm_head", None)
        if tied and isinstance(head, QuantizedLinear):
            model.tok_embed = QuantizedEmbedding(head, tied=True)
            record["embedding"] = "tied"
    report.embedding = record["embedding"]
    model.quantization = record
    return report


def _record_name(name: str) -> str:
    """A LoRA layer's base is recorded under the layer's own name (the adapter is not part of the base checkpoint)."""
    return name.removesuffix(".base_layer")


def _tied_head(model: nn.Module) -> bool:
    head, embed = getattr(model, "lm_head", None), getattr(model, "tok_embed", None)
    return (isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding)
            and head.weight.data_ptr() == embed.weight.data_ptr())


# --- building without float weights ---------------------------------------------------------------
def float_skeleton(cfg: ModelConfig) -> nn.Module:
    """A Transformer for `cfg` whose parameters are all on the meta device (filled by ``fill_float``);
    buffers stay real (RoPE's ``inv_freq`` is computed when the module is built and never saved)."""
    return parameterless_model(cfg)


def fill_float(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Assign the remaining float tensors of `state` to the skeleton; every meta parameter must be covered."""
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise CheckpointError(f"{source} has tensors this model has no place for: {', '.join(unknown[:8])}")
    with torch.no_grad():
        for name, tensor in state.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            old = getattr(module, attr)
            if tuple(old.shape) != tuple(tensor.shape):
                raise CheckpointError(f"tensor {name!r} in {source} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(old.shape)}")
            setattr(module, attr, nn.Parameter(tensor.to(torch.float32), requires_grad=False))
    head, embed = getattr(model, "lm_head", None), getattr(model, "tok_embed", None)
    if model.config.tie_embeddings and type(head) is nn.Linear and isinstance(embed, nn.Embedding):
        head.weight = embed.weight  # a float head tied to a float embedding: one tensor again
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{source} is missing tensors for: {', '.join(missing[:8])}")


def set_quantized(model: nn.Module, name: str, layer: QuantizedLinear) -> None:
    replace_module(model, name, layer)


# --- saving and loading ---------------------------------------------------------------------------
def save_quantized(model: nn.Module, directory: Path) -> None:
    """Write config.json, quantization.json and model.safetensors into an existing (temporary) directory."""
    from lmlab.checkpoints.save import refuse_trimmed_head

    refuse_trimmed_head(model, "save_quantized")
    record = getattr(model, "quantization", None)
    if not record:
        raise CheckpointError("this model holds no quantized layers; save it with lmlab.save_model")
    state = {}
    for key, tensor in model.state_dict().items():
        if ".lora_" in key:
            raise CheckpointError("the model carries a LoRA adapter; save the adapter separately (lmlab finetune "
                                  "writes it) and quantize the base model alone")
        state[key] = tensor.detach().cpu()
    data = {native.FORMAT_KEY: native.FORMAT_VERSION, **model.config.to_dict()}
    (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (directory / QUANT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    native.write_safetensors(state, directory / "model.safetensors", {"format": "pt", "lmlab_quantization": "1"})


def is_quantized_dir(directory: Path) -> bool:
    return (Path(directory) / QUANT_FILE).exists()


def read_record(directory: str | Path) -> dict:
    """The ``quantization.json`` record of a quantized checkpoint directory."""
    path = Path(directory) / QUANT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def load_quantized(directory: str | Path) -> nn.Module:
    """A quantized lmlab checkpoint -> Transformer (eval mode) running on the integer kernels."""
    directory = Path(directory)
    record = read_record(directory)
    if record.get("format") != QUANT_FORMAT:
        raise CheckpointError(f"{directory / QUANT_FILE}: format={record.get('format')!r} is not supported; "
                              f"this lmlab reads format {QUANT_FORMAT}")
    cfg = native.read_config(directory)
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"no model.safetensors in {directory}")
    state = read_safetensors(weights)
    model = float_skeleton(cfg)
    for name, spec in record["layers"].items():
        try:
            q, scale = state.pop(f"{name}.qweight"), state.pop(f"{name}.scale")
            minimum = state.pop(f"{name}.min") if spec["bits"] == 4 else None
        except KeyError as exc:
            raise CheckpointError(f"{weights} lacks {exc.args[0]!r}, which {QUANT_FILE} says layer {name!r} has") from None
        bias = state.pop(f"{name}.bias", None)
        if spec["bits"] == 8:
            layer = Int8Linear(q, scale, bias)
        elif spec["bits"] == 4:
            layer = Int4Linear(q, scale, minimum, int(spec["group_size"]), bias, name)
        else:
            raise CheckpointError(f"{directory / QUANT_FILE}: layer {name!r} has bits={spec['bits']!r}; "
                                  f"this lmlab runs {', '.join(map(str, BITS))}")
        set_quantized(model, name, layer)
    attach_embedding(model, record, str(weights))
    fill_float(model, state, str(weights))
    model.quantization = record
    return model.eval()


def attach_embedding(model: nn.Module, record: dict, source: str) -> None:
    """With a tied, quantized head: the embedding reads the head's rows."""
    if record.get("embedding") == "tied":
        if not isinstance(model.lm_head, QuantizedLinear):
            raise CheckpointError(f"{source}: the embedding is tied to a quantized lm_head, but lm_head is not quantized")
        model.tok_embed = QuantizedEmbedding(model.lm_head, tied=True)


def describe_quantization(model_or_record) -> str:
    """One line for ``lmlab info``: which formats the layers hold."""
    record = model_or_record if isinstance(model_or_record, dict) else getattr(model_or_record, "quantization", None)
    if not record:
        return "none (float weights)"
    counts: dict[str, int] = {}
    for spec in record["layers"].values():
        kind = "int8" if spec["bits"] == 8 else f"int4 group {spec['group_size']}"
        counts[kind] = counts.get(kind, 0) + 1
    parts = [f"{n} layers {kind}" for kind, n in sorted(counts.items())]
    source = f" (from {record['source']})" if record.get("source") else ""
    return f"{', '.join(parts)}; embedding {record.get('embedding', 'float')}{source}"
