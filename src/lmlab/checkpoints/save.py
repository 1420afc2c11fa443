"""Writing model directories without destroying anything lmlab did not write.

Every writer (``save_model``, ``export_hf``, ``lmlab quantize``, ``lmlab merge``, ``lmlab export``)
goes through ``atomic_dir``: the files are written into a temporary sibling directory, which is
moved into place only when complete, so a failure leaves nothing behind and the old output intact.
Before anything is written, ``check_output`` applies the output rules (docs/checkpoints.md):

* the output may not be a source of the write, lie inside one, or contain one;
* an existing non-empty directory is replaced only if lmlab wrote it (it holds ``MARKER_FILE``, or,
  from lmlab before the marker, a config.json with ``lmlab_format``), and only with ``force=True``
  (``--force``); a directory someone else filled is never touched, whatever ``force`` says;
* an existing file, or a symbolic link, at the output path is refused.

Each output gets ``MARKER_FILE`` (``lmlab_output.json``): which lmlab version wrote it, what wrote it
(``save_model``, ``quantize``, ...), when, and from which sources.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from lmlab import __version__
from lmlab.checkpoints import native
from lmlab.checkpoints.families import family_for_config
from lmlab.errors import CheckpointError

__all__ = ["MARKER_FILE", "atomic_dir", "check_output", "read_marker", "written_by_lmlab", "save_tokenizer",
           "save_model", "export_hf"]

MARKER_FILE = "lmlab_output.json"
WRITER = "lmlab"


# --- the output rules -----------------------------------------------------------------------------
def read_marker(directory: str | Path) -> dict | None:
    """The marker of a directory lmlab wrote, or None when it has none (or an unreadable one)."""
    try:
        marker = json.loads((Path(directory) / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) and marker.get("writer") == WRITER else None


def written_by_lmlab(directory: str | Path) -> bool:
    """Whether lmlab wrote `directory`: it holds the marker, or is a checkpoint from lmlab before the marker."""
    return read_marker(directory) is not None or native.is_native(Path(directory))


def _describe_marker(directory: Path) -> str:
    marker = read_marker(directory)
    if marker is None:
        return "an lmlab checkpoint"
    return f"the output of lmlab {marker.get('what', '?')} ({marker.get('time', '?')})"


def check_output(directory: str | Path, sources: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Refuse an output path whose writing could destroy something; see the module docstring -> the path.

    `sources` are the local paths the output is made from (a model directory or file, an adapter).
    Raises CheckpointError naming the directory, in one line.
    """
    out = Path(directory).expanduser()
    real = out.resolve()
    for source in sources:
        src = Path(source).expanduser().resolve()
        if real == src or src in real.parents:
            raise CheckpointError(f"output {str(directory)!r} is {'the source' if real == src else 'inside the source'} "
                                  f"{str(source)!r}; choose a directory outside it")
        if real in src.parents:
            raise CheckpointError(f"output {str(directory)!r} contains the source {str(source)!r}; replacing it would "
                                  f"delete the source; choose another directory")
    if out.is_symlink():
        raise CheckpointError(f"output {str(directory)!r} is a symbolic link; pass the directory it points to, "
                              f"or another path")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {str(directory)!r} is a file, not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not written_by_lmlab(out):
            raise CheckpointError(f"output {str(directory)!r} is a non-empty directory lmlab did not write "
                                  f"(no {MARKER_FILE}); choose a new or empty directory")
        if not force:
            raise CheckpointError(f"output {str(directory)!r} holds {_describe_marker(out)}; pass --force "
                                  f"(force=True) to replace it")
    return out


def atomic_dir(directory: str | Path, write: Callable[[Path], None], *, what: str, force: bool = False,
               sources: Iterable[str | Path] = ()) -> Path:
    """Check the output rules, run write(tmp_dir) in a sibling temporary directory, add the marker, then
    move it into place (replacing an earlier lmlab output only with ``force``) -> the directory.

    `what` is recorded in the marker (``"save_model"``, ``"quantize"``, ...). Nothing is left on failure:
    neither the temporary directory nor a half-written output, and an earlier output stays as it was.
    """
    sources = [str(s) for s in sources]
    directory = check_output(directory, sources, force)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        marker = {"writer": WRITER, "lmlab_version": __version__, "what": what,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sources": sources}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        default_permissions(tmp)
        check_output(directory, sources, force)  # again: the directory may have changed while writing
        if directory.exists():
            backup = directory.with_name(f".{directory.name}.old-{tmp.name[-8:]}")
            directory.rename(backup)
            tmp.rename(directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def default_permissions(directory: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; give the result the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# --- writers --------------------------------------------------------------------------------------
def save_tokenizer(tokenizer, directory: Path) -> None:
    """Write `tokenizer` (anything with ``save(directory)``; None: nothing) into `directory`."""
    if tokenizer is None:
        return
    if not hasattr(tokenizer, "save"):
        raise CheckpointError(f"cannot save tokenizer of type {type(tokenizer).__name__}: it has no save(directory)")
    tokenizer.save(directory)


def refuse_trimmed_head(model, what: str) -> None:
    """A model whose output head was trimmed (a student bundle's, ``lmlab.nn.subset_head``) is not a checkpoint any
    format describes: one line instead of a file that would load wrong."""
    from lmlab.nn.subset_head import SubsetHead

    if isinstance(getattr(model, "lm_head", None), SubsetHead):
        raise CheckpointError(f"{what}: this model's output head is trimmed to {model.lm_head.ids.numel()} tokens "
                              f"(a student bundle with output_ids); load it with trim=False "
                              f"(lmlab.adapt.student.load_student) to save the whole model")


def save_model(model, directory: str | Path, tokenizer=None, *, force: bool = True, what: str = "save_model",
               sources: Iterable[str | Path] = (), extra: Callable[[Path], None] | None = None) -> Path:
    """Save in lmlab's format (config.json with ``lmlab_format`` + model.safetensors), atomically.

    ``force`` (default True here, for the training jobs that re-save ``best/`` as they improve; the
    commands pass False unless ``--force``): replace an earlier lmlab output at `directory`. A directory
    lmlab did not write, or one of `sources`, is refused whatever ``force`` says. ``extra(tmp)`` writes
    more files (a prompt recipe) into the directory before it is moved into place.
    """
    refuse_trimmed_head(model, what)

    def write(tmp: Path) -> None:
        native.write(model, tmp)
        save_tokenizer(tokenizer, tmp)
        if extra is not None:
            extra(tmp)

    return atomic_dir(directory, write, what=what, force=force, sources=sources)


def export_hf(model, directory: str | Path, tokenizer=None, *, force: bool = True, what: str = "export_hf",
              sources: Iterable[str | Path] = (), extra: Callable[[Path], None] | None = None) -> Path:
    """Write a Hugging Face directory (config.json + model.safetensors) for the model's family, atomically.

    ``force``, ``sources`` and ``extra`` as in ``save_model``.
    """
    refuse_trimmed_head(model, what)
    cfg = model.config
    family = family_for_config(cfg)
    hf_config = {**family.config_to_hf(cfg), "torch_dtype": str(model.dtype).removeprefix("torch.")}
    state = family.to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        native.write_safetensors(state, tmp / "model.safetensors", {"format": "pt"})
        save_tokenizer(tokenizer, tmp)
        if extra is not None:
            extra(tmp)

    return atomic_dir(directory, write, what=what, force=force, sources=sources)
