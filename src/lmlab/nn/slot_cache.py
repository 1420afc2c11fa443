"""A slot-based KV cache for continuous batching: every running sequence owns one row and its own length.

``Cache`` (kv_cache.py) serves one generation: all rows were prefilled together and share one length.
A server's batch is different: requests join and leave at any step, so each row ("slot") holds a
sequence of its own length, and a decode step appends one token to every row at that row's own
position. ``SlotCache`` keeps that bookkeeping and presents the ``Cache`` interface the decoder
``Stack`` already uses (``layers[i].update(k, v, start)``, ``cross``, ``length``), so the model code
does not change:

* ``bind_prefill(row, lengths)``: the next forward is new sequences written into rows row, row+1, ...
  from position 0: one prompt alone (exactly a lone prefill), or several as one right-padded batch.
* ``bind_decode()``: the next forward is one token for each of the `A` active rows (0..A-1). Row i
  writes its key/value at position ``lengths[i]`` and attends to keys ``0..lengths[i]``; the caller
  passes ``decode_inputs()``'s per-row positions and key mask. Keys past a row's own length are
  masked, so a short row never sees a longer row's stale entries.
* ``load_row(row, cache)``: a prompt prefilled in chunks into a one-row ``Cache`` of its own moves
  into `row` (one copy per layer).
* ``remove(row)``: a finished row is replaced by the last active row (one copy of that row's
  entries), so the active rows always stay the contiguous prefix 0..A-1 and attention reads a view,
  never a gathered copy.

Capacity grows on demand (doubling, up to `max_capacity`) and never shrinks, so memory follows the
longest sequence seen rather than the context window times the slot count.

Shapes: N slots, A active rows (A <= N), Hkv key/value heads, L capacity, D head dim, S keys attended.
"""

from __future__ import annotations

import torch

from lmlab.errors import ConfigError, DataError


class SlotLayer:
    """One layer's keys/values for all slots; writes go where the owning ``SlotCache`` is bound."""

    def __init__(self, owner: "SlotCache", k: torch.Tensor, v: torch.Tensor):
        self.owner, self.k, self.v = owner, k, v  # (N, Hkv, L, D)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``KVCache.update`` contract for the bound mode -> all keys/values the new queries may read."""
        owner = self.owner
        if owner.mode == "prefill":  # k (B, Hkv, T, D) into rows row..row+B-1 at positions start..start+T-1
            rows, end = slice(owner.row, owner.row + k.shape[0]), start + k.shape[2]
            self.k[rows, :, start:end] = k
            self.v[rows, :, start:end] = v
            return self.k[rows, :, :end], self.v[rows, :, :end]  # (B, Hkv, end, D)
        if owner.mode == "decode":  # k (A, Hkv, 1, D): row i writes at its own position lengths[i]
            A = k.shape[0]
            rows, pos = owner._rows[:A], owner._positions
            self.k[rows, :, pos] = k[:, :, 0]  # advanced indexing: (A, Hkv, D) slices
            self.v[rows, :, pos] = v[:, :, 0]
            S = owner.length + 1
            return self.k[:A, :, :S], self.v[:A, :, :S]  # (A, Hkv, S, D) views, no copy
        raise DataError("SlotCache used without bind_prefill() or bind_decode()")


class SlotCache:
    """KV cache rows for up to `slots` sequences of independent lengths (see the module docstring)."""

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, head_dim: int, max_capacity: int,
                 dtype: torch.dtype = torch.float32, device=None, initial_capacity: int = 64):
        if slots < 1:
            raise ConfigError(f"slots={slots} must be >= 1")
        self.slots, self.max_capacity = slots, max_capacity
        self.shape = (slots, n_kv_heads, min(initial_capacity, max_capacity), head_dim)
        self.dtype, self.device = dtype, device
        self.layers = [SlotLayer(self, torch.zeros(self.shape, dtype=dtype, device=device),
                                 torch.zeros(self.shape, dtype=dtype, device=device)) for _ in range(n_layers)]
        self.cross: list[None] = [None] * n_layers  # decoder-only: no cross-attention entries
        self.lengths: list[int] = []  # tokens cached in each active row; row i is lengths[i]
        self.length = 0  # what the Stack reads as "past" (and overwrites after a forward)
        self.mode: str | None = None
        self.row = 0
        self._rows = torch.arange(slots, device=device)
        self._positions = torch.zeros(0, dtype=torch.long, device=device)

    @classmethod
    def for_model(cls, model, slots: int, max_capacity: int | None = None) -> "SlotCache":
        """A slot cache shaped for a decoder-only `model` (max_capacity defaults to its context window)."""
        cfg = model.config
        if cfg.arch != "decoder":
            raise ConfigError(f"a slot cache serves decoder-only models; this model has arch={cfg.arch!r}")
        if cfg.positional == "t5_relative":
            raise ConfigError("a slot cache needs per-row positions; the T5 relative bias has one offset per batch")
        return cls(len(model.decoder.layers), slots, cfg.n_kv_heads, cfg.head_dim, max_capacity or cfg.max_seq_len,
                   model.dtype, model.device)

    # --- bookkeeping ---------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.shape[2]

    def ensure_capacity(self, positions: int) -> None:
        """Grow every layer (doubling, capped at max_capacity) so each row can hold `positions` entries."""
        if positions <= self.capacity:
            return
        if positions > self.max_capacity:
            raise DataError(f"a sequence of {positions} positions exceeds the cache's max_capacity={self.max_capacity}")
        new = min(self.max_capacity, max(positions, 2 * self.capacity))
        old = self.capacity
        self.shape = (*self.shape[:2], new, self.shape[3])
        for layer in self.layers:
            for name in ("k", "v"):
                grown = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
                grown[:, :, :old] = getattr(layer, name)
                setattr(layer, name, grown)

    def add(self, length: int = 0) -> int:
        """Claim the next free row for a new sequence -> its row index (always ``active - 1`` after)."""
        if self.active >= self.slots:
            raise DataError(f"all {self.slots} slots are in use")
        self.lengths.append(length)
        return self.active - 1

    def remove(self, row: int) -> None:
        """Free `row`: the last active row moves into it (callers mirror this swap in their own lists)."""
        last = self.active - 1
        if not 0 <= row <= last:
            raise DataError(f"row {row} is not active (active rows: 0..{last})")
        if row != last:
            n = self.lengths[last]
            for layer in self.layers:
                layer.k[row, :, :n] = layer.k[last, :, :n]
                layer.v[row, :, :n] = layer.v[last, :, :n]
            self.lengths[row] = n
        self.lengths.pop()

    def load_row(self, row: int, cache) -> None:
        """Copy a one-row ``Cache`` (kv_cache.py) into `row`: a prompt prefilled elsewhere, chunk by chunk.

        The scheduler prefills a long prompt in chunks into a private ``Cache`` of its own, so that the
        slot cache's active rows stay the ones that decode; once the last chunk is in, the row's
        ``cache.length`` entries move here in one copy per layer.
        """
        n = cache.length
        if not 0 <= row < self.active:
            raise DataError(f"row {row} is not active (active rows: 0..{self.active - 1})")
        if len(cache.layers) != len(self.layers) or cache.layers[0].k.shape[0] != 1:
            raise DataError(f"load_row() takes a one-row cache of {len(self.layers)} layers")
        self.ensure_capacity(n)
        for mine, theirs in zip(self.layers, cache.layers):
            mine.k[row, :, :n] = theirs.k[0, :, :n]  # (Hkv, n, D)
            mine.v[row, :, :n] = theirs.v[0, :, :n]
        self.lengths[row] = n

    # --- binding the next forward ----------------------------------------------------------------
    def bind_prefill(self, row: int, n_tokens: int | list[int]) -> torch.Tensor | None:
        """The next forward writes prompts into rows row, row+1, ... from position 0 -> their key mask or None.

        One prompt (an int length) is the computation of a lone prefill. Several (a list of lengths, for
        consecutive rows) go as one right-padded (B, T) batch: each row's real tokens keep positions
        0..T_i-1, so the returned (B, T) mask only has to hide the padding keys at the end of shorter rows;
        what those padding positions write into the cache lies past the row's length, where the decode
        mask never looks and the next tokens overwrite it.
        """
        lengths = [n_tokens] if isinstance(n_tokens, int) else list(n_tokens)
        T = max(lengths)
        self.ensure_capacity(T)
        self.mode, self.row, self.length = "prefill", row, 0
        self.lengths[row:row + len(lengths)] = lengths
        if min(lengths) == T:
            return None
        keys = torch.arange(T, device=self.device)  # (T,)
        return (keys[None, :] < torch.tensor(lengths, device=self.device)[:, None]).long()  # (B, T)

    def bind_decode(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next forward is one token per active row -> (position_ids (A, 1), attention_mask (A, S) or None).

        The mask is None when every row has the same length: then nothing needs blocking and the step is
        the same computation as an unpadded batch (or a lone sequence).
        """
        A = self.active
        if A == 0:
            raise DataError("bind_decode() with no active rows")
        longest = max(self.lengths)
        self.ensure_capacity(longest + 1)
        self.mode, self.length = "decode", longest  # the Stack attends to S = longest + 1 keys
        self._positions = torch.tensor(self.lengths, dtype=torch.long, device=self.device)  # (A,)
        position_ids = self._positions[:, None]  # (A, 1) each row's next position
        mask = None
        if min(self.lengths) != longest:
            keys = torch.arange(longest + 1, device=self.device)  # (S,)
            mask = (keys[None, :] <= self._positions[:, None]).long()  # (A, S) row i sees keys 0..lengths[i]
        return position_ids, mask

    def advance(self) -> None:
        """After a decode step: every active row holds one more entry."""
        self.lengths = [n + 1 for n in self.lengths]
        self.mode = None

    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)
