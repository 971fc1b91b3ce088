"""WeightSync: the policy's weights go from the policy workers to the vLLM engines, never through the driver.

A refit used to gather the whole model on the driver, which cannot hold an 8B
model. Here each sending policy worker (the first data-parallel replica's
TP rank 0 of each pipeline stage) converts its own stage to HF names one
decoder layer at a time, packs the tensors into buckets of at most
``bucket_bytes`` and yields each one from a Ray streaming generator, so the
bucket goes into Ray's object store from the worker; the driver reads only
each bucket's header (names, size) and keeps the blob's ObjectRef. It hands
each ref to every engine, which fetches the bucket from the object store and
loads it in place (``vllm_weight_refit``). So the worker holds one layer
and one bucket at a time, the driver holds no tensor, and an engine holds a
few buckets.

vLLM's in-place reload processes a fused module (q/k/v into ``qkv_proj``,
gate/up into ``gate_up_proj``) once all of its tensors have arrived within one
load call; a module loaded partly is processed with stale halves. A bucket
therefore never splits the HF tensors of one fused module (``fusion_key``).

Transport (``policy.generation.refit_transport``, ``weight_transports``): the
Ray object store (above; CPU and GPUs alike, a bucket is copied to host
memory), a broadcast over a weight group of each sender and every engine
(gloo on CPU, NCCL on GPUs: the driver forwards each bucket's layout, the
tensors go from the sender), or CUDA IPC to an engine on the sender's GPU
(the driver forwards a handle). The buckets and the in-place loader are the
same for all three.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING, Any, Protocol

import torch

from nemo_rl.models.generation.vllm_weight_refit import pack_weights
from nemo_rl.models.generation.weight_transports import (
    AUTO,
    COLLECTIVE,
    CUDA_IPC,
    OBJECT_STORE,
    FlatLayout,
    Rendezvous,
    all_loaded,
    broadcast,
    flatten,
    free_address,
    group_backend,
    group_device,
    ipc_handle,
    join_group,
)

if TYPE_CHECKING:  # ray is imported where a refit moves buckets: a policy worker in its own process needs none
    import ray

MIB = 2**20
# Buckets being loaded by the engines at once: one loading while the next is fetched.
MAX_BUCKETS_IN_FLIGHT = 2

# HF tensors that vLLM loads into one fused module (Qwen2 / Qwen3 / Llama packed_modules_mapping).
_FUSED = (
    (re.compile(r"^(.*)\.[qkv]_proj\.(?:weight|bias)$"), "qkv_proj"),
    (re.compile(r"^(.*)\.(?:gate|up)_proj\.weight$"), "gate_up_proj"),
)


def fusion_key(name: str) -> str:
    """The vLLM module an HF tensor is loaded into: tensors sharing a key must travel in one bucket."""
    for pattern, fused in _FUSED:
        match = pattern.match(name)
        if match:
            return f"{match[1]}.{fused}"
    return name


def check_bucket_bytes(bucket_bytes: int) -> None:
    if bucket_bytes <= 0:
        raise ValueError(
            f"refit bucket size must be positive, got {bucket_bytes} bytes; set policy.generation.refit_bucket_mib "
            "to a positive number of MiB"
        )


def bucketed(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive (name, tensor) pairs packed into buckets of at most ``bucket_bytes``, in order.

    A bucket closes only between fused modules; a fused module larger than
    ``bucket_bytes`` travels alone.
    """
    check_bucket_bytes(bucket_bytes)
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for unit in fused_units(tensors):
        unit_bytes = _nbytes(unit)
        if bucket and size + unit_bytes > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket.update(unit)
        size += unit_bytes
    if bucket:
        yield bucket


def fused_units(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive tensors grouped by ``fusion_key``; a module's tensors must come together, which is checked
    (a stray one would be loaded without its partners)."""
    seen: set[str] = set()
    for key, items in groupby(tensors, key=lambda item: fusion_key(item[0])):
        if key in seen:
            raise ValueError(f"the tensors of {key} do not come consecutively; a bucket could split them")
        seen.add(key)
        yield dict(items)


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class BucketHeader:
    """A bucket's tensor names and byte size, what the driver reads of it; for the transports that move it
    as one flat buffer (``weight_transports``), where each tensor lies in it and, over CUDA IPC, its handle."""

    names: tuple[str, ...]
    nbytes: int
    layout: FlatLayout | None = None
    ipc_handle: tuple[Any, tuple[Any, ...]] | None = None


@dataclass(frozen=True)
class WeightBucket(BucketHeader):
    """A bucket as the driver holds it: its header, the policy worker that sends it and, over the object store,
    the ref of its blob, which stays in the object store."""

    blob: ray.ObjectRef | None = None  # ``pack_weights`` of the bucket's tensors
    sender: int = 0  # the worker's index in the policy's worker group


def publish(
    buckets: Iterable[Mapping[str, torch.Tensor]], transport: str = OBJECT_STORE, group: Any = None
) -> Iterator[BucketHeader | bytes]:
    """Each bucket as items of the policy worker's Ray streaming generator: its header, then (object store)
    its blob; the flat transports send the tensors over the sender's weight ``group`` once the header is out.

    Yielded rather than ``ray.put`` by the worker: a generator's items are
    owned by the caller, so a blob lives exactly as long as the driver holds
    its ref (a ref put by the worker and nested in an item can be freed by
    the worker's reference counting before an engine fetches it).
    """
    if transport == OBJECT_STORE:
        for bucket in buckets:
            yield BucketHeader(tuple(bucket), _nbytes(bucket))
            yield pack_weights(bucket)
    elif transport == COLLECTIVE:
        for bucket in buckets:
            layout, flat = flatten(bucket, group_device(group))
            yield BucketHeader(tuple(bucket), _nbytes(bucket), layout)
            broadcast(group, flat)
    else:
        yield from _share(buckets, group)


def _share(buckets: Iterable[Mapping[str, torch.Tensor]], group: Any) -> Iterator[BucketHeader]:
    """CUDA IPC: each bucket's buffer stays alive until every engine has loaded it; the next one is packed
    meanwhile, so a sender holds two buckets."""
    shared = None
    for bucket in buckets:
        layout, flat = flatten(bucket, torch.device("cuda", torch.cuda.current_device()))
        yield BucketHeader(tuple(bucket), _nbytes(bucket), layout, ipc_handle(flat))
        if shared is not None:
            all_loaded(group)
        shared = flat
    if shared is not None:
        all_loaded(group)


def receive(stream: Iterator[ray.ObjectRef], sender: int = 0) -> Iterator[WeightBucket]:
    """The driver's side of ``publish``: reads each header, keeps a blob's ref without fetching it."""
    import ray

    for header_ref in stream:
        header: BucketHeader = ray.get(header_ref)
        blob = next(stream) if header.layout is None else None
        yield WeightBucket(header.names, header.nbytes, header.layout, header.ipc_handle, blob, sender)


class WeightSource(Protocol):
    """A policy that can stream its HF-named weights (``Policy``)."""

    def stream_hf_weights(self, bucket_bytes: int, transport: str = OBJECT_STORE) -> Iterator[WeightBucket]: ...

    def weight_group_addresses(self, transport: str) -> dict[int, tuple[str, int, str]]: ...

    def join_weight_group(self, sender: int, rendezvous: Rendezvous) -> ray.ObjectRef: ...


class RefitSender:
    """The refit side of a policy worker that the flat transports need: its weight group, when it sends."""

    weight_group: Any = None

    @property
    def sends_refit(self) -> bool:
        """Whether this worker sends buckets (the others take part in its gathers)."""
        raise NotImplementedError

    def weight_group_address(self, transport: str) -> tuple[str, int, str] | None:
        """Where this sender's weight group meets (host, port, backend); None for a worker that sends nothing."""
        return (*free_address(), group_backend(transport)) if self.sends_refit else None

    def join_weight_group(self, rendezvous: Rendezvous) -> None:
        self.weight_group = join_group(rendezvous, rank=0)


class WeightSync:
    """Refit of every engine from a ``WeightSource``, one bucket at a time, over a ``transport``.

    ``engines`` are ``VllmGenerationWorker`` actors. Returns the number of
    tensors sent; every engine must have loaded each bucket whole (vLLM's
    count of what it deserialised), else the refit fails. The flat transports
    join each sender and every engine in a weight group at the first refit.
    """

    def __init__(self, engines: Sequence[Any], bucket_bytes: int, transport: str = OBJECT_STORE) -> None:
        check_bucket_bytes(bucket_bytes)
        if transport not in (OBJECT_STORE, COLLECTIVE, CUDA_IPC):
            raise ValueError(f"unknown refit transport {transport!r} (resolve {AUTO!r} first)")
        self.engines = list(engines)
        self.bucket_bytes = bucket_bytes
        self.transport = transport
        self._joined = transport == OBJECT_STORE

    def refit(self, source: WeightSource) -> int:
        if not self._joined:
            self._join(source)
        in_flight: deque[tuple[WeightBucket, list[ray.ObjectRef]]] = deque()
        sent = 0
        for bucket in source.stream_hf_weights(self.bucket_bytes, self.transport):
            in_flight.append((bucket, [_load(engine, bucket) for engine in self.engines]))
            sent += len(bucket.names)
            if len(in_flight) > MAX_BUCKETS_IN_FLIGHT:
                _check_loaded(*in_flight.popleft())
        while in_flight:
            _check_loaded(*in_flight.popleft())
        return sent

    def _join(self, source: WeightSource) -> None:
        """One weight group per sender: rank 0 the sender, then every vLLM worker of every engine in turn."""
        import ray

        sizes = ray.get([engine.weight_group_size.remote() for engine in self.engines])
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        for sender, (host, port, backend) in source.weight_group_addresses(self.transport).items():
            rendezvous = Rendezvous(host, port, 1 + sum(sizes), backend)
            joins = [
                engine.join_weight_group.remote(sender, rendezvous, offset)
                for engine, offset in zip(self.engines, offsets, strict=True)
            ]
            ray.get([source.join_weight_group(sender, rendezvous), *joins])
        self._joined = True


def _load(engine: Any, bucket: WeightBucket) -> ray.ObjectRef:
    """The engine's load of one bucket: a top-level blob ref is fetched by Ray; a flat bucket's header carries
    no tensor, its tensors come over the sender's weight group."""
    if bucket.blob is not None:
        return engine.load_weights.remote(bucket.blob)
    return engine.load_flat_weights.remote(bucket.sender, bucket.layout, bucket.ipc_handle)


def _check_loaded(bucket: WeightBucket, loads: list[ray.ObjectRef]) -> None:
    import ray

    loaded = ray.get(loads)
    if any(n != len(bucket.names) for n in loaded):
        raise RuntimeError(
            f"refit sent a bucket of {len(bucket.names)} tensors ({bucket.names[0]} ...) but the engines loaded {loaded}"
        )
