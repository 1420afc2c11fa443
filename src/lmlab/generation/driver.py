"""The model side of one generation: prepare the inputs, prefill the KV cache once, then one token per step.

``start_run`` picks the driver for the model's architecture:

* ``DecoderOnlyRun``: the prompt fills the cache (*prefill*), then each new token goes through the model
  alone, reading the cached keys/values. Unpadded batches pass no attention mask at all (the model then
  builds none); left-padded batches pass a preallocated mask slice and explicit positions, as Hugging
  Face does, so a padded row gives the same tokens as the same prompt alone. Whether the batch is padded
  is decided once here, so no step reads the mask back to the host.
* ``EncoderDecoderRun``: the encoder runs once; the decoder starts from ``decoder_start_token_id`` and
  caches the cross-attention keys/values on its first step.

Both expose ``prefill() -> logits``, ``step(tokens) -> logits`` and ``reorder(index)`` (rows leaving the
batch, beams being re-ranked); the decoding loops (``decode.sample_steps``, ``beam_search``) only use those.
A decoder-only model's run may come from a decode engine instead (``lmlab.engine.select``: the native
C++ step where it is built and supports the model), which follows the same protocol.

Several rows per prompt (beams, best-of-n samples: ``expand``) share one prefill: a decoder-only run
prefills each prompt once and copies its cache to the prompt's rows (``reorder`` with repeated indices).

Shapes: B batch (prompts), N beams, T prompt length, C d_model, V vocabulary.
"""

from __future__ import annotations

import torch

from lmlab.errors import DataError
from lmlab.generation.config import GenerationConfig

PAD_MARK = -1  # marks left padding in the token history the processors see


class DecoderOnlyRun:
    """Drives a decoder-only model over one generation's cache."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                 expand: int = 1):
        self.model, self.input_ids, self.expand = model, input_ids, expand
        B, T = input_ids.shape
        # decided once per generation: the steps then never read the mask back to the host
        self.padded = attention_mask is not None and not bool(attention_mask.all())
        self.cache = model.new_cache(B, T + max_new_tokens)
        if self.padded:
            # one mask for prompt + every future token, sliced per step instead of concatenated
            self.mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=input_ids.device)
            self.mask[:, :T] = attention_mask
            self.positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T) pads get 0

    def prefill(self) -> torch.Tensor:
        T = self.input_ids.shape[1]
        if self.padded:
            logits = self.model(self.input_ids, attention_mask=self.mask[:, :T], position_ids=self.positions,
                                cache=self.cache, logits_to_keep=1, mask_has_padding=True)
            self.positions = self.positions[:, -1:] + 1  # (B, 1) position of the next token
        else:
            logits = self.model(self.input_ids, cache=self.cache, logits_to_keep=1)
        logits = logits[:, -1]  # (B, V)
        if self.expand > 1:  # each prompt prefilled once, its cache then copied to its `expand` rows (B*N, ...)
            index = torch.arange(logits.shape[0], device=logits.device).repeat_interleave(self.expand)
            self.reorder(index)
            logits = logits.index_select(0, index)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> next-token logits (B, V)."""
        if self.padded:
            S = self.cache.length + 1
            logits = self.model(tokens[:, None], attention_mask=self.mask[:, :S], position_ids=self.positions,
                                cache=self.cache, mask_has_padding=True)
            self.positions = self.positions + 1
        else:
            logits = self.model(tokens[:, None], cache=self.cache)
        return logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        if self.padded:
            self.mask, self.positions = self.mask.index_select(0, index), self.positions.index_select(0, index)


class EncoderDecoderRun:
    """Drives an encoder-decoder: the encoder runs once; cross-attention K/V are cached on the first step."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                 start_token_id: int, expand: int = 1):
        self.model, self.start_token_id = model, start_token_id
        # decided once per generation: the steps then never read the mask back to the host
        self.padded = padded = attention_mask is not None and not bool(attention_mask.all())
        self.encoder_out = model.encode(input_ids, attention_mask if padded else None)  # (B, T, C)
        self.encoder_mask = attention_mask if padded else None
        if expand > 1:  # beams share their prompt's encoding
            self.encoder_out = self.encoder_out.repeat_interleave(expand, 0)  # (B*N, T, C)
            if self.encoder_mask is not None:
                self.encoder_mask = self.encoder_mask.repeat_interleave(expand, 0)
        self.batch = self.encoder_out.shape[0]
        self.cache = model.new_cache(self.batch, 1 + max_new_tokens)

    def prefill(self) -> torch.Tensor:
        start = torch.full((self.batch, 1), self.start_token_id, dtype=torch.long, device=self.encoder_out.device)
        logits = self.model.decode(start, encoder_out=self.encoder_out, encoder_mask=self.encoder_mask,
                                   cache=self.cache, logits_to_keep=1, mask_has_padding=self.padded)
        self.encoder_out = None  # from now on the cache holds the cross-attention keys/values
        return logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens[:, None], encoder_mask=self.encoder_mask, cache=self.cache,
                                 mask_has_padding=self.padded)[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        if self.encoder_mask is not None:
            self.encoder_mask = self.encoder_mask.index_select(0, index)


def prepare_inputs(model, input_ids, attention_mask, config: GenerationConfig):
    if not isinstance(input_ids, torch.Tensor):  # a list of token lists: left-pad them
        rows = [list(r) for r in input_ids]
        if not rows or any(len(r) == 0 for r in rows):
            raise DataError("input_ids must hold at least one non-empty sequence of token ids")
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), config.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = 1
        input_ids, attention_mask = ids, (mask if attention_mask is None else attention_mask)
    input_ids = input_ids.to(model.device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[1] == 0:
        raise DataError("input_ids is empty: a prompt needs at least one token")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=model.device).long()
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != input_ids.shape:
            raise DataError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if bool((attention_mask[:, -1] == 0).any()) and model.config.arch == "decoder":
            raise DataError("decoder-only batches must be left-padded: attention_mask[:, -1] has a 0")
    cfg = model.config
    absolute = cfg.positional in ("learned", "sinusoidal")
    need = (1 if cfg.arch == "encoder_decoder" else input_ids.shape[1]) + config.max_new_tokens
    if absolute and need > cfg.max_seq_len:
        raise DataError(f"prompt of {input_ids.shape[1]} tokens + max_new_tokens={config.max_new_tokens} = {need} "
                        f"exceeds the model's max_seq_len={cfg.max_seq_len}")
    return input_ids, attention_mask


def start_run(model, input_ids, attention_mask, config: GenerationConfig, expand: int = 1, engine: str | None = None):
    """-> (run, history (B*expand, L0)): the model driver and the tokens the processors see.

    `engine`: "auto" | "compiled" | "native" | "aoti" | "eager" (``lmlab.engine``); None: ``$LMLAB_ENGINE``, else auto.
    """
    cfg = model.config
    if cfg.arch == "encoder":
        raise DataError(f"generation needs a decoder; this model has arch={cfg.arch!r}")
    if cfg.arch == "encoder_decoder":
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
        if start is None:
            raise DataError("an encoder-decoder model needs decoder_start_token_id (or pad_token_id) in its config")
        run = EncoderDecoderRun(model, input_ids, attention_mask, config.max_new_tokens, start, expand)
        history = torch.full((run.batch, 1), start, dtype=torch.long, device=input_ids.device)
        return run, history
    history = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, PAD_MARK)
    history = history.repeat_interleave(expand, 0) if expand > 1 else history  # (B*N, T)
    from lmlab.engine import select  # the one place that knows decode engines exist

    chosen = select(model, engine)
    if chosen is None:
        return DecoderOnlyRun(model, input_ids, attention_mask, config.max_new_tokens, expand), history
    if getattr(chosen, "shares_prefill", False):  # its run prefills each prompt once, then copies the cache
        return chosen.start(input_ids, attention_mask, config.max_new_tokens, expand), history
    if expand > 1:  # an engine that cannot grow its batch after prefill: each copy is prefilled
        input_ids = input_ids.repeat_interleave(expand, 0)  # (B*N, T)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(expand, 0)
    return chosen.start(input_ids, attention_mask, config.max_new_tokens), history
