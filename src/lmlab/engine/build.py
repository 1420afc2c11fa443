"""Building and loading the native engine's C++ extension (``engine/csrc``), cached on disk.

The extension is compiled once per *key* -- a hash of the sources, the torch version, the compiler's
version and the Python ABI -- into ``$XDG_CACHE_HOME/lmlab/engine/<key>/lmlab_engine_native.so``
(``$LMLAB_ENGINE_CACHE`` overrides the root). Both ISA paths (AVX2 and AVX-512 VNNI) are always
compiled; the one the CPU has is chosen when the module loads, so the artifact does not depend on the
CPU it was built on (the key still records the building CPU's ISA, for the record).

Faults:

* a build runs in a private temporary directory and the finished library is moved into place with one
  ``os.replace``: a build that is killed leaves no half-written entry, and concurrent builders of the
  same key each produce a complete file (the last rename wins; both are identical);
* an entry that does not load (truncated, corrupt, built by another torch) is deleted and rebuilt once;
* a failed build (no compiler, a compile error) is recorded in ``<key>/failed.txt`` so that later
  processes fall back to eager at once instead of recompiling; ``build(force=True)`` (what
  ``scripts/setup.sh`` runs) retries.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("engine.cpp", "isa_avx2.cpp", "isa_avx512.cpp")
DEPENDS = ("ops.h", "kernels.inc")
MODULE = "lmlab_engine_native"
CFLAGS = ["-O3", "-std=c++17", "-fno-math-errno", "-Wno-maybe-uninitialized", "-Wno-unused-function"]

_loaded = None  # this process's module, or the Exception that prevented it


def cache_root() -> Path:
    root = os.environ.get("LMLAB_ENGINE_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmlab" / "engine"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=20).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def cpu_isa() -> str:
    """The best kernel ISA this CPU has, from /proc/cpuinfo: "avx512-vnni", "avx2" or "none"."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags:
        return "avx512-vnni"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "none"


def key() -> str:
    import torch

    h = hashlib.sha256()
    for name in SOURCES + DEPENDS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    cxx = compiler()
    for part in (torch.__version__, sysconfig.get_config_var("EXT_SUFFIX") or "", _compiler_version(cxx) if cxx else "-",
                 cpu_isa(), " ".join(CFLAGS)):
        h.update(part.encode())
    return h.hexdigest()[:16]


def entry_dir() -> Path:
    return cache_root() / key()


def library_path() -> Path:
    return entry_dir() / f"{MODULE}.so"


def _import(path: Path):
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _compile(target: Path, verbose: bool = False):
    """Compile into a private temporary directory, move the library to `target` in one rename -> the module."""
    import torch.utils.cpp_extension as ext

    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(".*"):  # what killed builds left (an hour old: no live build is that slow)
        if stale.name.startswith((".build-", f".{target.name}.")) and time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=target.parent))
    try:
        module = ext.load(name=MODULE, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=CFLAGS,
                 extra_include_paths=[str(CSRC)], build_directory=str(tmp), verbose=verbose, with_cuda=False)
        built = tmp / f"{MODULE}.so"
        if not built.exists():
            raise RuntimeError(f"the build wrote no {built.name}")
        staged = target.parent / f".{target.name}.{os.getpid()}.tmp"
        shutil.copyfile(built, staged)
        os.replace(staged, target)
        return module  # imported from the temporary copy (still mapped after it is removed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(build_if_missing: bool = True, force: bool = False, verbose: bool = False):
    """The extension module (built if needed), or raise with a one-line reason."""
    global _loaded
    if _loaded is not None and not force:
        if isinstance(_loaded, Exception):
            raise _loaded
        return _loaded
    try:
        _loaded = _load(build_if_missing, force, verbose)
    except Exception as exc:  # noqa: BLE001  the reason becomes the fallback note
        _loaded = exc
        raise
    return _loaded


def _load(build_if_missing: bool, force: bool, verbose: bool):
    path, failed = library_path(), entry_dir() / "failed.txt"
    if path.exists() and not force:
        try:
            return _import(path)
        except (ImportError, OSError) as exc:  # truncated or corrupt: rebuild it once
            print(f"note: native engine cache entry {path} does not load ({exc}); rebuilding", file=sys.stderr)
            path.unlink(missing_ok=True)
    if failed.exists() and not force:
        raise RuntimeError(f"its build failed earlier ({failed.read_text().strip()[:200]}; "
                           f"retry: python -m lmlab.engine.build)")
    if not build_if_missing:
        raise RuntimeError("not built yet (scripts/setup.sh builds it, or: python -m lmlab.engine.build)")
    if compiler() is None:
        raise RuntimeError("no C++ compiler (g++) found")
    if cpu_isa() == "none":
        raise RuntimeError("this CPU has neither AVX2+FMA nor AVX-512 VNNI")
    try:
        module = _compile(path, verbose)
    except Exception as exc:  # noqa: BLE001  a compile error, a missing ninja: record it, fall back
        line = " ".join(str(exc).split())[-300:] or type(exc).__name__
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(line + "\n")
        raise RuntimeError(f"build failed: {line}") from None
    failed.unlink(missing_ok=True)
    return module


def main(argv: list[str] | None = None) -> int:
    """``python -m lmlab.engine.build [--verbose]``: (re)build the extension; exit 0 with a note if it cannot."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        module = load(force=True, verbose="--verbose" in argv)
    except Exception as exc:  # noqa: BLE001
        print(f"note: native decode engine not built ({exc}); generation runs eager", file=sys.stderr)
        return 0
    print(f"native decode engine built: {library_path()} (kernels: {module.isa()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
