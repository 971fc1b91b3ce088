"""How a refit bucket's tensors travel from the sending policy worker to the engines (``weight_sync``).

``object_store``: the bucket is one safetensors blob that the worker yields
into Ray's object store and every engine fetches (works everywhere; a host
copy). ``collective``: a process group of its own between one sender (rank 0)
and every engine's vLLM workers, gloo on CPU and NCCL on GPUs; the driver
sends each bucket's layout through Ray and the sender broadcasts the bucket
as one flat buffer. ``cuda_ipc``: the sender and the engine share a GPU; the
bucket's flat CUDA buffer is handed over as an IPC handle (nothing is copied)
and a gloo group of the same construction tells the sender when every engine
has loaded it, so the sender frees it.

The groups are built stateless (a TCPStore hosted by the sender and a gloo or
NCCL backend constructed on it directly, as vLLM's ``StatelessProcessGroup``
does), because each side already has a default group of its own (Megatron's,
vLLM's) that the other cannot join.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nemo_rl.distributed import gloo_one_device
from nemo_rl.utils.errors import ConfigError

AUTO, OBJECT_STORE, COLLECTIVE, CUDA_IPC = "auto", "object_store", "collective", "cuda_ipc"
TRANSPORTS = (AUTO, OBJECT_STORE, COLLECTIVE, CUDA_IPC)
TRANSPORT_KEY = "policy.generation.refit_transport"
# Every tensor starts at a multiple of this in the flat buffer, so it can be viewed in place as its dtype.
ALIGN_BYTES = 64
# A sender that waits for the driver to reach its stream (the stages stream one after another) waits in its group.
GROUP_TIMEOUT_S = 1800


def resolve_transport(choice: str, *, cuda: bool, colocated: bool, engines: int) -> str:
    """The transport a run uses; refused at start-up where it cannot work.

    ``auto``: the object store on CPU (the long-tested default; ``collective``
    is faster there, see ``benchmarks/refit_transports.py``), CUDA IPC when
    the one engine shares the sending policy worker's GPU, NCCL broadcast to
    engines on GPUs of their own. Colocated over several GPUs the object store
    remains: NCCL takes no two ranks on one GPU, and a handle opens only on
    the sender's GPU.
    """
    if choice not in TRANSPORTS:
        raise ConfigError(f"{TRANSPORT_KEY} must be one of {', '.join(TRANSPORTS)}, got {choice!r}")
    if choice == CUDA_IPC and not (cuda and colocated and engines == 1):
        raise ConfigError(
            f"{TRANSPORT_KEY}=cuda_ipc needs one engine colocated with the policy on a CUDA GPU; this run has "
            f"{engines} engine(s), {'colocated' if colocated else 'not colocated'}, "
            f"{'on CUDA' if cuda else 'without CUDA'}; use object_store or collective"
        )
    if choice == COLLECTIVE and cuda and colocated:
        raise ConfigError(
            f"{TRANSPORT_KEY}=collective broadcasts over NCCL, which cannot join the policy and an engine that "
            "share a GPU; use cuda_ipc (one engine) or object_store"
        )
    if choice != AUTO:
        return choice
    if not cuda:
        return OBJECT_STORE
    if not colocated:
        return COLLECTIVE
    return CUDA_IPC if engines == 1 else OBJECT_STORE


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # in bytes, from the start of the flat buffer


@dataclass(frozen=True)
class FlatLayout:
    """Where each tensor of a bucket lies in its flat byte buffer: what the engine needs to rebuild it."""

    tensors: tuple[TensorSpec, ...]
    nbytes: int


def flatten(bucket: Mapping[str, torch.Tensor], device: torch.device | str) -> tuple[FlatLayout, torch.Tensor]:
    """A bucket as one byte buffer on ``device``: one broadcast or one IPC handle per bucket."""
    specs, offset = [], 0
    for name, tensor in bucket.items():
        specs.append(TensorSpec(name, tuple(tensor.shape), tensor.dtype, offset))
        offset += -(-tensor.numel() * tensor.element_size() // ALIGN_BYTES) * ALIGN_BYTES
    flat = torch.empty(offset, dtype=torch.uint8, device=device)
    for spec, tensor in zip(specs, bucket.values(), strict=True):
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        flat[spec.offset : spec.offset + data.numel()].copy_(data)
    return FlatLayout(tuple(specs), offset), flat


def unflatten(layout: FlatLayout, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The bucket's tensors as views of ``flat`` (no copy)."""
    weights = {}
    for spec in layout.tensors:
        nbytes = spec.dtype.itemsize * int(torch.Size(spec.shape).numel())
        weights[spec.name] = flat[spec.offset : spec.offset + nbytes].view(spec.dtype).view(spec.shape)
    return weights


@dataclass(frozen=True)
class Rendezvous:
    """Where a sender's weight group meets: the sender (rank 0) hosts the store on its node."""

    host: str
    port: int
    world_size: int
    backend: str  # "gloo" or "nccl"


def group_backend(transport: str) -> str:
    """NCCL carries the tensors of a collective refit on GPUs; CUDA IPC needs the group only to say 'loaded'."""
    return "nccl" if transport == COLLECTIVE and torch.cuda.is_available() else "gloo"


def free_address() -> tuple[str, int]:
    """This node's address and a port free now, for a sender's rendezvous."""
    from nemo_rl.distributed.worker_group import node_address_and_port  # ray: imported where a group is made

    return node_address_and_port()


def join_group(rendezvous: Rendezvous, rank: int) -> Any:
    """This process's membership of a weight group (blocks until every member has joined).

    A c10d backend (gloo or NCCL) over a store of its own, outside torch's
    group registry, so it neither touches nor needs this process's default
    group; plain torch, so a policy worker does not import vLLM for it.
    """
    from datetime import timedelta

    import torch.distributed as dist

    timeout = timedelta(seconds=GROUP_TIMEOUT_S)
    # Public torch API (torch.distributed.TCPStore / PrefixStore) that its stubs do not re-export.
    store = dist.TCPStore(  # pyright: ignore[reportPrivateImportUsage]
        rendezvous.host, rendezvous.port, rendezvous.world_size, is_master=rank == 0, timeout=timeout
    )
    store = dist.PrefixStore("nemo_rl/weights", store)  # pyright: ignore[reportPrivateImportUsage]
    if rendezvous.backend == "gloo":  # on the process's one gloo device, beside its other groups
        return gloo_one_device.process_group(store, rank, rendezvous.world_size, timeout)
    return dist.ProcessGroupNCCL(store, rank, rendezvous.world_size, dist.ProcessGroupNCCL.Options())


def group_device(group: Any) -> torch.device:
    """Where a group's buffers must be: NCCL moves CUDA tensors, gloo host ones."""
    if group.name() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(group: Any, flat: torch.Tensor) -> None:
    """Rank 0's ``flat`` into every member's ``flat`` (called on the group object: it is not in torch's registry)."""
    options = torch.distributed.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([flat], options).wait()


def all_loaded(group: Any) -> None:
    """Every member has reached this point: the engines have loaded the bucket the sender shared."""
    group.barrier().wait()


def ipc_handle(flat: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
    """A CUDA buffer as a handle another process on the same GPU can open (``open_ipc_handle``)."""
    if not flat.is_cuda:
        raise ValueError(f"{TRANSPORT_KEY}=cuda_ipc shares CUDA buffers only; this bucket is on {flat.device}")
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(flat)


def open_ipc_handle(handle: tuple[Any, tuple[Any, ...]], device_index: int) -> torch.Tensor:
    """The sender's buffer mapped into this process, on this process's index of the shared GPU
    (the sender's index differs when each process sees only its own devices)."""
    import inspect

    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    rebuild, args = handle
    args = list(args)
    args[list(inspect.signature(rebuild_cuda_tensor).parameters).index("storage_device")] = device_index
    return rebuild(*args)
