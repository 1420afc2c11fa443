"""Span corruption (T5): drop random spans from the input and ask the decoder to write them back.

Each noise span in the input is replaced by one sentinel token, ``<extra_id_0>``, ``<extra_id_1>``, ...
(``<extra_id_0>`` has the highest id, as in T5's vocabulary), and the target lists every sentinel
followed by the span it stands for, then eos::

    original  The cute dog walks in the park
    input     The <extra_id_0> walks in <extra_id_1> </s>
    target    <extra_id_0> cute dog <extra_id_1> the park </s>

Which tokens are noise follows T5's ``random_spans_noise_mask``: the number of noise tokens
(round(L * noise_density)) and spans (round(noise / mean_span_length)) is fixed by the length, and
the noise and non-noise tokens are each cut into that many non-empty segments at random, then
interleaved (non-noise first). Every row of a batch therefore corrupts to the same lengths, so no
padding is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmlab.errors import ConfigError
from lmlab.objectives.base import Objective, token_cross_entropy


def _random_segmentation(num_items: int, num_segments: int, generator: torch.Generator | None) -> torch.Tensor:
    """Split `num_items` into `num_segments` non-empty parts at random -> lengths (num_segments,)."""
    # choose num_segments-1 of the num_items-1 gaps between items as segment starts
    is_start = torch.zeros(num_items - 1, dtype=torch.long)
    is_start[torch.randperm(num_items - 1, generator=generator)[: num_segments - 1]] = 1
    segment_id = torch.cat([torch.zeros(1, dtype=torch.long), is_start.cumsum(0)])  # (num_items,)
    return torch.bincount(segment_id, minlength=num_segments)


def noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) that T5 uses for a sequence of `length` tokens."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    return num_noise, num_spans


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """T5's noise mask: (length,) bool, True on noise tokens; starts with non-noise, ends with noise."""
    if length < 2:
        raise ConfigError(f"span corruption needs sequences of at least 2 tokens; got length={length}")
    num_noise, num_spans = noise_counts(length, noise_density, mean_span_length)
    num_spans = min(num_spans, num_noise, length - num_noise)
    noise_lengths = _random_segmentation(num_noise, num_spans, generator)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, generator)
    interleaved = torch.stack([keep_lengths, noise_lengths], dim=1).reshape(-1)  # (2 * spans,) keep, noise, ...
    span_starts = interleaved.cumsum(0)[:-1]
    start_indicator = torch.zeros(length, dtype=torch.long)
    start_indicator[span_starts] = 1
    span_num = start_indicator.cumsum(0)  # 0 in the first keep span, 1 in the first noise span, ...
    return span_num % 2 == 1


class SpanCorruption(Objective):
    name, arch = "span", "encoder_decoder"

    def __init__(self, sentinel_ids: Sequence[int], eos_token_id: int, decoder_start_token_id: int = 0,
                 noise_density: float = 0.15, mean_span_length: float = 3.0):
        if not 0.0 < noise_density < 1.0:
            raise ConfigError(f"noise_density={noise_density!r} must be in (0, 1)")
        if mean_span_length < 1:
            raise ConfigError(f"mean_span_length={mean_span_length!r} must be >= 1")
        if not sentinel_ids:
            raise ConfigError("span corruption needs sentinel token ids (<extra_id_0>, ...); got none")
        self.sentinel_ids = torch.tensor(list(sentinel_ids), dtype=torch.long)
        self.eos_token_id, self.decoder_start_token_id = eos_token_id, decoder_start_token_id
        self.noise_density, self.mean_span_length = noise_density, mean_span_length

    def lengths(self, length: int) -> tuple[int, int]:
        """(encoder input length, target length) for raw blocks of `length` tokens."""
        num_noise, num_spans = noise_counts(length, self.noise_density, self.mean_span_length)
        num_spans = min(num_spans, num_noise, length - num_noise)
        return length - num_noise + num_spans + 1, num_noise + num_spans + 1

    def block_length(self, seq_len: int) -> int:
        """The longest raw block whose corrupted input (with eos) fits `seq_len` (T5's compute_input_and_target_lengths)."""
        length = seq_len
        while self.lengths(length + 1)[0] <= seq_len:
            length += 1
        return length

    def prepare(self, blocks: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        B, L = blocks.shape
        inputs, targets = [], []
        for row in blocks:
            noise = random_spans_noise_mask(L, self.noise_density, self.mean_span_length, generator)  # (L,)
            starts = noise & ~torch.cat([torch.zeros(1, dtype=torch.bool), noise[:-1]])  # first token of each span
            span_index = starts.long().cumsum(0) - 1  # span number at each position (valid where noise)
            if int(starts.sum()) > len(self.sentinel_ids):
                raise ConfigError(f"{int(starts.sum())} noise spans need more than the {len(self.sentinel_ids)} sentinels available")
            sentinel_at = self.sentinel_ids[span_index.clamp(min=0)]
            # input: keep non-noise tokens, put a sentinel at each span start, drop the rest of the span
            kept = torch.where(starts, sentinel_at, row)[starts | ~noise]
            # target: the inverse (sentinel at each span start followed by the span's tokens)
            span_tokens = torch.where(noise, row, torch.full_like(row, -1))
            target = torch.stack([torch.where(starts, sentinel_at, -1), span_tokens], dim=1).reshape(-1)  # (2L,)
            target = target[target >= 0]
            eos = torch.tensor([self.eos_token_id])
            inputs.append(torch.cat([kept, eos]))
            targets.append(torch.cat([target, eos]))
        input_ids = torch.stack(inputs)  # (B, T_enc)
        labels = torch.stack(targets)  # (B, T_dec)
        start = torch.full((B, 1), self.decoder_start_token_id, dtype=labels.dtype)
        decoder_input_ids = torch.cat([start, labels[:, :-1]], dim=1)  # (B, T_dec) teacher forcing, shifted right
        return {"input_ids": input_ids, "decoder_input_ids": decoder_input_ids, "labels": labels}

    def reconstruct(self, input_ids: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Re-insert the target's spans at the input's sentinels -> the original token ids (one row)."""
        sentinels = set(self.sentinel_ids.tolist())
        spans: dict[int, list[int]] = {}
        current: list[int] | None = None
        for tok in labels.tolist()[:-1]:  # drop the trailing eos; an eos inside a span is data
            if tok in sentinels:
                current = spans.setdefault(tok, [])
            elif current is not None:
                current.append(tok)
        out: list[int] = []
        for tok in input_ids.tolist()[:-1]:  # drop the trailing eos
            out.extend(spans[tok] if tok in sentinels else [tok])
        return out

    def loss(self, model, batch):
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       decoder_input_ids=batch["decoder_input_ids"])  # (B, T_dec, V)
        return token_cross_entropy(logits, batch["labels"])
