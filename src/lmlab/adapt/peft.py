"""LoRA adapters in PEFT's on-disk format, so ``peft`` and lmlab read each other's adapters.

A PEFT LoRA directory holds two files::

    adapter_config.json         {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                                 "target_modules": ["q_proj", ...], "use_rslora": false, "bias": "none",
                                 "task_type": "CAUSAL_LM", "base_model_name_or_path": "...", ...}
    adapter_model.safetensors   base_model.model.<HF module path>.lora_A.weight   (r, in)
                                base_model.model.<HF module path>.lora_B.weight   (out, r)

The HF module path of an lmlab linear comes from the checkpoint family's own converter
(``lmlab.checkpoints.hf_*``): the model's state dict is converted to HF names and each weight is
matched by identity, so there is one key map per family, not a second one for adapters. Families
whose converter reshapes a weight (GPT-2 fuses q/k/v into one Conv1D) have no PEFT equivalent for
separate q/k/v adapters and are refused with a clear error.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab.adapt.lora import BASE_LAYER, LoraConfig, LoRALinear, adapted_name, apply_lora, lora_modules
from lmlab.checkpoints import hf as hf_checkpoints
from lmlab.checkpoints.registry import lookup
from lmlab.errors import CheckpointError, ConfigError
from lmlab.quant.linear import QuantizedEmbedding, QuantizedLinear

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {"decoder": "CAUSAL_LM", "encoder_decoder": "SEQ_2_SEQ_LM", "encoder": "FEATURE_EXTRACTION"}


def hf_module_names(model: nn.Module) -> dict[str, str]:
    """lmlab linear module name -> the HF module path of the same weight (for every 1:1 mapped linear)."""
    cfg = model.config
    family = hf_checkpoints.family_for_config(cfg)
    # a quantized layer (lmlab.quant) has no float weight: an uninitialised tensor of its shape stands in
    # (torch.empty touches no memory), so the name mapping below works the same for quantized models
    stand_ins: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            stand_ins[adapted_name(name)] = torch.empty(module.out_features, module.in_features)
    base_weights = {}  # lmlab module name -> its (base) weight
    for name, module in model.named_modules():
        if name in stand_ins:
            base_weights[name] = stand_ins[name]
        elif isinstance(module, LoRALinear):
            base_weights[name] = module.base_layer.weight
        elif type(module) is nn.Linear and not name.endswith((f".{BASE_LAYER}", ".lora_A", ".lora_B")):
            base_weights[name] = module.weight
    state = {f"{name}.weight": weight for name, weight in stand_ins.items()}
    if any(isinstance(m, QuantizedEmbedding) for m in model.modules()):
        state["tok_embed.weight"] = torch.empty(cfg.vocab_size, cfg.d_model)
    for key, tensor in model.state_dict(keep_vars=True).items():  # lmlab names, adapters folded away
        key = key.replace(f".{BASE_LAYER}.", ".")
        if ".lora_" not in key and key.rpartition(".")[0] not in stand_ins:
            state[key] = tensor.detach()
    hf_state = family.to_hf(state, cfg)
    by_pointer: dict[tuple, list[str]] = {}
    for hf_key, tensor in hf_state.items():
        if hf_key.endswith(".weight"):
            by_pointer.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(hf_key[: -len(".weight")])
    names = {}
    for name, weight in base_weights.items():
        candidates = by_pointer.get((weight.data_ptr(), tuple(weight.shape)), [])
        candidates = [c for c in candidates if not c.endswith(("embed_tokens", "shared", "wte", "word_embeddings"))]
        if len(candidates) == 1:
            names[name] = candidates[0]
    return names


def check_savable(model: nn.Module) -> None:
    """Refuse, before any training, LoRA layers that ``save_adapter`` could not write in PEFT's format
    (a layer whose weight has no 1:1 Hugging Face module, e.g. an ``lm_head`` tied to the embedding)."""
    mapping = hf_module_names(model)
    unmapped = [name for name, _ in lora_modules(model) if name not in mapping]
    if unmapped:
        raise ConfigError(f"lora.targets: LoRA layer {unmapped[0]!r} cannot be saved in PEFT format (its weight has "
                          f"no Hugging Face module of its own in this model family: tied to the embedding, or "
                          f"reshaped or fused by the converter); leave it out of the targets")


def save_adapter(model: nn.Module, directory: str | Path, config: LoraConfig, base_model: str = "") -> Path:
    """Write the model's LoRA adapters as a PEFT directory (atomically: a temp dir renamed into place)."""
    modules = dict(lora_modules(model))
    if not modules:
        raise ConfigError("the model holds no LoRA adapter to save")
    mapping = hf_module_names(model)
    unmapped = [n for n in modules if n not in mapping]
    if unmapped:
        raise ConfigError(f"LoRA layer {unmapped[0]!r} has no Hugging Face counterpart in this model family "
                          f"(its converter reshapes or fuses that weight), so it cannot be saved in PEFT format")
    tensors = {}
    for name, module in modules.items():
        hf = mapping[name]
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = module.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = module.lora_B.weight.detach().cpu().contiguous()
    targets = sorted({mapping[n].rsplit(".", 1)[-1] for n in modules})
    entry = lookup(base_model) if base_model else None
    if entry is not None:  # a registry name means nothing to peft: record the hub id the weights come from
        base_model = entry.hub_id
    peft_config = {
        "peft_type": "LORA", "task_type": TASK_TYPES.get(model.config.arch), "base_model_name_or_path": base_model,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.rslora,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
    }
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
        for f in (tmp, *tmp.iterdir()):  # mkdtemp makes 0700: give the usual permissions, as save_model does
            f.chmod(0o755 if f.is_dir() else 0o644)
        if directory.exists():  # replace file by file: the directory may hold other things (a README)
            for f in tmp.iterdir():
                os.replace(f, directory / f.name)
            tmp.rmdir()
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"adapter {str(directory)!r} has no {CONFIG_FILE} (expected a PEFT LoRA directory)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise CheckpointError(f"adapter {str(directory)!r} has peft_type={config.get('peft_type')!r}; lmlab reads LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise CheckpointError(f"adapter {str(directory)!r} uses {key}={config[key]!r} (per-layer ranks), "
                                  f"which lmlab does not support")
    if config.get("use_dora"):
        raise CheckpointError(f"adapter {str(directory)!r} is a DoRA adapter (use_dora=true); lmlab reads plain LoRA")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"adapter {str(directory)!r} trains biases (bias={config['bias']!r}); lmlab reads bias='none'")
    return config


def load_adapter(model: nn.Module, directory: str | Path, trainable: bool = False) -> LoraConfig:
    """Attach the PEFT LoRA adapter in `directory` to `model` (in place) -> its LoraConfig.

    Every tensor is checked against the base model: an adapter made for another model names the
    module and both shapes.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"adapter {str(directory)!r} is not a directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    peft_config = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.exists():
        raise CheckpointError(f"adapter {str(directory)!r} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{str(weights_path)!r} cannot be read ({type(exc).__name__}: {exc})") from None
    to_lmlab = {hf: ours for ours, hf in hf_module_names(model).items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        body = key.removeprefix(PREFIX)
        module, _, kind = body.rpartition(".lora_")
        kind = kind.removesuffix(".weight").removesuffix(".default")
        module = module.removesuffix(".default")
        if kind not in ("A", "B"):
            raise CheckpointError(f"adapter tensor {key!r} is not a LoRA A/B matrix")
        if module not in to_lmlab:
            raise CheckpointError(f"adapter {str(directory)!r} adapts {module!r}, which this base model does not have "
                                  f"(an adapter for another model?)")
        pairs.setdefault(to_lmlab[module], {})[kind] = tensor
    if not pairs:
        raise CheckpointError(f"adapter {str(directory)!r} holds no LoRA tensors")
    r = int(peft_config["r"])
    config = LoraConfig(r=r, alpha=float(peft_config.get("lora_alpha", r)), dropout=float(peft_config.get("lora_dropout", 0.0)),
                        targets=tuple(pairs), rslora=bool(peft_config.get("use_rslora", False)))
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"adapter {str(directory)!r}: module {name!r} has lora_{'A' if 'A' in ab else 'B'} "
                                  f"but not its pair")
        base = model.get_submodule(name)
        want_a, want_b = (r, base.in_features), (base.out_features, r)
        if tuple(ab["A"].shape) != want_a or tuple(ab["B"].shape) != want_b:
            raise CheckpointError(f"adapter {str(directory)!r} does not fit this base model at {name!r}: lora_A "
                                  f"{tuple(ab['A'].shape)} / lora_B {tuple(ab['B'].shape)}, the model needs {want_a} / "
                                  f"{want_b} (an adapter for another base model?)")
    apply_lora(model, config)
    with torch.no_grad():
        for name, module in lora_modules(model):
            module.lora_A.weight.copy_(pairs[name]["A"])
            module.lora_B.weight.copy_(pairs[name]["B"])
            module.lora_A.weight.requires_grad_(trainable)
            module.lora_B.weight.requires_grad_(trainable)
    return config
