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

Transport: the Ray object store, which works on CPU and on GPUs alike (a
bucket is copied to host memory). CUDA IPC (colocated) and NCCL broadcast
(separate GPUs) would skip the host copy; they are not built yet.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Protocol

import ray
import torch

from nemo_rl.models.generation.vllm_weight_refit import pack_weights

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
    """A bucket's tensor names and byte size: what the driver reads of it."""

    names: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class WeightBucket(BucketHeader):
    """A bucket as the driver holds it: its header and the ref of its blob, which stays in the object store."""

    blob: ray.ObjectRef  # ``pack_weights`` of the bucket's tensors


def publish(buckets: Iterable[Mapping[str, torch.Tensor]]) -> Iterator[BucketHeader | bytes]:
    """Each bucket as two items of the policy worker's Ray streaming generator: its header, then its blob.

    Yielded rather than ``ray.put`` by the worker: a generator's items are
    owned by the caller, so a blob lives exactly as long as the driver holds
    its ref (a ref put by the worker and nested in an item can be freed by
    the worker's reference counting before an engine fetches it).
    """
    for bucket in buckets:
        yield BucketHeader(tuple(bucket), _nbytes(bucket))
        yield pack_weights(bucket)


def receive(stream: Iterator[ray.ObjectRef]) -> Iterator[WeightBucket]:
    """The driver's side of ``publish``: reads each header, keeps the blob's ref without fetching it."""
    for header_ref in stream:
        header: BucketHeader = ray.get(header_ref)
        yield WeightBucket(header.names, header.nbytes, next(stream))


class WeightSource(Protocol):
    """A policy that can stream its HF-named weights (``Policy``)."""

    def stream_hf_weights(self, bucket_bytes: int) -> Iterator[WeightBucket]: ...


class WeightSync:
    """Refit of every engine from a ``WeightSource``, one bucket at a time, through the Ray object store.

    ``engines`` are ``VllmGenerationWorker`` actors. Returns the number of
    tensors sent; every engine must have loaded each bucket whole (vLLM's
    count of what it deserialised), else the refit fails.
    """

    def __init__(self, engines: Sequence[Any], bucket_bytes: int) -> None:
        check_bucket_bytes(bucket_bytes)
        self.engines = list(engines)
        self.bucket_bytes = bucket_bytes

    def refit(self, source: WeightSource) -> int:
        in_flight: deque[tuple[WeightBucket, list[ray.ObjectRef]]] = deque()
        sent = 0
        for bucket in source.stream_hf_weights(self.bucket_bytes):
            in_flight.append((bucket, [engine.load_weights.remote(bucket.blob) for engine in self.engines]))
            sent += len(bucket.names)
            if len(in_flight) > MAX_BUCKETS_IN_FLIGHT:
                _check_loaded(*in_flight.popleft())
        while in_flight:
            _check_loaded(*in_flight.popleft())
        return sent


def _check_loaded(bucket: WeightBucket, loads: list[ray.ObjectRef]) -> None:
    loaded = ray.get(loads)
    if any(n != len(bucket.names) for n in loaded):
        raise RuntimeError(
            f"refit sent a bucket of {len(bucket.names)} tensors ({bucket.names[0]} ...) but the engines loaded {loaded}"
        )
