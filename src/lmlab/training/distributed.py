"""Data-parallel training under ``torchrun``: none, DDP, or FSDP2 (``fully_shard``).

* ``setup(mode)``      reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK, starts the process group
                       (NCCL on CUDA, gloo on CPU) and picks this rank's device.
* ``wrap(model, ...)`` DDP replicates the model and all-reduces gradients; FSDP2 shards every block
                       and then the root (embeddings, head), all-gathering weights for each block's
                       forward/backward and reduce-scattering gradients.
* state dicts          always *full* (unsharded, on CPU) through ``torch.distributed.checkpoint.state_dict``,
                       so one checkpoint file loads under any mode and any world size. ``save_sharded`` /
                       ``load_sharded`` write a DCP directory instead (each rank its own shard) for models
                       too large to gather on one rank.

Only rank 0 logs and writes files; every rank calls the collective state-dict functions and
``gather_rng_states`` (each rank's random stream, so that a resumed run draws the same dropout masks).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lmlab.errors import CheckpointError, ConfigError, choices_error

MODES = ("none", "ddp", "fsdp")


@dataclass
class DistEnv:
    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none"


def setup(mode: str, device: str = "auto") -> DistEnv:
    """Initialise the process group for `mode` (a no-op for "none") -> this process's DistEnv."""
    if mode not in MODES:
        raise choices_error("distributed", mode, MODES)
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if mode == "none":
        dev = torch.device("cuda" if use_cuda and device == "auto" else (device if device != "auto" else "cpu"))
        return DistEnv(device=dev)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(f"distributed={mode!r} needs torchrun (RANK/WORLD_SIZE are not set); "
                          f"launch with: torchrun --nproc_per_node N -m lmlab pretrain ...")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(mode, rank, world, local, dev)


def cleanup(env: DistEnv) -> None:
    if env.active and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(train) -> Iterator[DistEnv]:
    """The process group (if any) for a training section's ``distributed`` and ``device``, torn down on
    the way out whatever happens: ``with dist.session(cfg.train) as env: ...``."""
    env = setup(train.distributed, train.device)
    try:
        yield env
    finally:
        cleanup(env)


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def all_reduce_sum(value: float | int, env: DistEnv) -> float:
    """Sum a python number over ranks (identity when not distributed)."""
    if not env.active:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.item()


def gather_rng_states(env: DistEnv) -> list[dict] | None:
    """Every rank's RNG state (``checkpoint.rng_state``), in rank order, on rank 0; None on the others.

    Collective: every rank must call it. The states travel between the ranks' own processes
    (``gather_object``); what reaches the checkpoint file is tensors and plain values only.
    """
    from lmlab.training.state import rng_state

    state = rng_state()
    if not env.active:
        return [state]
    states = [None] * env.world_size if env.is_main else None
    dist.gather_object(state, states, dst=0)
    return states


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    """The module the loop calls: the model itself, DDP(model), or the model sharded in place by FSDP2."""
    if env.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if env.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for stack in (model.encoder, model.decoder):
            if stack is not None:
                for block in stack.layers:
                    fully_shard(block)
        fully_shard(model)  # the root: embeddings, norms, (tied) head
    return model


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and not hasattr(module, "config") else module


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state_dict(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """The full model state on CPU (complete on rank 0; other ranks may get an empty dict under FSDP)."""
    model = unwrap(model)
    if not env.active:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict:
    model = unwrap(model)
    if not env.active:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_model_state(model: nn.Module, state: dict, env: DistEnv) -> None:
    model = unwrap(model)
    if not env.active:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, env: DistEnv) -> None:
    model = unwrap(model)
    if not env.active:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Write model + optimizer as a DCP checkpoint directory: each rank writes its own shards (no gather)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Load a DCP directory written by ``save_sharded`` into the (sharded) model and optimizer in place.

    The directory's index (``.metadata``) is read by ``read_dcp_metadata``, not by DCP's own reader,
    which unpickles it without restriction; the shards themselves hold raw tensor bytes.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    index = Path(directory) / ".metadata"
    if index.exists():
        read_dcp_metadata(index)  # a refused index fails here, clearly: dcp.load would catch the error and go on
    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, storage_reader=_restricted_reader(directory))
    set_state_dict(unwrap(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# --- reading a DCP index without running code from it --------------------------------------------
# Everything a DCP ``.metadata`` pickle names (torch 2.6-2.13): torch's own metadata records and a few
# value types. Building these from a file runs no code of the file's choosing.
_DCP_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP index, refusing every class or function outside ``_DCP_METADATA_GLOBALS``
    (the "restricting globals" recipe of the ``pickle`` documentation)."""

    def find_class(self, module: str, name: str):
        torch_value = isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
        if (module, name) in _DCP_METADATA_GLOBALS or (module == "torch" and torch_value):
            return super().find_class(module, name)
        raise CheckpointError(f"the DCP index names {module}.{name}, which a DCP checkpoint never holds; "
                              f"refusing to load it (it could run code)")


def read_dcp_metadata(path: str | Path):
    """A DCP checkpoint's ``.metadata`` (a ``Metadata``), unpickled with only DCP's own classes allowed."""
    with open(path, "rb") as f:
        try:
            return _DCPMetadataUnpickler(f).load()
        except CheckpointError as exc:
            raise CheckpointError(f"{str(path)!r}: {exc}") from None
        except Exception as exc:
            raise CheckpointError(f"{str(path)!r} cannot be read ({type(exc).__name__}: {exc})") from None


def _restricted_reader(directory: str | Path):
    """DCP's ``FileSystemReader`` for `directory`, with the index read by ``read_dcp_metadata``.

    The class is made on first use: importing ``torch.distributed.checkpoint`` takes seconds, and only
    sharded runs need it.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class RestrictedFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
            if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return RestrictedFileSystemReader(str(directory))
