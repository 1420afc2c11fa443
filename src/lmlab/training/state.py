"""Resume state (``lmlab.training.state``; not to be confused with ``lmlab.checkpoints``, the weight formats):
everything a training run needs to continue exactly, written atomically, read without pickle.

A checkpoint holds the model and optimizer state, the scheduler, every rank's random-number states
(python, numpy, torch CPU and CUDA), the sampler position, the step and the run's config. It is written
to a temporary file in the same directory, fsync'ed, then moved over the old one with ``os.replace``
(an atomic rename on POSIX), and the directory is fsync'ed: a crash at any moment leaves either the old
or the new checkpoint, never a torn one.

It is read with ``torch.load(weights_only=True)``, which builds only tensors, containers and plain
numbers/strings and refuses any other python object *before* constructing it. A run directory someone
else wrote therefore cannot run code on the reader's machine. That is why the RNG states are stored as
tensors and plain values (``rng_state``) instead of the tuples and numpy arrays ``random.getstate()``
and ``np.random.get_state()`` return. Checkpoints of formats 1 and 2 pickled those objects; they are
refused with an error that says how to go on.

Under DDP/FSDP every rank has its own random stream (``seed_rank_stream``): ranks see different data,
so they must also draw different dropout masks. Each rank's state is gathered into the checkpoint
(``distributed.gather_rng_states``) and each rank gets its own back on resume (``restore_rank_rng_state``).
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.errors import CheckpointError

# 3: RNG states as tensors/plain values, one per rank (read with weights_only=True); 1-2 pickled them
CHECKPOINT_FORMAT = 3

# test hook: seconds to sleep between writing the temporary file and renaming it (see tests)
SLEEP_BEFORE_RENAME_ENV = "LMLAB_TEST_CHECKPOINT_SLEEP"


# --- random-number states as tensors and plain values ---------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, CUDA) as tensors and plain values.

    ``random.getstate()`` is (version, 625-int tuple: 624 Mersenne-Twister words + position, gauss_next);
    ``np.random.get_state()`` is ("MT19937", uint32 array (624,), position, has_gauss, cached_gaussian).
    The word arrays become int64 tensors (a uint32 fits), everything else stays a plain int/float/str.
    """
    version, words, gauss_next = random.getstate()
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()  # a list of uint8 tensors, one per device
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states ``rng_state`` returned (the exact inverse of its conversions)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, e.g. (seed, rank): SeedSequence mixes them, so (7, 1) and (8, 0)
    give unrelated streams instead of overlapping ones as ``seed + rank`` would."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_all(seed: int) -> None:
    """Seed python's `random`, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank_stream(seed: int, rank: int) -> None:
    """Give this rank its own random stream (dropout, ...), seeded from (seed, rank).

    Call it after the model is initialised from ``seed_all(seed)``: the initial weights must be the
    same on every rank, the dropout masks must not be.
    """
    seed_all(derived_seed(seed, rank))


def restore_rank_rng_state(states: list[dict[str, Any]], rank: int, world_size: int, seed: int, step: int) -> bool:
    """Put back rank `rank`'s saved RNG state (`states`: one per rank, in rank order) -> True when exact.

    A checkpoint resumed with another number of ranks has no state for some ranks and a different
    data split anyway; each rank then starts a fresh stream from (seed, rank, step), which keeps the
    run reproducible but not equal to an uninterrupted one (the caller may warn) -> False.
    """
    if len(states) == world_size:
        set_rng_state(states[rank])
        return True
    seed_all(derived_seed(seed, rank, step))
    return False


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` with torch.save to `path` atomically (temp file + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(SLEEP_BEFORE_RENAME_ENV):
            time.sleep(float(os.environ[SLEEP_BEFORE_RENAME_ENV]))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` without unpickling python objects.

    CheckpointError when the file is missing, unreadable, or an older checkpoint that holds pickled
    objects (nothing in it is executed: ``weights_only=True`` stops at the first such object).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        objects = _pickled_objects(path)
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds pickled python objects ({objects}), as lmlab checkpoints before "
            f"format {CHECKPOINT_FORMAT} did; lmlab no longer unpickles them because that can run code from "
            f"the file. Start the run again in a new out_dir, or finish it with the lmlab version that "
            f"wrote it") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {exc})") from None


def _pickled_objects(path: Path) -> str:
    """The python globals a checkpoint's pickle refers to, found by scanning it (nothing is run)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch zip file: say what we know
        return "not only tensors"
    return ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "") if names else "not only tensors"
