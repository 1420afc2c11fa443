"""ModelConfig: one typed, validated description of every Transformer lmlab builds.

One config covers the three variants:

* ``arch="encoder"``          BERT-style: bidirectional stack, optional MLM head.
* ``arch="decoder"``          GPT / LLaMA-style: causal stack, LM head.
* ``arch="encoder_decoder"``  T5 / original Transformer: encoder + causal decoder with cross-attention.

Each part is chosen by a string field and resolved in one place (``lmlab.nn.build_*``); nothing
branches on a model's name. Derived fields (``n_kv_heads``, ``head_dim``, ``n_decoder_layers``) are
filled in ``__post_init__`` so the stored config is always complete. This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError, choices_error

ARCHS = ("encoder", "decoder", "encoder_decoder")
POSITIONALS = ("sinusoidal", "learned", "rope", "t5_relative", "none")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
HEADS = ("lm", "mlm", "none")
ROPE_SCALINGS = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    # --- shape -------------------------------------------------------------------------------
    arch: str = "decoder"
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 6  # encoder layers (encoder, encoder_decoder) or decoder layers (decoder)
    n_decoder_layers: int | None = None  # encoder_decoder only; defaults to n_layers
    n_heads: int = 8
    n_kv_heads: int | None = None  # grouped-query attention when < n_heads; defaults to n_heads
    head_dim: int | None = None  # defaults to d_model // n_heads (T5 sets it independently)
    d_ff: int = 2048
    max_seq_len: int = 1024

    # --- positions ---------------------------------------------------------------------------
    positional: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    rel_num_buckets: int = 32  # T5 relative-position bias
    rel_max_distance: int = 128

    # --- normalisation -----------------------------------------------------------------------
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm only
    norm_position: str = "pre"  # "pre" (GPT-2, LLaMA, T5) or "post" (BERT, original Transformer)
    final_norm: bool = True  # norm after the last block of each stack (pre-norm models)
    embed_norm: bool = False  # norm right after the embeddings (BERT)

    # --- feed-forward ------------------------------------------------------------------------
    activation: str = "silu"
    gated_ffn: bool = True  # act(gate(x)) * up(x): SwiGLU with silu, gated-GELU with gelu/gelu_tanh
    ffn_bias: bool = False

    # --- attention ---------------------------------------------------------------------------
    attn_bias: bool = False  # bias on the q/k/v projections
    attn_out_bias: bool | None = None  # bias on the output projection; defaults to attn_bias
    attn_scale: float | None = None  # None: 1/sqrt(head_dim); T5 uses 1.0 (scaling folded into init)

    # --- embeddings and head -----------------------------------------------------------------
    embed_scale: bool = False  # multiply token embeddings by sqrt(d_model) (original Transformer)
    type_vocab_size: int = 0  # BERT token-type (segment) embeddings when > 0
    tie_embeddings: bool = True
    head: str = "lm"  # "lm": logits; "mlm": dense+act+norm transform then logits; "none": hidden states
    lm_head_bias: bool = False
    head_input_scale: float = 1.0  # T5 with tied embeddings scales the decoder output by d_model**-0.5

    # --- regularisation ----------------------------------------------------------------------
    dropout: float = 0.0
    attn_dropout: float = 0.0

    # --- special tokens ----------------------------------------------------------------------
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    decoder_start_token_id: int | None = None
    mask_token_id: int | None = None

    # --- bookkeeping -------------------------------------------------------------------------
    name: str = ""  # informational only; never used to choose behaviour
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (source format, hf model_type, ...)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise choices_error("arch", self.arch, ARCHS)
        if self.positional not in POSITIONALS:
            raise choices_error("positional", self.positional, POSITIONALS)
        if self.norm not in NORMS:
            raise choices_error("norm", self.norm, NORMS)
        if self.norm_position not in NORM_POSITIONS:
            raise choices_error("norm_position", self.norm_position, NORM_POSITIONS)
        if self.activation not in ACTIVATIONS:
            raise choices_error("activation", self.activation, ACTIVATIONS)
        if self.head not in HEADS:
            raise choices_error("head", self.head, HEADS)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (grouped-query attention)"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    f"pick n_heads dividing {self.d_model} or set head_dim explicitly"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.positional == "rope" and self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary position embeddings")
        if self.arch == "encoder_decoder":
            if self.n_decoder_layers is None:
                self.n_decoder_layers = self.n_layers
        elif self.n_decoder_layers is not None:
            raise ConfigError(f"n_decoder_layers={self.n_decoder_layers} is only valid with arch='encoder_decoder'")
        if self.attn_out_bias is None:
            self.attn_out_bias = self.attn_bias
        if self.arch != "encoder" and self.head == "none":
            raise ConfigError(f"head='none' is only valid for arch='encoder' (got arch={self.arch!r})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ROPE_SCALINGS:
                raise choices_error("rope_scaling.rope_type", kind, ROPE_SCALINGS)
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name}={value!r} must be in [0, 1)")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps={self.norm_eps!r} must be > 0")

    # --- derived -----------------------------------------------------------------------------
    @property
    def has_encoder(self) -> bool:
        return self.arch in ("encoder", "encoder_decoder")

    @property
    def has_decoder(self) -> bool:
        return self.arch in ("decoder", "encoder_decoder")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def num_parameters(self) -> int:
        """Parameter count computed from the config alone (matches ``Transformer.num_parameters()``)."""
        d, hd = self.d_model, self.head_dim
        q_out, kv_out = self.n_heads * hd, self.n_kv_heads * hd

        def norm() -> int:
            return d * (2 if self.norm == "layernorm" and self.norm_bias else 1)

        def attn(cross: bool) -> int:
            n = d * q_out + 2 * d * kv_out + q_out * d
            if self.attn_bias:
                n += q_out + 2 * kv_out
            if self.attn_out_bias:
                n += d
            return n

        def ffn() -> int:
            n = d * self.d_ff * (3 if self.gated_ffn else 2)
            if self.ffn_bias:
                n += self.d_ff * (2 if self.gated_ffn else 1) + d
            return n

        def stack(n_layers: int, cross: bool, causal: bool) -> int:
            per = attn(False) + ffn() + 2 * norm() + ((attn(True) + norm()) if cross else 0)
            n = n_layers * per
            if self.final_norm:
                n += norm()
            if self.positional == "t5_relative":
                n += self.rel_num_buckets * self.n_heads
            return n

        total = self.vocab_size * d
        if self.positional == "learned":
            total += self.max_seq_len * d
        total += self.type_vocab_size * d
        if self.embed_norm:
            total += norm()
        if self.arch == "encoder":
            total += stack(self.n_layers, False, False)
        elif self.arch == "decoder":
            total += stack(self.n_layers, False, True)
        else:
            total += stack(self.n_layers, False, False) + stack(self.n_decoder_layers, True, True)
        if self.head == "mlm":
            total += d * d + d + norm()
        if self.head in ("lm", "mlm"):
            if not self.tie_embeddings:
                total += self.vocab_size * d
            if self.lm_head_bias:
                total += self.vocab_size
        return total

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s): {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "ModelConfig":
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """Build a preset by name (see ``PRESETS``), with field overrides."""
        if name not in PRESETS:
            raise choices_error("preset", name, sorted(PRESETS))
        data = dict(PRESETS[name])
        data.update(overrides)
        data.setdefault("name", name)
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "ModelConfig":
        data = self.to_dict()
        data.update(changes)
        # derived fields are re-derived unless explicitly changed
        for derived in ("n_kv_heads", "head_dim", "attn_out_bias"):
            if derived not in changes and any(k in changes for k in ("n_heads", "d_model", "attn_bias")):
                data[derived] = None
        return ModelConfig.from_dict(data)


# --- presets -------------------------------------------------------------------------------------
# Model builders supply numbers only. Families differ by which parts they pick.

_GPT2 = dict(
    arch="decoder", positional="learned", norm="layernorm", norm_eps=1e-5, norm_position="pre",
    activation="gelu_tanh", gated_ffn=False, ffn_bias=True, attn_bias=True, tie_embeddings=True,
)
_LLAMA = dict(
    arch="decoder", positional="rope", norm="rmsnorm", norm_eps=1e-5, norm_position="pre",
    activation="silu", gated_ffn=True, ffn_bias=False, attn_bias=False,
)
_BERT = dict(
    arch="encoder", positional="learned", norm="layernorm", norm_eps=1e-12, norm_position="post",
    final_norm=False, embed_norm=True, activation="gelu", gated_ffn=False, ffn_bias=True, attn_bias=True,
    type_vocab_size=2, head="mlm", lm_head_bias=True, tie_embeddings=True,
)
_T5 = dict(
    arch="encoder_decoder", positional="t5_relative", norm="rmsnorm", norm_eps=1e-6, norm_position="pre",
    activation="relu", gated_ffn=False, ffn_bias=False, attn_bias=False, attn_scale=1.0,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
_VASWANI = dict(  # "Attention Is All You Need": sinusoidal positions, post-norm, ReLU, shared scaled embeddings
    arch="encoder_decoder", positional="sinusoidal", norm="layernorm", norm_eps=1e-6, norm_position="post",
    final_norm=False, activation="relu", gated_ffn=False, ffn_bias=True, attn_bias=True, embed_scale=True,
    tie_embeddings=True, head_input_scale=1.0,
)

PRESETS: dict[str, dict[str, Any]] = {
    # tiny shapes for tests and smoke runs
    "tiny-decoder": dict(_LLAMA, vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128),
    "tiny-encoder": dict(_BERT, vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=128),
    "tiny-encoder-decoder": dict(_T5, activation="gelu_tanh", gated_ffn=True, tie_embeddings=False, vocab_size=256,
                                 d_model=64, n_layers=2, n_heads=4, head_dim=16, d_ff=128, max_seq_len=128),
    # ~10M-parameter models that train on this CPU in minutes
    "decoder-10m": dict(_LLAMA, vocab_size=8192, d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=704,
                        max_seq_len=256, tie_embeddings=True),
    "encoder-10m": dict(_BERT, vocab_size=8192, d_model=256, n_layers=8, n_heads=8, d_ff=1024, max_seq_len=256),
    "encoder-decoder-10m": dict(_T5, activation="gelu_tanh", gated_ffn=True, tie_embeddings=False, vocab_size=8192,
                                d_model=256, n_layers=4, n_heads=4, head_dim=64, d_ff=640, max_seq_len=256),
    # reference shapes
    "gpt2-124m": dict(_GPT2, vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024,
                      bos_token_id=50256, eos_token_id=50256),
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                         max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True, bos_token_id=1, eos_token_id=2),
    "bert-base": dict(_BERT, vocab_size=30522, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=512,
                      pad_token_id=0),
    "t5-small": dict(_T5, vocab_size=32128, d_model=512, n_layers=6, n_heads=8, head_dim=64, d_ff=2048,
                     max_seq_len=512, tie_embeddings=True, head_input_scale=512 ** -0.5),
    "flan-t5-base": dict(_T5, activation="gelu_tanh", gated_ffn=True, tie_embeddings=False, vocab_size=32128,
                         d_model=768, n_layers=12, n_heads=12, head_dim=64, d_ff=2048, max_seq_len=512),
    "transformer-base": dict(_VASWANI, vocab_size=37000, d_model=512, n_layers=6, n_heads=8, d_ff=2048,
                             max_seq_len=512, dropout=0.1),
}

