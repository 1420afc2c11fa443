"""A slot-based KV cache for continuous batching: every running sequence owns one row and its own length.

``Cache`` (kv_cache.py) serves one generation: all rows were prefilled together and share one length.
A server's batch is different: requests join and leave at any step, so each row ("slot") holds a
sequence of its own length, and a decode step appends one token to every row at that row's own
position. ``SlotCache`` keeps that storage and bookkeeping. For each forward it hands out a *view*
that presents the ``Cache`` interface the decoder ``Stack`` already uses (``layers[i].update(k, v,
start)``, ``cross``, ``length``) and carries, as explicit constructor arguments, the rows and positions
that one forward writes; the cache itself keeps no mode between calls, so the model code does not change
and nothing depends on the order of calls:

* ``prefill(row, lengths) -> (PrefillView, mask)``: new sequences written into rows row, row+1, ...
  from position 0: one prompt alone (exactly a lone prefill), or several as one right-padded batch.
* ``decode() -> (DecodeView, position_ids, mask)``: one token for each of the `A` active rows
  (0..A-1). Row i writes its key/value at position ``lengths[i]`` and attends to keys
  ``0..lengths[i]``; keys past a row's own length are masked, so a short row never sees a longer
  row's stale entries.
* ``load_row(row, cache)``: a prompt prefilled in chunks into a one-row ``Cache`` of its own moves
  into `row` (one copy per layer).
* ``remove(row)``: a finished row is replaced by the last active row (one copy of that row's
  entries), so the active rows always stay the contiguous prefix 0..A-1 and attention reads a view,
  never a gathered copy.

Both views count their new entries in ``lengths`` as soon as they are made (a prefill's rows hold
their prompt lengths, a decode step's rows one more each). A forward that fails leaves those rows'
contents undefined: the caller removes them (the serving scheduler ends their requests).

Capacity grows on demand (doubling, up to `max_capacity`) and never shrinks, so memory follows the
longest sequence seen rather than the context window times the slot count.

Shapes: N slots, A active rows (A <= N), B prompts of a prefill, Hkv key/value heads, L capacity,
D head dim, T new positions, S keys attended.
"""

from __future__ import annotations

import torch

from lmlab.errors import ConfigError, DataError


class SlotLayer:
    """One layer's keys/values for all slots: (N, Hkv, L, D) each. Written only through a view."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (N, Hkv, L, D)


class _PrefillWrite:
    """One layer of a ``PrefillView``: the ``KVCache.update`` contract for rows `rows`."""

    def __init__(self, layer: SlotLayer, rows: slice):
        self.layer, self.rows = layer, rows

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, Hkv, T, D) into this view's rows at positions start..start+T-1 -> keys/values (B, Hkv, end, D)."""
        end = start + k.shape[2]
        self.layer.k[self.rows, :, start:end] = k
        self.layer.v[self.rows, :, start:end] = v
        return self.layer.k[self.rows, :, :end], self.layer.v[self.rows, :, :end]


class _DecodeWrite:
    """One layer of a ``DecodeView``: row i writes at its own position ``positions[i]``."""

    def __init__(self, layer: SlotLayer, rows: torch.Tensor, positions: torch.Tensor, keys: int):
        self.layer, self.rows, self.positions, self.keys = layer, rows, positions, keys

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (A, Hkv, 1, D) at each row's own position -> keys/values (A, Hkv, S, D), views without a copy."""
        A = k.shape[0]
        self.layer.k[self.rows, :, self.positions] = k[:, :, 0]  # advanced indexing: (A, Hkv, D) slices
        self.layer.v[self.rows, :, self.positions] = v[:, :, 0]
        return self.layer.k[:A, :, :self.keys], self.layer.v[:A, :, :self.keys]


class PrefillView:
    """The ``Cache`` one prefill forward sees: prompts written into rows ``row..row+B-1`` from position 0."""

    def __init__(self, layers: list[SlotLayer], row: int, n_rows: int):
        self.row, self.n_rows = row, n_rows
        self.layers = [_PrefillWrite(layer, slice(row, row + n_rows)) for layer in layers]
        self.cross: list[None] = [None] * len(layers)  # decoder-only: no cross-attention entries
        self.length = 0  # past positions: a prefill starts at 0 (the Stack sets it to T afterwards)


class DecodeView:
    """The ``Cache`` one decode step sees: active row i writes at ``positions[i]`` and reads keys 0..S-1
    (S = the longest row's length + 1; the mask hides each shorter row's keys past its own length)."""

    def __init__(self, layers: list[SlotLayer], rows: torch.Tensor, positions: torch.Tensor, keys: int):
        self.rows, self.positions = rows, positions  # (A,) each
        self.layers = [_DecodeWrite(layer, rows, positions, keys) for layer in layers]
        self.cross: list[None] = [None] * len(layers)
        self.length = keys - 1  # the Stack's "past": it attends to past + 1 = S keys


class SlotCache:
    """KV cache rows for up to `slots` sequences of independent lengths (see the module docstring)."""

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, head_dim: int, max_capacity: int,
                 dtype: torch.dtype = torch.float32, device=None, initial_capacity: int = 64):
        if slots < 1:
            raise ConfigError(f"slots={slots} must be >= 1")
        self.slots, self.max_capacity = slots, max_capacity
        self.shape = (slots, n_kv_heads, min(initial_capacity, max_capacity), head_dim)
        self.dtype, self.device = dtype, device
        self.layers = [SlotLayer(torch.zeros(self.shape, dtype=dtype, device=device),
                                 torch.zeros(self.shape, dtype=dtype, device=device)) for _ in range(n_layers)]
        self.lengths: list[int] = []  # tokens cached in each active row; row i is lengths[i]
        self._rows = torch.arange(slots, device=device)

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

    def copy_row(self, src: int, dst: int) -> None:
        """Copy row `src`'s entries into row `dst`: a second sequence with the same prompt (n choices of one
        request, best-of-n samples) starts from the first one's prefill instead of its own."""
        for row in (src, dst):
            if not 0 <= row < self.active:
                raise DataError(f"row {row} is not active (active rows: 0..{self.active - 1})")
        n = self.lengths[src]
        for layer in self.layers:
            layer.k[dst, :, :n] = layer.k[src, :, :n]
            layer.v[dst, :, :n] = layer.v[src, :, :n]
        self.lengths[dst] = n

    # --- the view of one forward -----------------------------------------------------------------
    def prefill(self, row: int, lengths: int | list[int]) -> tuple[PrefillView, torch.Tensor | None]:
        """Prompts of `lengths` into rows row, row+1, ... from position 0 -> (the forward's cache view,
        its (B, T) key mask or None).

        One prompt (an int length) is the computation of a lone prefill. Several (a list of lengths, for
        consecutive active rows) go as one right-padded (B, T) batch: each row's real tokens keep positions
        0..T_i-1, so the mask only has to hide the padding keys at the end of shorter rows; what those
        padding positions write into the cache lies past the row's length, where the decode mask never
        looks and the next tokens overwrite it.
        """
        lengths = [lengths] if isinstance(lengths, int) else list(lengths)
        if not 0 <= row <= row + len(lengths) <= self.active:
            raise DataError(f"rows {row}..{row + len(lengths) - 1} are not all active (active rows: 0..{self.active - 1})")
        T = max(lengths)
        self.ensure_capacity(T)
        self.lengths[row:row + len(lengths)] = lengths
        view = PrefillView(self.layers, row, len(lengths))
        if min(lengths) == T:
            return view, None
        keys = torch.arange(T, device=self.device)  # (T,)
        return view, (keys[None, :] < torch.tensor(lengths, device=self.device)[:, None]).long()  # (B, T)

    def decode(self) -> tuple[DecodeView, torch.Tensor, torch.Tensor | None]:
        """One new token per active row -> (the forward's cache view, position_ids (A, 1), attention_mask
        (A, S) or None); every active row then counts one more entry.

        The mask is None when every row has the same length: then nothing needs blocking and the step is
        the same computation as an unpadded batch (or a lone sequence).
        """
        A = self.active
        if A == 0:
            raise DataError("a decode step needs at least one active row")
        longest = max(self.lengths)
        self.ensure_capacity(longest + 1)
        positions = torch.tensor(self.lengths, dtype=torch.long, device=self.device)  # (A,) each row's next position
        mask = None
        if min(self.lengths) != longest:
            keys = torch.arange(longest + 1, device=self.device)  # (S,)
            mask = (keys[None, :] <= positions[:, None]).long()  # (A, S) row i sees keys 0..lengths[i]
        self.lengths = [n + 1 for n in self.lengths]
        return DecodeView(self.layers, self._rows[:A], positions, longest + 1), positions[:, None], mask

    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)
