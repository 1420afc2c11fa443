"""The Transformer: embed -> [encoder] -> [decoder] -> head.

One class serves the three variants of ``ModelConfig.arch``:

* encoder          ``forward(input_ids)`` -> MLM logits (B, T, V) with an MLM head, else hidden states (B, T, C)
* decoder          ``forward(input_ids)`` -> next-token logits (B, T, V)
* encoder_decoder  ``forward(input_ids, decoder_input_ids=...)`` -> logits (B, T_dec, V);
                   ``encode()`` runs the encoder once, ``decode()`` the decoder (with a cache, step by step)

The model returns logits, never losses (those live in ``lmlab.objectives``), and never imports a
checkpoint format (``lmlab.checkpoints`` maps formats onto these parameter names).

Shapes: B batch, T sequence length, C d_model, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError, DataError
from lmlab.nn.block import Stack
from lmlab.nn.ffn import get_activation
from lmlab.nn.kv_cache import Cache, KVCache
from lmlab.nn.norm import build_norm
from lmlab.nn.positional import sinusoidal_table


class HeadTransform(nn.Module):
    """BERT's MLM transform before the vocabulary projection: dense -> activation -> norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = get_activation(cfg.activation)
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = self.config = config
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positional == "learned" else None
        if cfg.positional == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        else:
            self.pos_table = None
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.embed_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)

        self.encoder = Stack(cfg, cfg.n_layers, causal=False) if cfg.has_encoder else None
        n_dec = cfg.n_decoder_layers if cfg.arch == "encoder_decoder" else cfg.n_layers
        self.decoder = Stack(cfg, n_dec, causal=True, cross=cfg.arch == "encoder_decoder") if cfg.has_decoder else None

        self.head_transform = HeadTransform(cfg) if cfg.head == "mlm" else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias) if cfg.head != "none" else None
        self.init_weights()
        if self.lm_head is not None and cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight

    # --- construction ------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 style: N(0, std) weights, zero biases, unit norms; residual projections scaled by 1/sqrt(2L)."""
        n_layers = (self.config.n_layers or 0) + (self.config.n_decoder_layers or 0)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * n_layers) if name.endswith((".o", ".down")) else 1.0
                nn.init.normal_(module.weight, 0.0, std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, (nn.LayerNorm,)) or type(module).__name__ == "RMSNorm":
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for stack in (self.encoder, self.decoder):
            if stack is not None and stack.rel_bias is not None:
                nn.init.normal_(stack.rel_bias.weight, 0.0, std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}  # tied weights counted once
        n = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            n -= self.tok_embed.weight.numel()
        return n

    @property
    def device(self) -> torch.device:
        embed = self.tok_embed  # a quantized embedding (lmlab.quant) has no float weight but says where it lives
        return embed.weight.device if isinstance(embed, nn.Embedding) else embed.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (a quantized model computes in fp32 around its integer kernels)."""
        embed = self.tok_embed
        return embed.weight.dtype if isinstance(embed, nn.Embedding) else embed.dtype

    # --- the three parts ---------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
        """Token (+ absolute position) (+ token type) embeddings -> (B, T, C)."""
        cfg = self.config
        self._check_ids(input_ids)
        x = self.tok_embed(input_ids)  # (B, T, C)
        if cfg.embed_scale:
            x = x * math.sqrt(cfg.d_model)
        if self.pos_embed is not None or self.pos_table is not None:
            T = input_ids.shape[1]
            if position_ids is None:
                if offset + T > cfg.max_seq_len:
                    raise DataError(f"sequence of {offset + T} positions exceeds max_seq_len={cfg.max_seq_len}")
                position_ids = torch.arange(offset, offset + T, device=input_ids.device)[None]  # (1, T)
            x = x + (self.pos_embed(position_ids) if self.pos_embed is not None else self.pos_table[position_ids].to(x.dtype))
        if self.type_embed is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.type_embed(token_type_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.drop(x)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        """A clear error for ids outside the vocabulary instead of an IndexError deep inside the embedding.

        Checked on CPU tensors only: on an accelerator reading the values back would cost a host sync
        on every decoding step, and the device-side bounds check of the embedding still fires.
        """
        if input_ids.dim() != 2:
            raise DataError(f"input_ids must be (batch, seq_len); got shape {tuple(input_ids.shape)}")
        if input_ids.device.type != "cpu" or not input_ids.numel():
            return
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise DataError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the encoder stack -> hidden states (B, T, C)."""
        if self.encoder is None:
            raise ConfigError(f"encode() needs an encoder; this model has arch={self.config.arch!r}")
        x = self.embed(input_ids, position_ids, token_type_ids)
        return self.encoder(x, attention_mask=attention_mask, position_ids=position_ids)

    def decode(self, input_ids: torch.Tensor, encoder_out: torch.Tensor | None = None,
               encoder_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, cache: Cache | None = None,
               logits_to_keep: int = 0, return_hidden: bool = False,
               mask_has_padding: bool | None = None) -> torch.Tensor:
        """Run the decoder stack (and the head) -> logits (B, T, V), or hidden states with return_hidden.

        With a cache, `input_ids` holds only the new tokens and `attention_mask` covers past + new.
        ``logits_to_keep=k`` computes logits for the last k positions only (prefill needs one).
        ``mask_has_padding``: whether the masks passed (`attention_mask`, `encoder_mask`) hold any 0.
        None looks it up (a host sync per call); generation knows it once per run and passes it.
        """
        if self.decoder is None:
            raise ConfigError(f"decode() needs a decoder; this model has arch={self.config.arch!r}")
        if self.config.arch == "encoder_decoder" and encoder_out is None and (cache is None or cache.cross[0] is None):
            raise DataError("an encoder-decoder model's decode() needs encoder_out (from encode())")
        past = cache.length if cache is not None else 0
        x = self.embed(input_ids, position_ids, offset=past)
        h = self.decoder(x, attention_mask=attention_mask, position_ids=position_ids, context=encoder_out,
                         context_mask=encoder_mask, cache=cache, mask_has_padding=mask_has_padding)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return h if return_hidden else self.logits(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output head: (B, T, C) -> (B, T, V). The softmax is left to the loss or the sampler."""
        if self.lm_head is None:
            return hidden
        if self.head_transform is not None:
            hidden = self.head_transform(hidden)
        if self.config.head_input_scale != 1.0:
            hidden = hidden * self.config.head_input_scale
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, logits_to_keep: int = 0,
                mask_has_padding: bool | None = None, return_hidden: bool = False) -> torch.Tensor:
        """Logits for any arch (see the module docstring); ``mask_has_padding`` as in ``decode()``.

        ``return_hidden=True`` returns the last hidden states (B, T, C) instead, for a loss that applies
        the head to a few positions only (``model.logits(hidden[keep])``, as fine-tuning does).
        """
        arch = self.config.arch
        if arch == "encoder":
            hidden = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
            return hidden if return_hidden else self.logits(hidden)
        if arch == "decoder":
            return self.decode(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, logits_to_keep=logits_to_keep, mask_has_padding=mask_has_padding,
                               return_hidden=return_hidden)
        if decoder_input_ids is None:
            raise DataError("an encoder-decoder model needs decoder_input_ids (the shifted target)")
        encoder_out = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, encoder_out=encoder_out, encoder_mask=attention_mask,
                           attention_mask=decoder_attention_mask, cache=cache, logits_to_keep=logits_to_keep,
                           return_hidden=return_hidden)

    # --- incremental decoding ----------------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None) -> Cache:
        """A preallocated KV cache for `capacity` decoder positions (prompt + new tokens)."""
        if self.decoder is None:
            raise ConfigError(f"a KV cache needs a decoder; this model has arch={self.config.arch!r}")
        cfg = self.config
        if self.pos_embed is not None or self.pos_table is not None:
            capacity = min(capacity, cfg.max_seq_len)
        dtype = dtype or self.dtype
        layers = [KVCache(batch_size, cfg.n_kv_heads, capacity, cfg.head_dim, dtype, self.device)
                  for _ in self.decoder.layers]
        return Cache(layers)
