"""The registry of Hugging Face model families: each family module registers itself here.

A family is a module (``hf_gpt2``, ``hf_llama``, ``hf_bert``, ``hf_t5``) that defines

    MODEL_TYPES                 the ``model_type`` values of config.json it reads
    matches(cfg) -> bool        whether a ModelConfig has this family's structure (for export)
    config_from_hf(hf, keys)    HF config dict -> ModelConfig
    config_to_hf(cfg)           ModelConfig -> HF config dict
    to_lmlab(state, cfg)        HF state dict -> lmlab names;  to_hf(state, cfg): the reverse

and ends with ``register(sys.modules[__name__])``. This module imports none of them: the package
(``lmlab/checkpoints/__init__.py``) imports the built-in ones, so they are registered before any lookup,
and a new family is one new module plus one line there. Registration order is lookup order.
"""

from __future__ import annotations

from types import ModuleType
from typing import Iterable

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError

_FAMILIES: list[ModuleType] = []

# what a family module must define (checked when it registers, so a typo fails at import, not at export)
REQUIRED = ("MODEL_TYPES", "matches", "config_from_hf", "config_to_hf", "to_lmlab", "to_hf")

# class-name prefix in `architectures` -> model_type, for config.json files without a model_type
ARCHITECTURE_PREFIXES = {"GPT2": "gpt2", "Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2", "Bert": "bert",
                         "T5": "t5"}


def register(family: ModuleType) -> ModuleType:
    """Add a family module to the registry (once); returns it. Its model types must be new."""
    missing = [name for name in REQUIRED if not hasattr(family, name)]
    if missing:
        raise CheckpointError(f"family {family.__name__} lacks {', '.join(missing)}; a family defines "
                              f"{', '.join(REQUIRED)}")
    if family in _FAMILIES:
        return family
    taken = {t: f.__name__ for f in _FAMILIES for t in f.MODEL_TYPES}
    clash = [t for t in family.MODEL_TYPES if t in taken]
    if clash:
        raise CheckpointError(f"family {family.__name__}: model_type {clash[0]!r} is already read by {taken[clash[0]]}")
    _FAMILIES.append(family)
    return family


def families() -> list[ModuleType]:
    """The registered families, in registration order."""
    return list(_FAMILIES)


def supported_model_types() -> list[str]:
    return sorted(t for family in _FAMILIES for t in family.MODEL_TYPES)


def family_for_model_type(model_type: str | None, architectures: list[str] | None = None) -> ModuleType:
    for family in _FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    what = f"model_type={model_type!r}" if model_type else f"architectures={architectures!r}"
    raise CheckpointError(f"{what} is not supported; supported model types: {', '.join(supported_model_types())}")


def family_for_config(cfg: ModelConfig) -> ModuleType:
    """Choose the HF family from the config's structure (or its recorded hf_model_type), never its name."""
    recorded = cfg.extra.get("hf_model_type")
    if recorded:
        return family_for_model_type(recorded)
    for family in _FAMILIES:
        if family.matches(cfg):
            return family
    raise CheckpointError(
        f"no Hugging Face family can represent this config (arch={cfg.arch!r}, positional={cfg.positional!r}, "
        f"norm={cfg.norm!r}, norm_position={cfg.norm_position!r}, gated_ffn={cfg.gated_ffn}); "
        f"supported: {', '.join(f.MODEL_TYPES[0] for f in _FAMILIES)}"
    )


def model_type_from_architectures(architectures: list[str] | None) -> str | None:
    for name in architectures or []:
        for prefix, model_type in ARCHITECTURE_PREFIXES.items():
            if name.startswith(prefix) and name[len(prefix):][:1].isupper():
                return model_type
    return None


def config_from_hf_dict(hf: dict, keys: Iterable[str] | None = None) -> tuple[ModelConfig, ModuleType]:
    """HF config dict -> (ModelConfig, family module). `keys` (checkpoint key names) refine the head choice."""
    if not hf.get("model_type"):
        inferred = model_type_from_architectures(hf.get("architectures"))
        if inferred is None:
            raise CheckpointError(f"config has no model_type and architectures={hf.get('architectures')!r} is not "
                                  f"supported; supported architectures: {', '.join(p + '*' for p in ARCHITECTURE_PREFIXES)}")
        hf = {**hf, "model_type": inferred}
    family = family_for_model_type(hf.get("model_type"), hf.get("architectures"))
    cfg = family.config_from_hf(hf, keys=keys)
    return cfg, family
