"""Loading and saving models: registry names, GGUF files, Hugging Face directories and hub ids, lmlab checkpoints.

Public API (names are stable):

* ``load_model(source, dtype=None, adapter=None)``  -> Transformer in eval mode (fp32 by default), a LoRA adapter attached
* ``load_tokenizer(source)``           -> lmlab.Tokenizer for the same sources
* ``save_model(model, directory, tokenizer=None)``  lmlab's own format, written atomically
* ``export_hf(model, directory, tokenizer=None)``   config.json + model.safetensors that transformers loads
* ``from_hf_model(hf_model)``          -> Transformer converted from an in-memory transformers model
* ``resolve(source)``                  -> where a source points and what kind it is
* ``load_config(source)``              -> (ModelConfig, Resolved) from config.json / GGUF metadata only
* ``export_source(source, directory)`` load + export_hf (``lmlab export``)
* ``describe(source)`` / ``format_description(info)``  architecture, size and memory figures (``lmlab info``)

``source`` is tried in this order: a registry name (``registry.py``), a ``.gguf`` file, a local
directory (lmlab checkpoint if its config.json carries ``lmlab_format``, else Hugging Face), and
finally a hub id ``org/name`` fetched with ``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.checkpoints import hf as hf_format  # Hugging Face directories: config.json, weights, families
from lmlab.checkpoints import native, registry
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.scaling import format_bytes, format_count, kv_cache_bytes

__all__ = ["load_model", "load_tokenizer", "save_model", "export_hf", "from_hf_model", "resolve", "load_config",
           "export_source", "describe", "format_description", "Resolved"]


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
    try:
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
               quantize: str | None = None, dequantize_other: bool = False):
    """Load a Transformer (eval mode) from any supported source; see the module docstring.

    ``adapter``: a LoRA adapter directory in PEFT's format (``lmlab finetune`` writes them, and so does
    ``peft``) attached to the loaded model; ``lmlab.adapt.merge_lora`` folds it into the weights.

    ``quantize`` (see ``lmlab.quant`` and docs/quantization.md): ``"int8"`` or ``"int4"`` (``"int4-g64"``,
    ``"int4-g128"`` for other group sizes) quantizes every linear layer after loading (an adapter's base
    included, its A and B stay float); ``"native"`` runs a GGUF file at its own precision (Q4_0/Q4_1/Q8_0
    blocks go straight into int4/int8 layers; ``dequantize_other`` lets other types load as float). A
    quantized lmlab checkpoint always loads quantized.
    """
    from lmlab.quant.model import is_quantized_dir, parse_mode

    mode = parse_mode(quantize)
    dtype = _default_dtype(dtype)
    where = resolve(source)
    if mode is not None and dtype != torch.float32:
        raise CheckpointError(f"quantize={quantize!r} runs fp32 activations around integer weights; drop dtype={dtype}")
    if where.kind == "lmlab" and is_quantized_dir(where.path):
        if mode not in (None, "native"):
            raise CheckpointError(f"{str(source)!r} is already quantized; load it without quantize={quantize!r} "
                                  f"(or with quantize='native')")
        from lmlab.quant.model import load_quantized

        model = load_quantized(where.path)
        mode = None
    elif mode == "native":
        if where.kind != "gguf":
            raise CheckpointError(f"quantize='native' runs a GGUF file at its own precision; {str(source)!r} is a "
                                  f"{where.kind} checkpoint (use quantize='int8' or 'int4')")
        from lmlab.quant.gguf import load_gguf_native

        model = load_gguf_native(where.path, dequantize_other=dequantize_other)
        mode = None
    elif where.kind == "gguf":
        from lmlab.checkpoints.gguf import read_gguf

        cfg, state, _meta = read_gguf(where.path)
        model = hf_format.build_model(cfg, state, dtype, str(where.path))
    elif where.kind == "lmlab":
        model = native.load(where.path, dtype)
    else:
        model = hf_format.load_hf_dir(where.path, dtype)
    if adapter is not None:
        from lmlab.adapt.peft import load_adapter

        load_adapter(model, adapter)
        model.eval()
    if mode is not None:  # after the adapter: its frozen bases are quantized, A and B stay float
        from lmlab.quant.model import quantize_model

        quantize_model(model, *mode)
    return model


def load_config(source: str | Path) -> tuple[ModelConfig, Resolved]:
    """The ModelConfig of a source, reading as little as possible (config.json, GGUF metadata)."""
    where = resolve(source, need="config")
    if where.kind == "lmlab":
        return native.read_config(where.path), where
    if where.kind == "hf":
        hf = hf_format.read_config(where.path)
        keys = None
        if hf.get("model_type") == "bert":  # the MLM head's presence is in the weights' key names only
            keys = hf_format.weight_keys(where.path)
        return hf_format.config_from_hf_dict(hf, keys=keys)[0], where
    from lmlab.checkpoints import gguf

    if hasattr(gguf, "read_gguf_metadata") and hasattr(gguf, "gguf_config"):  # metadata only, no tensor data
        return gguf.gguf_config(gguf.read_gguf_metadata(where.path)), where
    return gguf.read_gguf(where.path)[0], where


def load_tokenizer(source: str | Path):
    """The tokenizer that belongs with `source` (same resolution rules as ``load_model``)."""
    from lmlab.tokenizer import Tokenizer

    where = resolve(source, need="tokenizer")
    if where.kind == "gguf":
        return Tokenizer.from_gguf(where.path)
    return Tokenizer.from_dir(where.path)


def from_hf_model(hf_model) -> "torch.nn.Module":
    """Convert an in-memory ``transformers`` model (GPT-2, LLaMA/Mistral/Qwen2, BERT, T5) to a Transformer.

    Uses ``hf_model.config.to_dict()`` and ``hf_model.state_dict()``; the result is fp32, in eval mode.
    """
    hf = hf_model.config.to_dict()
    if not hf.get("architectures"):
        hf["architectures"] = [type(hf_model).__name__]
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    cfg, family = hf_format.config_from_hf_dict(hf, keys=state.keys())
    return hf_format.convert_state_to_lmlab(state, cfg, family, torch.float32, source=type(hf_model).__name__)


# --- writing -------------------------------------------------------------------------------------

def _atomic_dir(directory: Path, write) -> Path:
    """Run write(tmp_dir) in a sibling temp dir, then move it into place; nothing is left on failure."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        _default_permissions(tmp)
        if directory.exists():
            backup = directory.with_name(f".{directory.name}.old-{tmp.name[-8:]}")
            directory.rename(backup)
            tmp.rename(directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _default_permissions(directory: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; give the result the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _save_tokenizer(tokenizer, directory: Path) -> None:
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save"):
        tokenizer.save(directory)
    else:
        raise CheckpointError(f"cannot save tokenizer of type {type(tokenizer).__name__}: it has no save(directory)")


def save_model(model, directory: str | Path, tokenizer=None) -> Path:
    """Save in lmlab's format (config.json with ``lmlab_format`` + model.safetensors), atomically."""
    def write(tmp: Path) -> None:
        native.write(model, tmp)
        _save_tokenizer(tokenizer, tmp)

    return _atomic_dir(Path(directory), write)


def export_hf(model, directory: str | Path, tokenizer=None) -> Path:
    """Write a Hugging Face directory (config.json + model.safetensors) for the model's family, atomically."""
    cfg = model.config
    family = hf_format.family_for_config(cfg)
    hf_config = {**family.config_to_hf(cfg), "torch_dtype": str(model.dtype).removeprefix("torch.")}
    state = family.to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        native.write_safetensors(state, tmp / "model.safetensors", {"format": "pt"})
        _save_tokenizer(tokenizer, tmp)

    return _atomic_dir(Path(directory), write)


def export_source(source: str | Path, directory: str | Path, with_tokenizer: bool = True) -> Path:
    """Load any supported source and write it as a Hugging Face directory (with its tokenizer when it has one)."""
    model = load_model(source)
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = load_tokenizer(source)
        except (CheckpointError, ImportError, OSError):
            tokenizer = None  # a checkpoint without tokenizer files exports weights only
    return export_hf(model, directory, tokenizer)


# --- describing a model (lmlab info) -------------------------------------------------------------


def describe(source: str | Path) -> dict:
    """Architecture, size, context and memory needs of a source, from its config alone where possible.

    Memory figures are the weights only (parameters x bytes per parameter). The KV cache figure is the
    decoder self-attention cache per token in fp32: layers x 2 (k and v) x kv_heads x head_dim x 4 bytes.
    """
    cfg, where = load_config(source)
    try:
        family = hf_format.family_for_config(cfg).MODEL_TYPES[0]
    except CheckpointError:
        family = "lmlab"
    if cfg.extra.get("hf_model_type"):
        family = cfg.extra["hf_model_type"]
    elif where.kind == "gguf":
        family = "llama (gguf)"
    total = cfg.num_parameters()
    no_embed = total - cfg.vocab_size * cfg.d_model
    kv_per_token = int(kv_cache_bytes(cfg, batch=1, seq_len=1, encoder_len=0))  # decoder self-attention only
    layers = (f"{cfg.n_layers} encoder + {cfg.n_decoder_layers} decoder" if cfg.arch == "encoder_decoder"
              else str(cfg.n_layers))
    return {
        "source": str(source), "resolved": str(where.path), "format": where.kind, "arch": cfg.arch,
        "family": family, "layers": layers, "d_model": cfg.d_model, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "d_ff": cfg.d_ff, "positional": cfg.positional,
        "norm": f"{cfg.norm} ({cfg.norm_position})", "activation": cfg.activation + (" (gated)" if cfg.gated_ffn else ""),
        "parameters": total, "parameters_without_embeddings": no_embed, "context_length": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "weights_bytes": {"fp32": total * 4, "bf16": total * 2, "int8": total},
        "kv_cache_bytes_per_token_fp32": kv_per_token,
        "quantization": _describe_quantization(where),
    }


def _describe_quantization(where: Resolved) -> str:
    """At which precision the weights run: a quantized checkpoint's layers, or a GGUF's block types."""
    from lmlab.quant.model import QUANT_FILE, describe_quantization

    if where.kind == "lmlab" and (where.path / QUANT_FILE).exists():
        return describe_quantization(json.loads((where.path / QUANT_FILE).read_text()))
    if where.kind == "gguf":
        from lmlab.checkpoints.gguf import read_gguf_metadata
        from lmlab.quant.gguf import FLOAT_TYPES, NATIVE_TYPES

        types = read_gguf_metadata(where.path).get("gguf.tensor_types", [])
        counts = {t: types.count(t) for t in dict.fromkeys(types)}
        listed = ", ".join(f"{n} {t}" for t, n in counts.items())
        other = [t for t in counts if t not in NATIVE_TYPES + FLOAT_TYPES]
        if other:
            return f"GGUF tensors {listed}; {', '.join(other)} have no native kernel: runs dequantized to fp32"
        if any(t in NATIVE_TYPES for t in counts):
            return (f"GGUF tensors {listed}; runs at the file's own precision with --quantize native "
                    f"(int4/int8 kernels), else dequantized to fp32")
        return f"GGUF tensors {listed} (float)"
    return "none (float weights)"


def format_description(info: dict) -> str:
    """The human-readable table `lmlab info` prints."""
    w = info["weights_bytes"]
    kv = info["kv_cache_bytes_per_token_fp32"]
    rows = [
        ("source", f"{info['source']} -> {info['resolved']} ({info['format']})"),
        ("architecture", f"{info['arch']}, family {info['family']}"),
        ("layers", info["layers"]),
        ("d_model", info["d_model"]),
        ("heads / kv heads", f"{info['heads']} / {info['kv_heads']}"),
        ("head_dim", info["head_dim"]),
        ("d_ff", info["d_ff"]),
        ("positional", info["positional"]),
        ("norm", info["norm"]),
        ("activation", info["activation"]),
        ("parameters", f"{info['parameters']:,} ({format_count(info['parameters'])}); "
                       f"{info['parameters_without_embeddings']:,} without embeddings"),
        ("context length", f"{info['context_length']:,} tokens"),
        ("vocabulary", f"{info['vocab_size']:,} tokens"),
        ("weights memory", f"fp32 {format_bytes(w['fp32'])}, bf16 {format_bytes(w['bf16'])}, int8 {format_bytes(w['int8'])}"),
        ("KV cache (fp32)", f"{kv:,} bytes/token ({format_bytes(kv)}); "
                            f"{format_bytes(kv * info['context_length'])} at full context" if kv else "none (no decoder)"),
        ("quantization", info.get("quantization", "none (float weights)")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
