"""Training checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint holds the model and optimizer state, the scheduler, the random-number states (python,
numpy, torch CPU and CUDA), the sampler position, the step and the run's config. It is written to a
temporary file in the same directory, fsync'ed, then moved over the old one with ``os.replace`` (an
atomic rename on POSIX), and the directory is fsync'ed: a crash at any moment leaves either the old
or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.errors import CheckpointError

# test hook: seconds to sleep between writing the temporary file and renaming it (see tests)
SLEEP_BEFORE_RENAME_ENV = "LMLAB_TEST_CHECKPOINT_SLEEP"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """Read a checkpoint written by ``save_checkpoint`` (CheckpointError when missing or unreadable)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        # weights_only=False: the state holds python/numpy RNG tuples, and we wrote the file ourselves
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {exc})") from None
