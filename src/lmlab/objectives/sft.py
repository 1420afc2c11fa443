"""Supervised fine-tuning: learn the response of (prompt, response) pairs; the prompt is context only.

A pair arrives already tokenized: ``prompt`` ids exactly as generation will encode the prompt text,
and ``response`` ids ending with the end-of-sequence token (so the model learns to stop).

* decoder-only      input = prompt + response, right-padded; the label of position t is token t+1,
                    kept only where token t+1 belongs to the response. Prompt and padding are masked
                    out of the loss (the causal mask already keeps padding out of every real token's view).
* encoder-decoder   the encoder reads the prompt; the decoder reads [start] + response[:-1] and
                    predicts the response (T5's shift-right).

The loss is the token-mean cross-entropy over response tokens. Only the positions that carry a label
go through the output head: with a 49k vocabulary and responses a tenth of the sequence, computing
logits everywhere would cost more than a third of the forward pass and its gradient for nothing.

Shapes: B batch, T input length, S decoder length, C d_model, N counted positions, V vocabulary.
"""

from __future__ import annotations

import math

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.objectives.base import IGNORE_INDEX, Objective


class SupervisedFineTuning(Objective):
    name = "sft"

    def __init__(self, arch: str, pad_token_id: int, decoder_start_token_id: int | None = None,
                 label_smoothing: float = 0.0, neftune_alpha: float = 0.0):
        """``label_smoothing``: the target puts that much probability mass spread over the vocabulary
        (Szegedy et al. 2016); ``neftune_alpha``: NEFTune (Jain et al. 2023): in training, uniform noise in
        [-1, 1] * alpha / sqrt(T * C) is added to the token embeddings (T the batch's length, C the width)."""
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"label_smoothing={label_smoothing!r} must be in [0, 1)")
        if not neftune_alpha >= 0:
            raise ConfigError(f"neftune_alpha={neftune_alpha!r} must be >= 0 (0: off)")
        self.label_smoothing, self.neftune_alpha = float(label_smoothing), float(neftune_alpha)
        if arch not in ("decoder", "encoder_decoder"):
            raise ConfigError(f"supervised fine-tuning trains generative models; arch={arch!r} has no decoder "
                              f"(use a decoder or encoder_decoder model)")
        if arch == "encoder_decoder" and decoder_start_token_id is None:
            raise ConfigError("an encoder-decoder model needs decoder_start_token_id to fine-tune")
        self.arch, self.pad_token_id, self.decoder_start_token_id = arch, pad_token_id, decoder_start_token_id

    def collate(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, torch.Tensor]:
        """[(prompt ids, response ids), ...] -> padded model inputs with labels on the response only."""
        if self.arch == "decoder":
            rows = [list(p) + list(r) for p, r in pairs]
            T = max(len(row) for row in rows) - 1  # the last token is only ever a target
            input_ids = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)  # (B, T)
            labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
            for b, ((prompt, response), row) in enumerate(zip(pairs, rows)):
                n = len(row) - 1
                input_ids[b, :n] = torch.tensor(row[:-1])
                start = len(prompt) - 1  # position whose next token is the response's first
                labels[b, start:n] = torch.tensor(row[start + 1:])
            # No attention mask: padding sits on the right, and under the causal mask a real token never
            # attends to a later (padding) position, so the mask would change nothing a label depends
            # on. Without it attention runs on SDPA's causal fused kernel, whose memory is O(T), instead of
            # materialising a (B, H, T, T) matrix per layer for the backward pass.
            return {"input_ids": input_ids, "labels": labels}
        T = max(len(p) for p, _ in pairs)
        S = max(len(r) for _, r in pairs)
        input_ids = torch.full((len(pairs), T), self.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(pairs), T), dtype=torch.long)
        decoder_ids = torch.full((len(pairs), S), self.pad_token_id, dtype=torch.long)  # (B, S)
        labels = torch.full((len(pairs), S), IGNORE_INDEX, dtype=torch.long)
        for b, (prompt, response) in enumerate(pairs):
            input_ids[b, : len(prompt)] = torch.tensor(list(prompt))
            mask[b, : len(prompt)] = 1
            shifted = [self.decoder_start_token_id] + list(response[:-1])
            decoder_ids[b, : len(shifted)] = torch.tensor(shifted)
            labels[b, : len(response)] = torch.tensor(list(response))
        return {"input_ids": input_ids, "attention_mask": mask, "decoder_input_ids": decoder_ids, "labels": labels}

    def hidden(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's last hidden states (B, T or S, C), through the (possibly DDP-wrapped) model's forward."""
        if self.arch == "decoder":
            return model(batch["input_ids"], return_hidden=True)
        return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=batch["decoder_input_ids"], return_hidden=True)

    def loss(self, model, batch):
        head = getattr(model, "module", model)  # the unwrapped model: its embedding and output head
        hook = None
        if self.neftune_alpha > 0 and model.training:
            hook = head.tok_embed.register_forward_hook(self._neftune)
        try:
            hidden = self.hidden(model, batch)
        finally:
            if hook is not None:
                hook.remove()
        keep = batch["labels"] != IGNORE_INDEX  # (B, T)
        logits = head.logits(hidden[keep])  # (N, V): the head on response positions only
        n_tokens = keep.sum()
        total = F.cross_entropy(logits.float(), batch["labels"][keep], reduction="sum",
                                label_smoothing=self.label_smoothing)
        return total / n_tokens.clamp(min=1), n_tokens

    def _neftune(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        """(B, T, C) embeddings + uniform noise of magnitude alpha / sqrt(T C) (NEFTune)."""
        scale = self.neftune_alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    def prepare(self, blocks, generator=None):  # pairs are collated by the data source, not from token blocks
        raise NotImplementedError("SupervisedFineTuning batches come from collate(pairs)")
