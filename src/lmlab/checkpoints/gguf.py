"""GGUF (llama.cpp) checkpoints: metadata -> ModelConfig, tensors -> lmlab parameter names.

A GGUF file holds three things, all read here with the `gguf` package's memory-mapped reader:

* key/value metadata (``llama.block_count``, ``tokenizer.ggml.tokens``, ...), which ``gguf_config``
  turns into a ``ModelConfig`` and ``lmlab.tokenizer.Tokenizer.from_gguf`` into a tokenizer;
* tensor descriptions (name, quant type, shape);
* tensor data, possibly block-quantized (Q8_0, Q4_K, ...), dequantized to float by ``read_gguf``.

Two layout details matter for getting the same logits as the original model:

1. GGUF lists dimensions fastest-first (``token_embd.weight`` has shape ``[C, V]``), the reverse of
   PyTorch. The reader's ``.data`` array and ``gguf.quants.dequantize`` already give numpy's
   row-major order, i.e. PyTorch's ``(out_features, in_features)`` / ``(V, C)``, so no transpose is needed.
2. llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` so that each head's rotary
   pairs are interleaved ``(x0, x1), (x2, x3), ...`` (GPT-J style). lmlab, like Hugging Face LLaMA,
   rotates the two halves of each head ``(x_i, x_{i+D/2})``. ``unpermute_qk`` undoes the converter.

Only the ``llama`` architecture is supported (LLaMA 1/2/3, Mistral-style dense models, SmolLM, ...).

Shapes: C d_model (a projection's input width), V vocabulary, H heads of a projection, D head_dim.
"""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from tqdm.auto import tqdm

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.model import Transformer

SUPPORTED_ARCHITECTURES = ("llama",)
# quant types read_gguf can dequantize; names as in gguf.GGMLQuantizationType
SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

# GGUF tensor name -> lmlab parameter name; "{i}" is the block index
_GLOBAL_KEYS = {
    "token_embd.weight": "tok_embed.weight",
    "output_norm.weight": "decoder.final_norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_KEYS = {
    "attn_q.weight": "attn.q.weight",
    "attn_k.weight": "attn.k.weight",
    "attn_v.weight": "attn.v.weight",
    "attn_output.weight": "attn.o.weight",
    "attn_norm.weight": "attn_norm.weight",
    "ffn_gate.weight": "ffn.gate.weight",
    "ffn_up.weight": "ffn.up.weight",
    "ffn_down.weight": "ffn.down.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


# --- reading ---------------------------------------------------------------------------------------
def _open(path: str | Path):
    """A ``gguf.GGUFReader`` over `path`, with the reader's low-level failures turned into CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise CheckpointError(
            f"{path} is truncated or not a GGUF file ({type(exc).__name__}: {exc})"
        ) from None


# GGUF value types (gguf.GGUFValueType) -> struct format of one little-endian scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _HeaderParser:
    """Sequential little-endian reads from the start of a GGUF file, without numpy or tensor data.

    ``gguf.GGUFReader`` builds a numpy view for every array element, which takes seconds for a
    50k-token vocabulary; reading the header with `struct` takes a fraction of that.
    """

    def __init__(self, data: bytes | mmap.mmap):
        self.data, self.pos = data, 0

    def take(self, fmt: str, count: int = 1):
        size = struct.calcsize("<" + fmt) * count
        if count == 0:
            return ()
        if self.pos + size > len(self.data):
            raise EOFError(f"header needs {size} more bytes at offset {self.pos}, file has {len(self.data)}")
        values = struct.unpack_from("<" + (fmt if count == 1 else f"{count}{fmt}"), self.data, self.pos)
        self.pos += size
        return values if count != 1 else values[0]

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.data):
            raise EOFError(f"string of {n} bytes at offset {self.pos} runs past the end ({len(self.data)} bytes)")
        text = self.data[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, n = self.take("I"), self.take("Q")
            if item_kind in _SCALARS:
                return list(self.take(_SCALARS[item_kind], n)) if n else []
            return [self.value(item_kind) for _ in range(n)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self.take(_SCALARS[kind])


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file, parsed from its header alone (no tensor data is read).

    Values are plain Python (str, int, float, bool, lists). Also adds ``"gguf.tensor_names"``, the list
    of tensor names, which ``gguf_config`` needs to decide whether the output projection is tied to the
    embeddings, and ``"gguf.tensor_types"``, their quant type names (``lmlab info`` reports them).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty: truncated or not a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        # the header is read through a memory map: only the pages it spans are touched
        parser = _HeaderParser(data)
        try:
            if parser.take("4s") != b"GGUF":
                raise CheckpointError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
            version = parser.take("I")
            if version not in (2, 3):
                raise CheckpointError(f"{path} has GGUF version {version}; supported: 2, 3")
            n_tensors, n_kv = parser.take("Q"), parser.take("Q")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = parser.string()
                metadata[key] = parser.value(parser.take("I"))
            names, types = [], []
            for _ in range(n_tensors):
                names.append(parser.string())
                parser.take("Q", parser.take("I"))  # dims
                types.append(parser.take("I"))  # quant type
                parser.take("Q")  # data offset
        except (EOFError, ValueError, struct.error) as exc:
            raise CheckpointError(f"{path} is truncated or not a GGUF file ({exc})") from None
    metadata["gguf.tensor_names"] = names
    metadata["gguf.tensor_types"] = [_type_name(t) for t in types]
    return metadata


def _type_name(code: int) -> str:
    """A ggml quant type code -> its name (Q4_1, F32, ...), or the number when gguf does not know it."""
    try:
        return gguf.GGMLQuantizationType(code).name
    except ValueError:
        return str(code)


def _f32(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def gguf_config(metadata: dict[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` a llama-architecture GGUF describes.

    Reads ``{arch}.embedding_length / block_count / attention.head_count(_kv) / feed_forward_length /
    context_length / rope.freq_base / attention.layer_norm_rms_epsilon / rope.scaling.*``; the vocabulary
    size is the length of ``tokenizer.ggml.tokens``; special ids come from ``tokenizer.ggml.*_token_id``.
    Embeddings are tied when the file has no ``output.weight``.
    """
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = ...) -> Any:
        full = f"{arch}.{key}"
        if full in metadata:
            return metadata[full]
        if default is ...:
            raise CheckpointError(f"GGUF metadata is missing {full!r}")
        return default

    if "tokenizer.ggml.tokens" in metadata:
        vocab_size = len(metadata["tokenizer.ggml.tokens"])
    else:
        vocab_size = get("vocab_size")
    d_model, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = get("attention.key_length", None) or get("rope.dimension_count", None) or d_model // n_heads
    if head_dim != d_model // n_heads and get("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(
            f"partial rotary embeddings (rope.dimension_count={get('rope.dimension_count')} < head_dim={head_dim}) "
            "are not supported"
        )

    rope_scaling = None
    scaling_type = get("rope.scaling.type", None)
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise CheckpointError(f"GGUF rope.scaling.type={scaling_type!r} is not supported; supported: none, linear")
        rope_scaling = {"rope_type": "linear", "factor": _f32(get("rope.scaling.factor"))}

    tensor_names = metadata.get("gguf.tensor_names")
    tie = tensor_names is not None and "output.weight" not in tensor_names

    def token_id(name: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{name}_token_id")
        return int(value) if value is not None else None

    return ModelConfig(
        arch="decoder", positional="rope", norm="rmsnorm", norm_position="pre", activation="silu",
        gated_ffn=True, ffn_bias=False, attn_bias=False,
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(head_dim),
        d_ff=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length", 2048)),
        rope_theta=_f32(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=tie,
        bos_token_id=token_id("bos"),
        eos_token_id=token_id("eos"),
        pad_token_id=token_id("padding"),
        name=str(metadata.get("general.name", "")),
        extra={"source_format": "gguf", "gguf_architecture": arch,
               "gguf_file_type": metadata.get("general.file_type")},
    )


# --- tensors ---------------------------------------------------------------------------------------
def lmlab_key(gguf_name: str) -> str | None:
    """The lmlab parameter name for a GGUF tensor name, or None if lmlab has no such parameter."""
    if gguf_name in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[gguf_name]
    match = _BLOCK_RE.match(gguf_name)
    if match and match.group(2) in _BLOCK_KEYS:
        return f"decoder.layers.{match.group(1)}.{_BLOCK_KEYS[match.group(2)]}"
    return None


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: interleaved rotary pairs -> half-split (HF) layout.

    The converter wrote, per head, rows ``[r0, r_{D/2}, r1, r_{D/2+1}, ...]``; we restore ``[r0, r1, ..., r_{D-1}]``.
    `n_heads` is the number of heads in this projection (n_kv_heads for k).
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads  # D
    pairs = weight.reshape(n_heads, head_dim // 2, 2, in_features)  # (H, D/2, 2, C): row pairs as stored
    return pairs.transpose(1, 2).reshape(out_features, in_features)  # (H, 2, D/2, C) -> (H*D, C)


def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter permutation (the inverse of ``unpermute_qk``); used to write GGUF files."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads  # D
    halves = weight.reshape(n_heads, 2, head_dim // 2, in_features)  # (H, 2, D/2, C): the two rotary halves
    return halves.transpose(1, 2).reshape(out_features, in_features)  # (H, D/2, 2, C) -> (H*D, C)


def dequantize_tensor(tensor, path: str | Path = "") -> np.ndarray:
    """A reader tensor as a float32 numpy array in PyTorch layout (rows = GGUF's last dimension)."""
    qtype = tensor.tensor_type.name
    if qtype not in SUPPORTED_QUANT_TYPES:
        raise CheckpointError(
            f"tensor {tensor.name!r} in {path} has quant type {qtype}, which lmlab cannot dequantize; "
            f"supported: {', '.join(SUPPORTED_QUANT_TYPES)}"
        )
    array = dequantize(tensor.data, tensor.tensor_type)
    # GGUF shape is fastest-first; PyTorch/numpy shape is the reverse
    expected = tuple(int(n) for n in reversed(tensor.shape))
    # a copy: F32/F16 data would otherwise be a read-only view into the memory-mapped file
    return np.array(array, dtype=np.float32, copy=True).reshape(expected)


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32,
              progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a llama-architecture GGUF -> (config, state dict with lmlab keys, metadata).

    Every tensor is dequantized to float32 and then cast to `dtype`; q/k rows are un-permuted
    (see the module docstring). Tied models (no ``output.weight``) have no ``lm_head.weight`` entry:
    ``load_gguf_model`` shows how to load the state dict strictly. Unsupported quant types are reported
    before any tensor is dequantized.
    """
    metadata = read_gguf_metadata(path)
    cfg = gguf_config(metadata)
    unknown = [name for name in metadata["gguf.tensor_names"] if lmlab_key(name) is None]
    if unknown:
        raise CheckpointError(
            f"{path} has tensors lmlab's llama layout has no place for: {', '.join(unknown[:8])}"
            + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        )

    reader = _open(path)
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in SUPPORTED_QUANT_TYPES:
            dequantize_tensor(tensor, path)  # raises the CheckpointError naming tensor and type
    state: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc=f"reading {Path(path).name}", unit="tensor", disable=not progress,
                       leave=False):
        try:
            array = dequantize_tensor(tensor, path)
        except CheckpointError:
            raise
        except Exception as exc:  # data region shorter than the header promises, bad block sizes, ...
            raise CheckpointError(
                f"{path} is truncated or not a valid GGUF file: cannot read tensor {tensor.name!r} "
                f"({type(exc).__name__}: {exc})"
            ) from None
        weight = torch.from_numpy(array)
        if tensor.name.endswith("attn_q.weight"):
            weight = unpermute_qk(weight, cfg.n_heads)
        elif tensor.name.endswith("attn_k.weight"):
            weight = unpermute_qk(weight, cfg.n_kv_heads)
        state[lmlab_key(tensor.name)] = weight.to(dtype)

    _check_shapes(cfg, state, path)
    return cfg, state, metadata


def _check_shapes(cfg: ModelConfig, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Every parameter the config implies is present with the right shape."""
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    expected = {"tok_embed.weight": (V, C), "decoder.final_norm.weight": (C,)}
    if not cfg.tie_embeddings:
        expected["lm_head.weight"] = (V, C)
    for i in range(cfg.n_layers):
        prefix = f"decoder.layers.{i}."
        expected.update({
            prefix + "attn.q.weight": (q_out, C), prefix + "attn.k.weight": (kv_out, C),
            prefix + "attn.v.weight": (kv_out, C),
            prefix + "attn.o.weight": (C, q_out), prefix + "attn_norm.weight": (C,), prefix + "ffn_norm.weight": (C,),
            prefix + "ffn.gate.weight": (F, C), prefix + "ffn.up.weight": (F, C), prefix + "ffn.down.weight": (C, F),
        })
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path} is missing tensors for: {', '.join(missing[:8])}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{path} has tensors beyond block_count={cfg.n_layers}: {', '.join(extra[:8])}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"tensor {key!r} in {path} has shape {tuple(state[key].shape)}, expected {shape}")


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True):
    """A ready ``lmlab.model.Transformer`` (eval mode) with the weights of a GGUF file."""
    cfg, state, _ = read_gguf(path, dtype=dtype, progress=progress)
    model = Transformer(cfg)
    if cfg.tie_embeddings:  # the tied head shares the embedding's storage; state_dict lists it under both names
        state = {**state, "lm_head.weight": state["tok_embed.weight"]}
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a GGUF file from its metadata alone (no tensor data read)."""
    return gguf_config(read_gguf_metadata(path))
