"""The model runner of serving: the one place that executes the model (vLLM's split: the scheduler decides
what runs, ``ModelRunner`` runs it, ``output`` turns logits into tokens and text).

It owns the slot KV cache (``lmlab.nn.slot_cache.SlotCache``): row i belongs to the scheduler's i-th
running sequence, rows are claimed at the end and freed by moving the last row into the hole, as the
scheduler mirrors in its own list. Three kinds of forward, each returning next-token logits:

* ``prefill(prompts, copies)``: one or more prompts into new rows (a lone prompt unpadded, exactly a lone
  prefill; several as one right-padded batch); a prompt asked for again (``copies``) gets a copy of its
  row instead of a prefill of its own.
* ``prefill_chunk(cache, ids)``: the next chunk of a long prompt into a one-row ``Cache`` of its own;
  ``admit(cache)`` then moves it into a new row.
* ``decode(tokens)``: one token for every active row, at each row's own position.

The decode step is a pluggable ``DecodeStep``: ``(tokens (A,), cache) -> logits (A, V)``, which writes
each row's key/value at its own position and counts one more entry per row (``SlotCache.decode()``
does both for it). ``EagerDecodeStep`` runs the PyTorch model; a compiled engine can take its place
(``ModelRunner(..., decode_step=...)``, or ``engine=NAME``: the registry's step, ``lmlab.engine.decode_step_for``)
without the scheduler or the HTTP layer knowing.

Shapes: A active rows, B prompts of one prefill, T prompt tokens, V vocabulary, C model width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch

from lmlab.errors import ConfigError
from lmlab.nn.kv_cache import Cache
from lmlab.nn.packed import maybe_packed_linears
from lmlab.nn.slot_cache import SlotCache


def check_servable(config) -> None:
    """ConfigError unless a model of this ``ModelConfig`` can be served: decoder-only, with per-row positions."""
    if config.arch != "decoder":
        raise ConfigError(f"lmlab serve runs decoder-only models; this model has arch={config.arch!r}")
    if config.positional == "t5_relative":
        raise ConfigError("lmlab serve needs per-row positions; the T5 relative bias has one offset per batch")


class DecodeStep(Protocol):
    """One decode step over the slot cache's active rows: tokens (A,) -> next-token logits (A, V)."""

    def __call__(self, tokens: torch.Tensor, cache: SlotCache) -> torch.Tensor: ...


class EagerDecodeStep:
    """The decode step as a plain forward of the PyTorch model (what serving runs unless given another)."""

    name = "eager"

    def __init__(self, model):
        self.model = model

    def __call__(self, tokens: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        view, position_ids, mask = cache.decode()  # (A, 1) positions, (A, S) mask or None
        return self.model(tokens[:, None], attention_mask=mask, position_ids=position_ids, cache=view,
                          mask_has_padding=mask is not None)[:, -1]  # (A, V)


class ModelRunner:
    """Executes a decoder-only model for the scheduler (see the module docstring).

    ``slots``: sequences decoded together (KV-cache rows); ``context_window``: the most positions one
    row holds; ``decode_step``: replaces the eager decode forward (a compiled engine); else ``engine``:
    the decode engine to ask the registry for ("auto", "native", "eager", ...; None: ``$LMLAB_ENGINE``,
    which ``lmlab serve`` sets from ``--engine``, else eager), the eager step where it cannot run.
    ``engine_name`` says which step runs.
    """

    def __init__(self, model, slots: int, context_window: int, decode_step: DecodeStep | None = None,
                 engine: str | None = None):
        check_servable(model.config)
        self.model = model.eval()
        self.slots = slots
        self.cache = SlotCache.for_model(model, slots, context_window)
        if decode_step is None:
            from lmlab.engine import decode_step_for  # the registry: serving knows no engine's internals

            decode_step = decode_step_for(self.model, engine)
        self.decode_step = decode_step or EagerDecodeStep(self.model)
        self.engine_name: str = getattr(self.decode_step, "name", type(self.decode_step).__name__)
        self.steps = 0  # decode steps run (tests and benchmarks read it)
        self.prefills = 0  # prefill forwards run (a batch of prompts or one chunk counts once)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def active(self) -> int:
        return self.cache.active

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Around the model loop: no autograd, and (CPU fp32, eager decode step) weights pre-packed for `slots`
        rows (``lmlab.nn.packed``; ``LMLAB_PACKED_GEMM=0`` turns it off; an engine's step reads the weights
        itself, so the packed copies would only cost memory)."""
        packed = maybe_packed_linears(self.model, self.slots) if isinstance(self.decode_step, EagerDecodeStep) \
            else contextlib.nullcontext()
        with torch.inference_mode(), packed:
            yield

    def prefill(self, prompts: list[torch.Tensor], copies: list[int] = ()) -> torch.Tensor:
        """Prompts (each (T_i,)) into new rows active..active+B-1, then one more row per entry of `copies`
        holding a copy of prompt copies[j]'s row (the same prompt again: its prefill is shared) -> next-token
        logits (B + len(copies), V). If the forward fails, the rows are freed again and the error propagates."""
        first = self.cache.active
        for _ in prompts:
            self.cache.add()
        try:
            self.prefills += 1
            logits = self._prefill_logits(first, prompts)
        except BaseException:
            for row in range(first + len(prompts) - 1, first - 1, -1):
                self.cache.remove(row)
            raise
        if not copies:
            return logits
        for src in copies:
            self.cache.copy_row(first + src, self.cache.add())
        return torch.cat([logits, logits[list(copies)]])

    def _prefill_logits(self, first: int, prompts: list[torch.Tensor]) -> torch.Tensor:
        lengths = [len(p) for p in prompts]
        view, mask = self.cache.prefill(first, lengths)  # mask (B, T) or None
        if len(prompts) == 1:  # exactly a lone prefill
            return self.model(prompts[0][None], cache=view, logits_to_keep=1)[:, -1]  # (1, V)
        ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long, device=self.device)  # (B, T) right-padded
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
        hidden = self.model.decode(ids, attention_mask=mask, cache=view, return_hidden=True,
                                   mask_has_padding=mask is not None)  # (B, T, C)
        rows = torch.arange(len(prompts), device=ids.device)
        last = hidden[rows, torch.tensor(lengths, device=ids.device) - 1]  # (B, C) each prompt's last token
        return self.model.logits(last[:, None])[:, 0]  # (B, V)

    def chunk_cache(self, length: int) -> Cache:
        """A one-row cache for a prompt of `length` tokens prefilled chunk by chunk."""
        return self.model.new_cache(1, length)

    def prefill_chunk(self, cache: Cache, ids: torch.Tensor) -> torch.Tensor:
        """The next chunk ids (1, n), at positions cache.length.., into `cache` -> the last position's logits (V,)."""
        self.prefills += 1
        return self.model(ids, cache=cache, logits_to_keep=1)[0, -1]  # (V,)

    def admit(self, cache: Cache) -> int:
        """A fully prefilled one-row `cache` moves into a new row -> that row."""
        row = self.cache.add()
        try:
            self.cache.load_row(row, cache)
        except BaseException:
            self.cache.remove(row)
            raise
        return row

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One token per active row (row i's last id is tokens[i]) -> next-token logits (A, V)."""
        logits = self.decode_step(torch.tensor(tokens, dtype=torch.long, device=self.device), self.cache)
        self.steps += 1
        return logits

    def release(self, row: int) -> None:
        """Free `row`: the last active row moves into it (the scheduler mirrors the swap)."""
        self.cache.remove(row)
