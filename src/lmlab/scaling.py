"""Back-of-the-envelope scaling: memory for inference and training, and Chinchilla compute-optimal plans.

Everything here is arithmetic on a ``ModelConfig`` (no torch, no weights), so `lmlab plan` answers
"does it fit?" and "how big, how long?" before anything is allocated.

Notation (used in every formula below): N parameters, D training tokens, C training FLOPs,
b batch size, s sequence length, h d_model, a attention heads, L layers, V vocabulary, f d_ff,
q = n_heads * head_dim (query width), k = n_kv_heads * head_dim (key/value width), p bytes per element.

Sources
* Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models" (arXiv:2205.05198), section 4.1: a GPT layer stores ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit.
* Model states and sharding: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
  Trillion Parameter Models" (arXiv:1910.02054), section 3.1 (2 + 2 + 12 bytes/param for mixed-precision
  Adam) and section 5 (what ZeRO-1/2/3 partition); PyTorch FSDP ``FULL_SHARD`` is ZeRO-3.
* Compute-optimal training: Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"
  (arXiv:2203.15556): C = 6*N*D, D ~ 20*N, and the parametric fit L(N, D) = E + A/N^alpha + B/D^beta.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError, choices_error

# bytes per element of a weight / activation / cache dtype; int4 ignores block-scale overhead
# (GGUF Q4_1 stores ~5 bits per weight, so real int4 files are ~25% larger than this estimate)
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
OPTIMIZERS = ("adamw", "sgd", "sgd-momentum")
STRATEGIES = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp")
ATTENTION_KERNELS = ("flash", "eager")


# --- human-readable numbers ------------------------------------------------------------------------

_COUNT_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}
_BYTE_SUFFIX = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
                "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*"


def parse_count(text: str | float | int, what: str = "value") -> float:
    """'125M' -> 1.25e8, '2.5B' -> 2.5e9, '1e21' -> 1e21, '989T' -> 9.89e14 (K/M/B|G/T/P, powers of 1000)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(_NUMBER + r"([a-zA-Z]?)\s*", str(text))
        if not m or m.group(2).upper() not in _COUNT_SUFFIX:
            raise ConfigError(f"{what}={text!r} is not a number; use e.g. 125M, 2.5B, 1.4T or 1e21 "
                              f"(suffixes: {', '.join(s for s in _COUNT_SUFFIX if s)})")
        value = float(m.group(1)) * _COUNT_SUFFIX[m.group(2).upper()]
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{what}={text!r} must be a positive number")
    return value


def parse_bytes(text: str | float | int, what: str = "memory") -> float:
    """'80GiB' -> 80 * 2**30, '80GB' -> 80e9, '24 GiB', '1024' (bytes). Binary (KiB..TiB) or decimal (KB..TB)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(_NUMBER + r"([a-zA-Z]*)\s*", str(text))
        unit = (m.group(2) or "B").upper() if m else ""
        if not m or unit not in _BYTE_SUFFIX:
            raise ConfigError(f"{what}={text!r} is not a size; use e.g. 80GiB, 24GB or 512MiB")
        value = float(m.group(1)) * _BYTE_SUFFIX[unit]
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{what}={text!r} must be a positive size")
    return value


def format_bytes(n: float) -> str:
    """Binary units: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_count(n: float) -> str:
    """Decimal suffixes: 1.25e8 -> '125.0M', 1.4e12 -> '1.40T'."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def format_flops(n: float) -> str:
    return f"{n:.3g} FLOPs"


def format_duration(seconds: float) -> str:
    """Seconds in the largest sensible unit: '3.2 h', '41.5 days', '2.1 years'."""
    for div, unit in ((365.25 * 86400, "years"), (86400, "days"), (3600, "h"), (60, "min")):
        if seconds >= div:
            return f"{seconds / div:.1f} {unit}"
    return f"{seconds:.1f} s"


# --- shapes read off the config -------------------------------------------------------------------

def _check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    return value


def _choice(name: str, value: str, valid) -> str:
    if value not in valid:
        raise choices_error(name, value, valid)
    return value


def _decoder_layers(cfg: ModelConfig) -> int:
    if not cfg.has_decoder:
        return 0
    return cfg.n_decoder_layers if cfg.arch == "encoder_decoder" else cfg.n_layers


def _block_parameters(cfg: ModelConfig, field: str) -> int:
    """Parameters of one block of the stack whose depth is ``field``: the growth of N when one is added."""
    return cfg.replace(**{field: getattr(cfg, field) + 1}).num_parameters() - cfg.num_parameters()


def layer_parameters(cfg: ModelConfig) -> int:
    """Parameters of the largest single block (a decoder block with cross-attention if there is one).

    Derived from ``num_parameters()`` so it always agrees with the config.
    """
    return _block_parameters(cfg, "n_decoder_layers" if cfg.arch == "encoder_decoder" else "n_layers")


def non_block_parameters(cfg: ModelConfig) -> int:
    """Parameters outside the blocks: embeddings, final norms, relative-position tables, head."""
    n = cfg.num_parameters() - cfg.n_layers * _block_parameters(cfg, "n_layers")
    if cfg.arch == "encoder_decoder":
        n -= cfg.n_decoder_layers * _block_parameters(cfg, "n_decoder_layers")
    return n


# --- inference --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InferenceMemory:
    """Bytes needed to run a model: weights + KV cache + one forward's activation working set."""

    dtype: str
    batch: int
    seq_len: int
    weights: float
    kv_cache: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations

    def fits(self, gpu_bytes: float) -> bool:
        return self.total <= gpu_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq_len: int, kv_dtype: str = "fp32",
                   encoder_len: int | None = None) -> float:
    """Bytes of a full KV cache.

    self-attention:  2 (k and v) * L_dec * n_kv_heads * head_dim * s * b * p
    cross-attention (encoder-decoder only): the same over the encoder length, cached once per request.
    An encoder-only model keeps no cache (0).
    """
    p = DTYPE_BYTES[_choice("kv_dtype", kv_dtype, DTYPE_BYTES)]
    layers = _decoder_layers(cfg)
    per_position = 2 * layers * cfg.n_kv_heads * cfg.head_dim * batch * p  # k and v, every decoder layer
    total = per_position * seq_len
    if cfg.arch == "encoder_decoder":
        total += per_position * (seq_len if encoder_len is None else encoder_len)
    return total


def inference_memory(cfg: ModelConfig, dtype: str = "fp32", batch: int = 1, seq_len: int | None = None,
                     kv_dtype: str | None = None, attention: str = "flash") -> InferenceMemory:
    """Weights, KV cache and activation working set for a forward pass over ``seq_len`` tokens.

    * weights      N * p_weights (int4 = 0.5 byte/param, no block-scale overhead)
    * KV cache     ``kv_cache_bytes`` at ``kv_dtype`` (default: ``dtype``; fp16 when the weights are int8/int4,
                   which run their activations in 16-bit)
    * activations  without autograd only a few tensors are alive at once; the peak is the FFN:
                   ``b*s*p*(2h + n_f*f)`` (residual stream + its normed copy + the n_f = 1, or 2 when gated,
                   intermediates) plus the logits ``b*s*V*p`` of the full sequence; eager attention adds the
                   score matrix ``b*a*s^2*p`` of one layer (fused SDPA/flash kernels never store it).
    ``seq_len`` defaults to the model's context length.
    """
    _choice("dtype", dtype, DTYPE_BYTES)
    _choice("attention", attention, ATTENTION_KERNELS)
    batch = _check_positive_int("batch", batch)
    seq_len = _check_positive_int("seq_len", cfg.max_seq_len if seq_len is None else seq_len)
    act_dtype = dtype if DTYPE_BYTES[dtype] >= 2 else "fp16"
    kv_dtype = act_dtype if kv_dtype is None else kv_dtype
    p = DTYPE_BYTES[act_dtype]
    n_f = 2 if cfg.gated_ffn else 1
    acts = batch * seq_len * p * (2 * cfg.d_model + n_f * cfg.d_ff)
    if cfg.head != "none":
        acts += batch * seq_len * cfg.vocab_size * p
    if attention == "eager":
        acts += batch * cfg.n_heads * seq_len ** 2 * p
    return InferenceMemory(dtype=dtype, batch=batch, seq_len=seq_len,
                           weights=cfg.num_parameters() * DTYPE_BYTES[dtype],
                           kv_cache=kv_cache_bytes(cfg, batch, seq_len, kv_dtype),
                           activations=float(acts))


# --- training: model states -----------------------------------------------------------------------

def state_bytes_per_param(precision: str = "fp32", optimizer: str = "adamw") -> dict[str, float]:
    """Bytes per parameter of the three model states, before any sharding.

    fp32:        parameters 4, gradients 4, optimizer: AdamW 8 (exp_avg + exp_avg_sq), SGD-momentum 4, SGD 0.
    bf16-mixed / fp16-mixed (ZeRO paper, section 3.1): 16-bit parameters 2 and 16-bit gradients 2, and the
                 optimizer keeps an fp32 master copy 4 + its moments: AdamW 4 + 4 + 4 = 12, SGD-momentum 8,
                 SGD 4. AdamW therefore costs 16 bytes/param either way. (torch.autocast with fp32 parameters
                 splits the same 16 bytes as 4 + 4 + 8; only the sharded terms below would differ.)
    """
    _choice("precision", precision, PRECISIONS)
    moments = {"adamw": 2, "sgd-momentum": 1, "sgd": 0}[_choice("optimizer", optimizer, OPTIMIZERS)]
    if precision == "fp32":
        return {"parameters": 4.0, "gradients": 4.0, "optimizer": 4.0 * moments}
    return {"parameters": 2.0, "gradients": 2.0, "optimizer": 4.0 + 4.0 * moments}


# --- training: activations ------------------------------------------------------------------------

def layer_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, precision: str = "bf16-mixed",
                           attention: str = "eager", cross: bool = False, context_len: int | None = None) -> float:
    """Bytes one block saves for its backward pass (Korthikanti et al. 2022, section 4.1, generalised).

    Per token, in elements of p bytes (p = 2 for 16-bit, 4 for fp32) unless marked "(1 byte)":

    attention   norm input h, q/k/v input h, Q and K for QK^T q + k, softmax output a*s, V k,
                output-projection input q; with dropout also the score dropout mask a*s (1 byte) and its
                output a*s, and the residual dropout mask h (1 byte). A fused kernel (``attention="flash"``,
                what ``F.scaled_dot_product_attention`` runs) keeps V, its output q and a logsumexp
                (a fp32 values) instead of the a*s score tensors.
    feed-forward  norm input h, up input h, then non-gated: act input f + act output f; gated: gate output
                f + up output f + act output f + product f; with dropout the mask h (1 byte).
    cross-attention (decoder of an encoder-decoder) adds a second attention branch whose keys and values
                span ``context_len`` encoder positions.

    For GPT (q = k = h, f = 4h, non-gated, eager attention, dropout everywhere, p = 2) the sum per token is
        attention   2*(h + h + 2h + h + h) + h + (2 + 1 + 2)*a*s  = 13h + 5as
        MLP         2*(h + h + 4h + 4h) + h                       = 21h
        layer       34h + 5as, i.e. the paper's s*b*h*(34 + 5*a*s/h) bytes
    (the paper lists the two norm inputs, 4sbh, on their own line; here each branch counts its own).
    fp32 doubles every term except the 1-byte dropout masks.
    """
    _choice("attention", attention, ATTENTION_KERNELS)
    _choice("precision", precision, PRECISIONS)
    p = 2.0 if precision != "fp32" else 4.0
    h, a, f = cfg.d_model, cfg.n_heads, cfg.d_ff
    q, k = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    dropout, attn_dropout = cfg.dropout > 0, cfg.attn_dropout > 0

    def attention_branch(kv_len: int) -> float:
        kv_scale = kv_len / seq_len  # keys/values per query token
        elems = h + h + q  # norm input, projection input, Q
        if attention == "eager":
            elems += k * kv_scale + a * kv_len + k * kv_scale + q  # K, softmax probs, V, o-proj input
            if attn_dropout:
                elems += a * kv_len  # dropped-out probabilities
            extra = (a * kv_len if attn_dropout else 0) + (h if dropout else 0)  # 1-byte masks
            return elems * p + extra
        elems += 2 * k * kv_scale + q + q  # K, V, attention output, o-proj input (a contiguous copy)
        return elems * p + 4 * a + (h if dropout else 0)  # + fp32 logsumexp per head

    per_token = attention_branch(seq_len)
    if cross:
        per_token += attention_branch(context_len or seq_len)
    ffn = h + h + (4 * f if cfg.gated_ffn else 2 * f)
    per_token += ffn * p + (h if dropout else 0)
    return batch * seq_len * per_token


def korthikanti_layer_bytes(batch: int, seq_len: int, d_model: int, n_heads: int) -> float:
    """The paper's per-layer formula for GPT in 16-bit with dropout: ``s*b*h*(34 + 5*a*s/h)`` bytes."""
    s, b, h, a = seq_len, batch, d_model, n_heads
    return s * b * h * (34 + 5 * a * s / h)


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, precision: str = "bf16-mixed",
                     activation_checkpointing: bool = False, attention: str = "flash") -> float:
    """Bytes saved for backward by one training step's forward pass, whole model.

    Sum over blocks of ``layer_activation_bytes`` (an encoder-decoder runs both stacks over ``seq_len``),
    plus the head: final-norm input and head input 2*h*p, and the fp32 log-probabilities the
    cross-entropy keeps, 4*V bytes per token (Korthikanti's "4sbv").

    Full activation checkpointing stores only each block's input, ``2*s*b*h`` bytes per layer in 16-bit
    (``p*s*b*h`` in general), and recomputes one block at a time during backward, so one block's full
    activations are added back as working memory.
    """
    enc_layers = cfg.n_layers if cfg.has_encoder else 0
    dec_layers = _decoder_layers(cfg)
    cross = cfg.arch == "encoder_decoder"
    p = 2.0 if precision != "fp32" else 4.0
    enc = layer_activation_bytes(cfg, batch, seq_len, precision, attention) if enc_layers else 0.0
    dec = layer_activation_bytes(cfg, batch, seq_len, precision, attention, cross=cross) if dec_layers else 0.0
    if activation_checkpointing:
        stored = (enc_layers + dec_layers) * p * seq_len * batch * cfg.d_model
        blocks = stored + max(enc, dec)
    else:
        blocks = enc_layers * enc + dec_layers * dec
    head = batch * seq_len * 2 * cfg.d_model * p
    if cfg.head != "none":
        head += batch * seq_len * cfg.vocab_size * 4
    return blocks + head


# --- training: everything per rank ----------------------------------------------------------------

@dataclass(frozen=True)
class TrainingMemory:
    """Per-rank bytes of one training step; ``total`` is the estimated peak on each device."""

    strategy: str
    world_size: int
    parameters: float
    gradients: float
    optimizer: float
    gathered: float  # ZeRO-3/FSDP: one all-gathered unit of full parameters (working memory)
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.gathered + self.activations

    def fits(self, gpu_bytes: float) -> bool:
        return self.total <= gpu_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def training_memory(cfg: ModelConfig, batch: int, seq_len: int, precision: str = "bf16-mixed",
                    optimizer: str = "adamw", strategy: str = "single", world_size: int = 1,
                    activation_checkpointing: bool = False, attention: str = "flash") -> TrainingMemory:
    """Per-rank memory of data-parallel training with ``batch`` sequences of ``seq_len`` tokens per rank.

    Model states come from ``state_bytes_per_param`` times N; what each strategy shards over the
    ``world_size`` ranks (ZeRO paper, section 5):

    single, ddp  nothing: every rank holds all parameters, gradients and optimizer states
                 (DDP's gradient communication buckets, 25 MiB each by default, are ignored)
    zero1        optimizer states (incl. the fp32 master copy) / N_ranks
    zero2        + gradients / N_ranks
    zero3, fsdp  + parameters / N_ranks (FSDP FULL_SHARD), plus the working memory of one all-gathered
                 unit of full 16-bit (or fp32) parameters: the larger of one block and the non-block rest
                 (embeddings, head), assuming one FSDP unit per block. Prefetching the next unit doubles it.
    Activations (``activation_bytes``) are per rank and never sharded by data parallelism.
    """
    _choice("strategy", strategy, STRATEGIES)
    batch = _check_positive_int("batch", batch)
    seq_len = _check_positive_int("seq_len", seq_len)
    world_size = _check_positive_int("world_size", world_size)
    if strategy == "single" and world_size != 1:
        raise ConfigError(f"world_size={world_size} needs a data-parallel strategy; strategy='single' runs on 1 device")
    per = state_bytes_per_param(precision, optimizer)
    n = cfg.num_parameters()
    shard = {"single": 0, "ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}[strategy]
    params, grads, opt = n * per["parameters"], n * per["gradients"], n * per["optimizer"]
    if shard >= 1:
        opt /= world_size
    if shard >= 2:
        grads /= world_size
    gathered = 0.0
    if shard >= 3:
        params /= world_size
        unit = max(layer_parameters(cfg), non_block_parameters(cfg))  # largest FSDP unit
        gathered = unit * per["parameters"] if world_size > 1 else 0.0
    acts = activation_bytes(cfg, batch, seq_len, precision, activation_checkpointing, attention)
    return TrainingMemory(strategy=strategy, world_size=world_size, parameters=params, gradients=grads,
                          optimizer=opt, gathered=gathered, activations=acts)


# --- Chinchilla ---------------------------------------------------------------------------------------

# Hoffmann et al. 2022, eq. (10): the parametric loss fitted in "approach 3"
CHINCHILLA_E, CHINCHILLA_A, CHINCHILLA_B = 1.69, 406.4, 410.7
CHINCHILLA_ALPHA, CHINCHILLA_BETA = 0.34, 0.28


def training_flops(n_params: float, n_tokens: float) -> float:
    """C = 6*N*D: 2 FLOPs per parameter per token forward, 4 backward (Kaplan et al. 2020; Hoffmann et al. 2022)."""
    return 6.0 * n_params * n_tokens


def chinchilla_loss(n_params: float, n_tokens: float) -> float:
    """L(N, D) = E + A/N^alpha + B/D^beta with E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28 (nats/token on
    the paper's MassiveText; a guide to trends, not a prediction for another data set or tokenizer)."""
    if not n_params > 0 or not n_tokens > 0:
        raise ConfigError(f"chinchilla_loss needs positive N and D; got N={n_params!r}, D={n_tokens!r}")
    return (CHINCHILLA_E + CHINCHILLA_A / n_params ** CHINCHILLA_ALPHA
            + CHINCHILLA_B / n_tokens ** CHINCHILLA_BETA)


@dataclass(frozen=True)
class ChinchillaPlan:
    n_params: float
    n_tokens: float
    flops: float
    loss: float
    tokens_per_param: float

    def as_dict(self) -> dict:
        return asdict(self)


def chinchilla_optimal(compute_flops: float | None = None, n_params: float | None = None,
                       n_tokens: float | None = None, tokens_per_param: float = 20.0) -> ChinchillaPlan:
    """Compute-optimal N, D and C from exactly one of them, with the rule of thumb D = r*N (r = 20).

    Hoffmann et al. 2022 find N_opt and D_opt both grow as ~C^0.5, with about 20 tokens per parameter
    (Table 3; Chinchilla itself: 70B parameters, 1.4T tokens). With C = 6*N*D and D = r*N:
        from C:  N = sqrt(C / (6r)),  D = r*N
        from N:  D = r*N,             C = 6*N*D
        from D:  N = D / r,           C = 6*N*D
    The loss is ``chinchilla_loss(N, D)``.
    """
    given = {k: v for k, v in (("compute_flops", compute_flops), ("n_params", n_params), ("n_tokens", n_tokens))
             if v is not None}
    if len(given) != 1:
        raise ConfigError(f"give exactly one of compute_flops, n_params, n_tokens; got {sorted(given) or 'none'}")
    (name, value), = given.items()
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{name}={value!r} must be a positive finite number")
    if not tokens_per_param > 0:
        raise ConfigError(f"tokens_per_param={tokens_per_param!r} must be > 0")
    r = float(tokens_per_param)
    if compute_flops is not None:
        n = math.sqrt(compute_flops / (6.0 * r))
    elif n_params is not None:
        n = float(n_params)
    else:
        n = n_tokens / r
    d = r * n
    return ChinchillaPlan(n_params=n, n_tokens=d, flops=training_flops(n, d), loss=chinchilla_loss(n, d),
                          tokens_per_param=r)


def chinchilla_loss_optimal(compute_flops: float) -> ChinchillaPlan:
    """N and D minimising ``chinchilla_loss`` under C = 6*N*D (Hoffmann et al. 2022, approach 3, eq. 4):

        N_opt = G * (C/6)^(beta/(alpha+beta)),  D_opt = (C/6)^(alpha/(alpha+beta)) / G,
        G = (alpha*A / (beta*B))^(1/(alpha+beta))

    With the paper's rounded constants this favours smaller models than D = 20N (about 32B parameters
    for Chinchilla's 5.76e23 FLOPs); ``chinchilla_optimal`` follows the 20-tokens-per-parameter rule.
    """
    if not compute_flops > 0 or math.isinf(compute_flops):
        raise ConfigError(f"compute_flops={compute_flops!r} must be a positive finite number")
    a, b = CHINCHILLA_ALPHA, CHINCHILLA_BETA
    g = (a * CHINCHILLA_A / (b * CHINCHILLA_B)) ** (1 / (a + b))
    n = g * (compute_flops / 6) ** (b / (a + b))
    d = (compute_flops / 6) ** (a / (a + b)) / g
    return ChinchillaPlan(n_params=n, n_tokens=d, flops=training_flops(n, d), loss=chinchilla_loss(n, d),
                          tokens_per_param=d / n)


def training_time(flops: float, peak_flops: float, mfu: float = 0.4, n_devices: int = 1) -> float:
    """Wall-clock seconds: C / (peak FLOP/s per device * model-FLOPs utilisation * devices)."""
    if not peak_flops > 0:
        raise ConfigError(f"peak_flops={peak_flops!r} must be > 0 (FLOP/s per device, e.g. 989e12 for an H100 bf16)")
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu={mfu!r} must be in (0, 1]")
    _check_positive_int("n_devices", n_devices)
    if not flops > 0:
        raise ConfigError(f"flops={flops!r} must be > 0")
    return flops / (peak_flops * mfu * n_devices)


# --- model lookup for the CLI ----------------------------------------------------------------------

def config_for(source: str) -> ModelConfig:
    """A preset name from ``lmlab.config.PRESETS`` or any source ``lmlab.checkpoints.load_config`` reads."""
    from lmlab.config import PRESETS

    if source in PRESETS:
        return ModelConfig.from_name(source)
    from lmlab.checkpoints import load_config  # imports torch; only needed for real checkpoints
    from lmlab.errors import CheckpointError

    try:
        return load_config(source)[0]
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; or use a preset: {', '.join(PRESETS)}") from None


# --- reports (`lmlab plan`) ------------------------------------------------------------------------

TABLE_STRATEGIES = ("single", "ddp", "zero1", "zero2", "fsdp")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def memory_report(cfg: ModelConfig, batch: int = 8, seq_len: int | None = None, precision: str = "bf16-mixed",
                  optimizer: str = "adamw", strategies=TABLE_STRATEGIES, world_size: int = 8,
                  gpu_bytes: float = 80 * 2 ** 30, activation_checkpointing: bool = False,
                  attention: str = "flash", inference_dtypes=("fp32", "bf16", "int8", "int4")) -> str:
    """The tables `lmlab plan memory` prints: per-rank training memory per strategy, then inference memory."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    for s in strategies:
        _choice("strategy", s, STRATEGIES)
    n = cfg.num_parameters()
    lines = [f"model      {cfg.name or cfg.arch}: {cfg.arch}, {n:,} parameters ({format_count(n)})",
             f"training   batch {batch} x {seq_len} tokens per rank, {precision}, {optimizer}, world size {world_size}, "
             f"activation checkpointing {'on' if activation_checkpointing else 'off'}, {attention} attention",
             f"device     {format_bytes(gpu_bytes)} per GPU", ""]
    rows = []
    for s in strategies:
        m = training_memory(cfg, batch, seq_len, precision, optimizer, s, 1 if s == "single" else world_size,
                            activation_checkpointing, attention)
        rows.append([s if s != "single" else "single (1 GPU)", format_bytes(m.parameters), format_bytes(m.gradients),
                     format_bytes(m.optimizer), format_bytes(m.gathered), format_bytes(m.activations),
                     format_bytes(m.total), "yes" if m.fits(gpu_bytes) else "NO"])
    lines.append(_table(["strategy (per rank)", "params", "grads", "optimizer", "gathered", "activations", "total",
                         "fits"], rows))
    if inference_dtypes:
        lines += ["", f"inference  batch {batch} x {seq_len} tokens, KV cache in the activation dtype"]
        rows = []
        for dt in inference_dtypes:
            m = inference_memory(cfg, dt, batch, seq_len, attention=attention)
            rows.append([dt, format_bytes(m.weights), format_bytes(m.kv_cache), format_bytes(m.activations),
                         format_bytes(m.total), "yes" if m.fits(gpu_bytes) else "NO"])
        lines.append(_table(["weights dtype", "weights", "kv cache", "activations", "total", "fits"], rows))
    return "\n".join(lines)


def chinchilla_report(plan: ChinchillaPlan, peak_flops: float = 989e12, mfu: float = 0.4, n_devices: int = 1) -> str:
    """The summary `lmlab plan chinchilla` prints."""
    seconds = training_time(plan.flops, peak_flops, mfu, n_devices)
    best = chinchilla_loss_optimal(plan.flops)
    rows = [
        ("parameters N", f"{format_count(plan.n_params)} ({plan.n_params:.3g})"),
        ("tokens D", f"{format_count(plan.n_tokens)} ({plan.n_tokens:.3g}; {plan.tokens_per_param:g} per parameter)"),
        ("compute C = 6ND", format_flops(plan.flops)),
        ("predicted loss", f"{plan.loss:.3f} nats/token (E + A/N^{CHINCHILLA_ALPHA} + B/D^{CHINCHILLA_BETA}, "
                           "Hoffmann et al. 2022 fit)"),
        ("fit's own optimum", "{} params, {} tokens, loss {:.3f} (minimum of L(N, D) at this C)".format(
            format_count(best.n_params), format_count(best.n_tokens), best.loss)),
        ("training time", f"{format_duration(seconds)} on {n_devices} device(s) at {format_count(peak_flops)} FLOP/s "
                          f"peak, {mfu:.0%} MFU ({seconds * n_devices / 3600:.3g} device-hours)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
