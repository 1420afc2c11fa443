"""Pre-training data: documents -> token shards on disk -> fixed-length blocks -> a resumable sampler.

1. ``iter_documents``   reads text files (blank-line separated documents), JSONL (one field per line)
                        or a Hugging Face ``datasets`` id (``hf:NAME[:CONFIG]``, needs `datasets` + network).
2. ``tokenize_corpus``  encodes every document once, joins them with eos, and writes ``numpy.memmap``
                        shards (uint16 when the vocabulary fits, else uint32) plus ``manifest.json``
                        (tokenizer hash, dtype, counts, shards). A matching manifest is reused, not redone.
3. ``PackedBlocks``     cuts the token stream into fixed-length blocks; the last `val_fraction` of the
                        blocks are the held-out validation split.
4. ``BlockSampler``     a seeded permutation per epoch; its state (seed, epoch, position) goes into
                        checkpoints so a resumed run sees exactly the batches it would have seen. Under
                        DDP each rank takes a disjoint strided slice of every global batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from lmlab.errors import DataError
from lmlab.jsonl import iter_objects

MANIFEST = "manifest.json"
FORMAT = 1


# --- 1. documents -----------------------------------------------------------------------------
def iter_documents(sources: Sequence[str | Path], field: str = "text") -> Iterator[str]:
    """Yield documents from each source in order (see module docstring for the formats)."""
    for source in sources:
        source = str(source)
        if source.startswith("hf:"):
            yield from _hf_documents(source[3:], field)
            continue
        path = Path(source)
        if not path.exists():
            raise DataError(f"data file {source!r} does not exist")
        if path.suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as f:
                for lineno, record in iter_objects(f, source):
                    if field not in record:
                        raise DataError(f"{source}:{lineno} has no field {field!r}; fields: {', '.join(record)}")
                    if record[field]:
                        yield str(record[field])
        else:
            text = path.read_text(encoding="utf-8")
            for doc in text.split("\n\n"):
                if doc.strip():
                    yield doc.strip("\n")


def _hf_documents(name: str, field: str) -> Iterator[str]:
    try:
        import datasets  # optional (pip install 'lmlab[data]'), and slow to import: only for hf: sources
    except ImportError:
        raise DataError(f"data source 'hf:{name}' needs the `datasets` package (pip install datasets)") from None
    dataset, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset, config or None, split="train")
    except Exception as exc:  # offline, unknown id, ...: one clear line
        raise DataError(f"cannot load dataset 'hf:{name}' ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if field not in ds.column_names:
        raise DataError(f"dataset 'hf:{name}' has no field {field!r}; fields: {', '.join(ds.column_names)}")
    for record in ds:
        if record[field]:
            yield str(record[field])


# --- 2. token shards --------------------------------------------------------------------------
def tokenizer_hash(tokenizer_path: str | Path) -> str:
    return hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()


def _sources_fingerprint(sources: Sequence[str | Path], field: str) -> list:
    out = []
    for source in sources:
        path = Path(str(source))
        out.append([str(source), field, path.stat().st_size if path.exists() else None,
                    path.stat().st_mtime_ns if path.exists() else None])
    return out


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def tokenize_corpus(sources: Sequence[str | Path], tokenizer_path: str | Path, out_dir: str | Path,
                    field: str = "text", eos_token_id: int | None = None, shard_tokens: int = 2**26,
                    batch_docs: int = 256, show_progress: bool = True) -> dict:
    """Encode `sources` once into token shards under `out_dir` -> the manifest (also written as manifest.json).

    Each document is followed by `eos_token_id` (documents are packed later, so eos marks the seams).
    If `out_dir` already holds a manifest for the same tokenizer and unchanged sources it is reused.
    """
    tokenizer_path = Path(tokenizer_path)
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.json"
    if not tokenizer_path.exists():
        raise DataError(f"tokenizer file {str(tokenizer_path)!r} does not exist")
    for source in sources:
        if not str(source).startswith("hf:") and not Path(str(source)).exists():
            raise DataError(f"data file {str(source)!r} does not exist")
    out = Path(out_dir)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    vocab_size = tokenizer.get_vocab_size()
    identity = {"format": FORMAT, "tokenizer_sha256": tokenizer_hash(tokenizer_path),
                "sources": _sources_fingerprint(sources, field), "eos_token_id": eos_token_id}
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if all(old.get(k) == v for k, v in identity.items()):
            return old
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    shards: list[dict] = []
    buffer: list[np.ndarray] = []
    buffered = n_docs = n_tokens = 0

    def flush() -> None:
        nonlocal buffer, buffered
        if not buffered:
            return
        name = f"shard_{len(shards):05d}.bin"
        data = np.concatenate(buffer).astype(dtype)
        mm = np.memmap(out / name, dtype=dtype, mode="w+", shape=(len(data),))
        mm[:] = data
        mm.flush()
        del mm
        shards.append({"file": name, "n_tokens": int(len(data))})
        buffer, buffered = [], 0

    docs = iter_documents(sources, field)
    bar = tqdm(desc="tokenizing", unit=" docs", disable=not show_progress)
    while True:
        chunk = [d for _, d in zip(range(batch_docs), docs)]
        if not chunk:
            break
        for encoding in tokenizer.encode_batch(chunk, add_special_tokens=False):
            ids = encoding.ids + ([eos_token_id] if eos_token_id is not None else [])
            buffer.append(np.asarray(ids, dtype=np.int64))
            buffered += len(ids)
            n_tokens += len(ids)
            if buffered >= shard_tokens:  # shards end at document boundaries
                flush()
        n_docs += len(chunk)
        bar.update(len(chunk))
    flush()
    bar.close()
    if n_tokens == 0:
        raise DataError(f"no documents found in {', '.join(map(str, sources))} (field {field!r})")
    manifest = dict(identity, dtype=dtype.name, vocab_size=vocab_size, n_documents=n_docs, n_tokens=n_tokens,
                    shards=shards)
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    return manifest


class TokenStore:
    """The concatenated token stream of a tokenized corpus, read through memory maps."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.exists():
            raise DataError(f"no {MANIFEST} in {str(self.dir)!r}; tokenize the corpus first")
        self.manifest = json.loads(path.read_text())
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = [np.memmap(self.dir / shard["file"], dtype=dtype, mode="r", shape=(shard["n_tokens"],))
                       for shard in self.manifest["shards"]]
        self.offsets = np.cumsum([0] + [len(shard) for shard in self.shards])  # start of each shard in the stream
        self.n_tokens = int(self.offsets[-1])

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the stream as int64, crossing shard boundaries when needed."""
        parts = []
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < end:
            lo = start - int(self.offsets[i])
            take = min(end - start, len(self.shards[i]) - lo)
            parts.append(np.asarray(self.shards[i][lo:lo + take], dtype=np.int64))
            start += take
            i += 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# --- 3. blocks --------------------------------------------------------------------------------
class PackedBlocks:
    """Fixed-length blocks of `block_len` tokens over a TokenStore's stream, split train / validation.

    Block i of the stream is tokens [i*L, (i+1)*L); the tail shorter than L is dropped. The last
    ceil(val_fraction * n) blocks (at least one when val_fraction > 0 and n >= 2) are validation.
    """

    def __init__(self, store: TokenStore, block_len: int, split: str = "train", val_fraction: float = 0.05):
        if split not in ("train", "validation"):
            raise DataError(f"split={split!r} is not valid; choose one of: train, validation")
        self.store, self.block_len = store, block_len
        total = store.n_tokens // block_len
        if total < 1:
            raise DataError(f"the corpus in {str(store.dir)!r} has {store.n_tokens} tokens, fewer than one "
                            f"block of {block_len}; add data or lower seq_len")
        n_val = min(math.ceil(val_fraction * total), total - 1) if val_fraction > 0 and total >= 2 else 0
        if split == "validation":
            self.first, self.n = total - n_val, n_val
        else:
            self.first, self.n = 0, total - n_val

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(f"block {i} out of range [0, {self.n})")
        start = (self.first + i) * self.block_len
        return torch.from_numpy(self.store.read(start, start + self.block_len))

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self[int(i)] for i in indices])  # (B, L)


# --- 4. sampler -------------------------------------------------------------------------------
class BlockSampler:
    """Deterministic, resumable batches of block indices.

    Each epoch is a permutation of range(n_blocks) drawn from ``seed + epoch``; a step consumes
    `batch_size` consecutive entries (the global batch; an incomplete tail is skipped). With
    `world_size` > 1, rank r takes entries r, r + world, ... of each global batch, so the ranks'
    batches are disjoint and together equal the single-process batch.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size > n_blocks:
            raise DataError(f"batch of {batch_size} blocks exceeds the {n_blocks} training blocks; lower batch_size")
        if batch_size % world_size:
            raise DataError(f"global batch_size={batch_size} must be divisible by the world size {world_size}")
        self.n_blocks, self.batch_size, self.seed = n_blocks, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._perm: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(self.n_blocks, generator=g)
        return self._perm

    def next(self) -> list[int]:
        """This rank's block indices for the next global batch."""
        if self.position + self.batch_size > self.n_blocks:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        batch = self._permutation()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch[self.rank::self.world_size].tolist()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._perm = None
