"""Shared machinery for Hugging Face checkpoints: key maps, strict loading, reading and writing files.

A family module (``hf_gpt2``, ``hf_llama``, ``hf_bert``, ``hf_t5``) is a declarative key map plus a few
tensor transforms, registered in ``families``. This module applies those maps (with per-layer ``{i}``
patterns), reads ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` (sharded or not) and
checks every key and shape before anything is copied. It imports no family module: the families import
it for its helpers and register themselves (``lmlab.checkpoints.families``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.nn.modules.module import register_module_parameter_registration_hook
from tqdm.auto import tqdm

from lmlab.checkpoints.families import config_from_hf_dict, family_for_config  # noqa: F401 (peft.py uses the 2nd)
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.model import Transformer

# HF activation names -> lmlab's (``gelu_new`` and ``gelu_pytorch_tanh`` are the tanh approximation)
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
LMLAB_TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def activation_from_hf(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise CheckpointError(f"hidden_act={name!r} is not supported; supported: {', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


# --- key maps ------------------------------------------------------------------------------------
# A key map is a list of (hf_pattern, lmlab_pattern) pairs; "{i}" stands for a layer index.

def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def rename_keys(state: dict[str, torch.Tensor], key_map: Iterable[tuple[str, str]],
                ignore: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Rename `state` keys from the left patterns of `key_map` to the right ones.

    Keys matching an `ignore` regex are dropped (buffers such as GPT-2's ``attn.bias``); keys matching no
    pattern are kept under their own name, so the strict check reports them as unexpected.
    """
    compiled = [(_compile(src), dst) for src, dst in key_map]
    ignored = [re.compile(pattern) for pattern in ignore]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if any(pattern.search(key) for pattern in ignored):
            continue
        for regex, dst in compiled:
            match = regex.match(key)
            if match:
                out[dst.replace("{i}", match.group("i")) if "{i}" in dst else dst] = tensor
                break
        else:
            out[key] = tensor
    return out


def invert(key_map: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(dst, src) for src, dst in key_map]


# --- strict loading ------------------------------------------------------------------------------

def _shape(t) -> str:
    return "(" + ", ".join(str(d) for d in t) + ")"


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing/unexpected key and shape mismatch (before copying)."""
    expected = model.state_dict()
    tied = getattr(model.config, "tie_embeddings", False) and getattr(model, "lm_head", None) is not None
    optional = {"lm_head.weight"} if tied else set()
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing key(s) {', '.join(missing[:8])}" + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected key(s) {', '.join(unexpected[:8])}"
                        + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            problems.append(f"key {key}: checkpoint has shape {_shape(tensor.shape)}, "
                            f"model expects {_shape(expected[key].shape)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
               assign: bool = False) -> None:
    """Strictly copy `state` (lmlab names) into `model`, keeping the model's dtype.

    ``assign=True`` makes the state's tensors the parameters instead (for a model built on the meta
    device, ``parameterless_model``); a tied head is re-tied to the embedding it shares.
    """
    check_state(model, state, source)
    tied = getattr(model.config, "tie_embeddings", False) and model.lm_head is not None
    if tied and "lm_head.weight" in state:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied: tok_embed is the source
    model.load_state_dict(state, strict=False, assign=assign)
    if tied and assign:
        model.lm_head.weight = model.tok_embed.weight


# --- converting ----------------------------------------------------------------------------------

def convert_state_to_lmlab(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, family: ModuleType,
                           dtype: torch.dtype = torch.float32, source: str = "checkpoint"):
    """Build a Transformer for `cfg` and fill it from an HF state dict (strict)."""
    state = family.to_lmlab(hf_state, cfg)
    head, embed = state.get("lm_head.weight"), state.get("tok_embed.weight")
    if cfg.tie_embeddings and head is not None and embed is not None and not torch.equal(head, embed):
        # a stored head that differs from the embeddings is its own matrix (transformers 5 does the same)
        cfg = cfg.replace(tie_embeddings=False)
    return build_model(cfg, state, dtype, source)


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                source: str = "checkpoint"):
    """A Transformer for `cfg` holding `state` (lmlab names), cast to `dtype`, in eval mode.

    Weights go in as fp32 and are cast once at the end, so every source rounds the same way. The model is
    built with its parameters on the meta device and then *takes* the state's tensors (``assign``) instead
    of copying them into freshly initialised ones: no random initialisation (13 s for SmolLM2-135M on one
    loaded core) and no second copy of the weights (peak RSS while loading was state + model, 2x).
    """
    model = parameterless_model(cfg)
    load_state(model, {k: _own_storage(v.to(torch.float32)) for k, v in state.items()}, source, assign=True)
    model = model.to(dtype).eval()
    release_free_heap()
    return model


def parameterless_model(cfg: ModelConfig):
    """A Transformer for `cfg` whose parameters live on the meta device (no memory, no initialisation).

    Buffers stay real: RoPE's ``inv_freq`` and the sinusoidal table are computed from the config, not
    loaded. Fill the parameters with ``load_state(..., assign=True)``.
    """
    def to_meta(module, name, param):
        if param is not None and param.device.type != "meta":  # already-meta ones: tying keeps the same object
            return torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        return None

    handle = register_module_parameter_registration_hook(to_meta)  # process-wide while the model is built
    try:
        return Transformer(cfg)
    finally:
        handle.remove()


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as a contiguous tensor owning its whole storage: a converter's split or transpose is a view
    of a larger tensor, and a parameter that keeps it would keep the whole (and share memory on save)."""
    whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole else tensor.clone(memory_format=torch.contiguous_format)


def release_free_heap() -> None:
    """Return the heap memory the C allocator kept after large frees to the OS (glibc's ``malloc_trim``).

    Loading frees hundreds of MB of temporaries (dequantized blocks, per-tensor copies); glibc keeps such
    freed pages resident for reuse, so without this the RSS stays ~400 MB above the model's size after
    loading SmolLM2-135M from its GGUF. A no-op where the C library has no ``malloc_trim`` (macOS, musl).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- files ---------------------------------------------------------------------------------------

def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: model.safetensors, its sharded index, or pytorch_model.bin (+ index)."""
    directory = Path(directory)
    single = directory / "model.safetensors"
    if single.exists():
        return read_safetensors(single)
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", read_torch_bin)):
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"cannot read {index}: {exc}") from None
            state: dict[str, torch.Tensor] = {}
            shards = sorted(set(weight_map.values()))
            for shard in tqdm(shards, desc=f"reading {directory.name}", unit="shard", disable=len(shards) < 2):
                shard_path = directory / shard
                if not shard_path.exists():
                    raise CheckpointError(f"shard {shard_path} listed in {index} is missing")
                state.update(reader(shard_path))
            return state
    binary = directory / "pytorch_model.bin"
    if binary.exists():
        return read_torch_bin(binary)
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"no config.json in {directory}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"cannot parse {path}: {exc}") from None


def load_hf_dir(directory: str | Path, dtype: torch.dtype = torch.float32):
    """A local HF model directory -> Transformer."""
    directory = Path(directory)
    hf = read_config(directory)
    state = read_weights(directory)
    cfg, family = config_from_hf_dict(hf, keys=state.keys())
    return convert_state_to_lmlab(state, cfg, family, dtype, source=str(directory))


def weight_keys(directory: str | Path) -> list[str] | None:
    """Tensor names of an HF directory without reading the tensors (safetensors header or shard index).

    None when the directory holds no weights (a config-only download): callers fall back on the config.
    """
    directory = Path(directory)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index_name).exists():
            return list(json.loads((directory / index_name).read_text())["weight_map"])
    single = directory / "model.safetensors"
    if single.exists():
        try:
            with safe_open(str(single), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:
            raise CheckpointError(f"cannot read {single}: {type(exc).__name__}: {exc}") from None
    if (directory / "pytorch_model.bin").exists():
        return list(read_weights(directory))
    return None
