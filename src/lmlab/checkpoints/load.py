"""Loading models: registry names, GGUF files, Hugging Face directories and hub ids, lmlab checkpoints.

``source`` is tried in this order: a registry name (``registry.py``), a ``.gguf`` file, a local
directory (lmlab checkpoint if its config.json carries ``lmlab_format``, else Hugging Face), and
finally a hub id ``org/name`` fetched with ``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.adapt.peft import load_adapter
from lmlab.adapt.recipe import resolve_student
from lmlab.adapt.student import is_student_dir, load_student, read_bundle
from lmlab.checkpoints import gguf, hf, native, registry
from lmlab.checkpoints.families import config_from_hf_dict
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.quant.gguf import load_gguf_native
from lmlab.quant.model import is_quantized_dir, load_quantized, parse_mode, quantize_model
from lmlab.tokenizer import Tokenizer

__all__ = ["Resolved", "resolve", "resolve_local", "load_model", "load_config", "load_tokenizer", "from_hf_model"]


@dataclass
class Resolved:
    """What a source string points at: kind is one of "gguf", "lmlab", "hf"."""

    source: str
    kind: str
    path: Path


def _is_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


# which files of a hub repository each use needs
_HUB_FILES = {
    "model": ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"],
    "config": ["config.json"],
    "tokenizer": ["*.json", "*.model", "*.txt"],
}


def _download(repo_id: str, need: str = "model") -> Path:
    try:  # imported here: 0.2 s that only a hub download needs (most sources are local)
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"cannot download {repo_id!r}: huggingface_hub is not installed; "
                              "pass a local directory or .gguf path") from None
    try:
        path = snapshot_download(repo_id, allow_patterns=_HUB_FILES[need])
    except Exception as exc:  # offline, not found, gated ...: one line, no traceback
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot download {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: "
                              f"{reason[:200]}); pass a local directory or .gguf path instead") from None
    return Path(path)


def resolve(source: str | Path, need: str = "model") -> Resolved:
    """Map a source string to (kind, local path), downloading a hub id if needed.

    `need` ("model", "config" or "tokenizer") limits which files a hub download fetches.
    """
    text = str(source)
    entry = registry.lookup(text)
    if entry is not None:
        local = registry.local_path(text)
        if local is not None:
            return resolve_local(local, text)
        return Resolved(text, *_local_kind(_download(entry.hub_id, need)))
    path = Path(text).expanduser()
    if path.exists():
        return resolve_local(path, text)
    if text.endswith(".gguf"):
        raise CheckpointError(f"GGUF file {text!r} does not exist")
    if _is_hub_id(text):
        return Resolved(text, *_local_kind(_download(text, need)))
    raise CheckpointError(f"model source {text!r} is neither a registry name ({', '.join(registry.names())}), "
                          "an existing .gguf file or directory, nor a hub id 'org/name'")


def resolve_local(path: Path, source: str) -> Resolved:
    return Resolved(source, *_local_kind(Path(path)))


def _local_kind(path: Path) -> tuple[str, Path]:
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise CheckpointError(f"{path} is a file but not a .gguf file; pass a .gguf file or a model directory")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; expected a Hugging Face or lmlab checkpoint directory")
    return ("lmlab" if native.is_native(path) else "hf"), path


def _default_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise CheckpointError(f"dtype={dtype!r} is not valid; choose one of: {', '.join(names)}")
        return names[dtype]
    return dtype


def load_model(source: str | Path, dtype: torch.dtype | str | None = None, adapter: str | Path | None = None,
               quantize: str | None = None, dequantize_other: bool = False, student: str | Path | None = None):
    """Load a Transformer (eval mode) from any supported source; see the module docstring.

    ``student``: a distilled student bundle (``lmlab.adapt.student``: ``lmlab distill`` with
    ``student.lora``) whose base model is `source`: the base's kept layers with the teacher's and the
    student's adapters merged; ``"shipped"``: the bundle lmlab ships for `source`. A `source` directory
    holding ``lmlab_student.json`` is such a bundle too.

    ``adapter``: a LoRA adapter directory in PEFT's format (``lmlab finetune`` writes them, and so does
    ``peft``) attached to the loaded model; ``lmlab.adapt.merge_lora`` folds it into the weights.

    ``quantize`` (see ``lmlab.quant`` and docs/quantization.md): ``"int8"`` or ``"int4"`` (``"int4-g64"``,
    ``"int4-g128"`` for other group sizes) quantizes every linear layer after loading (an adapter's base
    included, its A and B stay float); ``"native"`` runs a GGUF file at its own precision (Q4_0/Q4_1/Q8_0
    blocks go straight into int4/int8 layers; ``dequantize_other`` lets other types load as float). A
    quantized lmlab checkpoint always loads quantized.
    """
    mode = parse_mode(quantize)
    dtype = _default_dtype(dtype)
    if student is None and is_student_dir(source):  # load_model(DIR) of a bundle: its own base
        source, student = None, source
    if student is not None:  # "shipped": the bundle lmlab ships for this base model
        student = resolve_student(student, source)
    if student is not None:
        return _load_student(source, student, dtype, adapter, quantize, mode)
    where = resolve(source)
    if mode is not None and dtype != torch.float32:
        raise CheckpointError(f"quantize={quantize!r} runs fp32 activations around integer weights; drop dtype={dtype}")
    if where.kind == "lmlab" and is_quantized_dir(where.path):
        if mode not in (None, "native"):
            raise CheckpointError(f"{str(source)!r} is already quantized; load it without quantize={quantize!r} "
                                  f"(or with quantize='native')")
        model = load_quantized(where.path)
        mode = None
    elif mode == "native":
        if where.kind != "gguf":
            raise CheckpointError(f"quantize='native' runs a GGUF file at its own precision; {str(source)!r} is a "
                                  f"{where.kind} checkpoint (use quantize='int8' or 'int4')")
        model = load_gguf_native(where.path, dequantize_other=dequantize_other)
        mode = None
    elif where.kind == "gguf":
        cfg, state, _meta = gguf.read_gguf(where.path)
        model = hf.build_model(cfg, state, dtype, str(where.path))
    elif where.kind == "lmlab":
        model = native.load(where.path, dtype)
    else:
        model = hf.load_hf_dir(where.path, dtype)
    if adapter is not None:
        load_adapter(model, adapter)
        model.eval()
    if mode is not None:  # after the adapter: its frozen bases are quantized, A and B stay float
        quantize_model(model, *mode)
    return model


def _load_student(source, student, dtype, adapter, quantize, mode):
    """``load_model(source, student=DIR)``: the merged student, then quantized if asked."""
    if adapter is not None:
        raise CheckpointError(f"adapter={str(adapter)!r} and student={str(student)!r} cannot be combined: a student "
                              f"bundle holds its own adapters")
    if mode == "native":
        raise CheckpointError(f"quantize={quantize!r} runs a GGUF file at its own precision; the student "
                              f"{str(student)!r} merges adapters into float weights (use quantize='int8' or 'int4')")
    if mode is not None and dtype != torch.float32:
        raise CheckpointError(f"quantize={quantize!r} runs fp32 activations around integer weights; drop dtype={dtype}")
    model = load_student(student, source, dtype)
    if mode is not None:  # after merging: the merged weights are what gets quantized
        quantize_model(model, *mode)
    return model


def load_config(source: str | Path) -> tuple[ModelConfig, Resolved]:
    """The ModelConfig of a source, reading as little as possible (config.json, GGUF metadata).

    A student bundle's config is its base model's with the bundle's number of layers."""
    if is_student_dir(source):
        bundle = read_bundle(source)
        config, where = load_config(bundle.base_model)
        return config.replace(n_layers=len(bundle.keep_layers)), where
    where = resolve(source, need="config")
    if where.kind == "lmlab":
        return native.read_config(where.path), where
    if where.kind == "hf":
        hf_config = hf.read_config(where.path)
        keys = None
        if hf_config.get("model_type") == "bert":  # the MLM head's presence is in the weights' key names only
            keys = hf.weight_keys(where.path)
        return config_from_hf_dict(hf_config, keys=keys)[0], where
    return gguf.gguf_config(gguf.read_gguf_metadata(where.path)), where  # metadata only, no tensor data


def load_tokenizer(source: str | Path):
    """The tokenizer that belongs with `source` (same resolution rules as ``load_model``; a student bundle:
    its base model's)."""
    if is_student_dir(source):
        source = read_bundle(source).base_model
    where = resolve(source, need="tokenizer")
    if where.kind == "gguf":
        return Tokenizer.from_gguf(where.path)
    return Tokenizer.from_dir(where.path)


def from_hf_model(hf_model) -> "torch.nn.Module":
    """Convert an in-memory ``transformers`` model (GPT-2, LLaMA/Mistral/Qwen2, BERT, T5) to a Transformer.

    Uses ``hf_model.config.to_dict()`` and ``hf_model.state_dict()``; the result is fp32, in eval mode.
    """
    hf_config = hf_model.config.to_dict()
    if not hf_config.get("architectures"):
        hf_config["architectures"] = [type(hf_model).__name__]
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    cfg, family = config_from_hf_dict(hf_config, keys=state.keys())
    return hf.convert_state_to_lmlab(state, cfg, family, torch.float32, source=type(hf_model).__name__)
