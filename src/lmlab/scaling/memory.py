"""Memory of a model at inference and in training (single device, DDP, ZeRO-1/2/3, FSDP), per device.

Notation and sources: see ``lmlab.scaling``. Weights and model states follow the ZeRO paper
(Rajbhandari et al. 2020); activations follow Korthikanti et al. 2022, generalised to grouped-query
attention, gated feed-forwards, fused attention kernels and encoder-decoders.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.scaling.units import check_choice, check_positive_int

# bytes per element of a weight / activation / cache dtype; int4 ignores block-scale overhead
# (GGUF Q4_1 stores ~5 bits per weight, so real int4 files are ~25% larger than this estimate)
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
OPTIMIZERS = ("adamw", "sgd", "sgd-momentum")
STRATEGIES = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp")
ATTENTION_KERNELS = ("flash", "eager")


# --- shapes read off the config -------------------------------------------------------------------

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
    p = DTYPE_BYTES[check_choice("kv_dtype", kv_dtype, DTYPE_BYTES)]
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
    check_choice("dtype", dtype, DTYPE_BYTES)
    check_choice("attention", attention, ATTENTION_KERNELS)
    batch = check_positive_int("batch", batch)
    seq_len = check_positive_int("seq_len", cfg.max_seq_len if seq_len is None else seq_len)
    act_dtype = dtype if DTYPE_BYTES[dtype] >= 2 else "fp16"
    kv_dtype = act_dtype if kv_dtype is None else kv_dtype
    p = DTYPE_BYTES[act_dtype]
    n_f = 2 if cfg.gated_ffn else 1
    activations = batch * seq_len * p * (2 * cfg.d_model + n_f * cfg.d_ff)
    if cfg.head != "none":
        activations += batch * seq_len * cfg.vocab_size * p
    if attention == "eager":
        activations += batch * cfg.n_heads * seq_len ** 2 * p
    return InferenceMemory(dtype=dtype, batch=batch, seq_len=seq_len,
                           weights=cfg.num_parameters() * DTYPE_BYTES[dtype],
                           kv_cache=kv_cache_bytes(cfg, batch, seq_len, kv_dtype),
                           activations=float(activations))


# --- training: model states -----------------------------------------------------------------------

def state_bytes_per_param(precision: str = "fp32", optimizer: str = "adamw") -> dict[str, float]:
    """Bytes per parameter of the three model states, before any sharding.

    fp32:        parameters 4, gradients 4, optimizer: AdamW 8 (exp_avg + exp_avg_sq), SGD-momentum 4, SGD 0.
    bf16-mixed / fp16-mixed (ZeRO paper, section 3.1): 16-bit parameters 2 and 16-bit gradients 2, and the
                 optimizer keeps an fp32 master copy 4 + its moments: AdamW 4 + 4 + 4 = 12, SGD-momentum 8,
                 SGD 4. AdamW therefore costs 16 bytes/param either way. (torch.autocast with fp32 parameters
                 splits the same 16 bytes as 4 + 4 + 8; only the sharded terms below would differ.)
    """
    check_choice("precision", precision, PRECISIONS)
    moments = {"adamw": 2, "sgd-momentum": 1, "sgd": 0}[check_choice("optimizer", optimizer, OPTIMIZERS)]
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
    check_choice("attention", attention, ATTENTION_KERNELS)
    check_choice("precision", precision, PRECISIONS)
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
    encoder_layers = cfg.n_layers if cfg.has_encoder else 0
    decoder_layers = _decoder_layers(cfg)
    cross = cfg.arch == "encoder_decoder"
    p = 2.0 if precision != "fp32" else 4.0
    per_encoder_layer = layer_activation_bytes(cfg, batch, seq_len, precision, attention) if encoder_layers else 0.0
    per_decoder_layer = (layer_activation_bytes(cfg, batch, seq_len, precision, attention, cross=cross)
                         if decoder_layers else 0.0)
    if activation_checkpointing:
        stored = (encoder_layers + decoder_layers) * p * seq_len * batch * cfg.d_model
        blocks = stored + max(per_encoder_layer, per_decoder_layer)
    else:
        blocks = encoder_layers * per_encoder_layer + decoder_layers * per_decoder_layer
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
    check_choice("strategy", strategy, STRATEGIES)
    batch = check_positive_int("batch", batch)
    seq_len = check_positive_int("seq_len", seq_len)
    world_size = check_positive_int("world_size", world_size)
    if strategy == "single" and world_size != 1:
        raise ConfigError(f"world_size={world_size} needs a data-parallel strategy; strategy='single' runs on 1 device")
    per_param = state_bytes_per_param(precision, optimizer)
    n = cfg.num_parameters()
    zero_stage = {"single": 0, "ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}[strategy]  # what is sharded
    parameter_bytes, gradient_bytes = n * per_param["parameters"], n * per_param["gradients"]
    optimizer_bytes = n * per_param["optimizer"]
    if zero_stage >= 1:
        optimizer_bytes /= world_size
    if zero_stage >= 2:
        gradient_bytes /= world_size
    gathered = 0.0
    if zero_stage >= 3:
        parameter_bytes /= world_size
        unit = max(layer_parameters(cfg), non_block_parameters(cfg))  # largest FSDP unit
        gathered = unit * per_param["parameters"] if world_size > 1 else 0.0
    activations = activation_bytes(cfg, batch, seq_len, precision, activation_checkpointing, attention)
    return TrainingMemory(strategy=strategy, world_size=world_size, parameters=parameter_bytes,
                          gradients=gradient_bytes, optimizer=optimizer_bytes, gathered=gathered,
                          activations=activations)
