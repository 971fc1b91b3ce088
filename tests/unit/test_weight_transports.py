"""Refit transports without an engine: flat buckets rebuild exactly, a broadcast over a weight group delivers
them with headers that hold no tensor, the transport choice, and what CUDA IPC refuses or rewrites without CUDA."""

from __future__ import annotations

import io
import pickle
import queue
import threading

import pytest
import torch

from nemo_rl.models.generation.weight_sync import BucketHeader, WeightSync, bucketed, publish
from nemo_rl.models.generation.weight_transports import (
    ALIGN_BYTES,
    AUTO,
    COLLECTIVE,
    CUDA_IPC,
    OBJECT_STORE,
    Rendezvous,
    broadcast,
    flatten,
    free_address,
    ipc_handle,
    join_group,
    open_ipc_handle,
    resolve_transport,
    unflatten,
)
from tests.unit.test_hf_weights import _model


def _mixed_bucket() -> dict[str, torch.Tensor]:
    """Odd sizes and mixed dtypes, so a tensor after another would be misaligned without padding."""
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b": torch.randn(7, generator=g),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "c": torch.randn(4, 3, generator=g).t(),  # not contiguous
        "ids": torch.arange(5, dtype=torch.int64),
    }


def test_a_flat_bucket_rebuilds_every_tensor_exactly_as_views():
    bucket = _mixed_bucket()
    layout, flat = flatten(bucket, "cpu")
    assert flat.dtype == torch.uint8 and flat.numel() == layout.nbytes
    assert all(spec.offset % ALIGN_BYTES == 0 for spec in layout.tensors)
    rebuilt = unflatten(layout, flat)
    assert list(rebuilt) == list(bucket)
    for name, tensor in bucket.items():
        assert rebuilt[name].dtype == tensor.dtype and torch.equal(rebuilt[name], tensor)
        assert rebuilt[name].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()  # no copy


class _NoTensors(pickle.Pickler):
    def persistent_id(self, obj):
        assert not isinstance(obj, torch.Tensor | torch.UntypedStorage), "a header carries a tensor"
        return None


def test_a_broadcast_refit_delivers_each_bucket_and_the_headers_hold_no_tensor():
    """The sender publishes over a gloo weight group while a receiver (here a thread, in the run an engine's
    vLLM worker) takes each header as the driver would forward it and receives the bucket by broadcast."""
    tensors = list(_model("qwen2-tied").state_dict().items())
    host, port = free_address()
    rendezvous = Rendezvous(host, port, 2, "gloo")
    groups: dict[int, object] = {}
    joins = [threading.Thread(target=lambda r=r: groups.__setitem__(r, join_group(rendezvous, r))) for r in (0, 1)]
    for thread in joins:
        thread.start()
    for thread in joins:
        thread.join()
    headers: queue.Queue[BucketHeader | None] = queue.Queue()

    def send() -> None:
        for header in publish(bucketed(iter(tensors), 100_000), COLLECTIVE, groups[0]):
            headers.put(header)  # type: ignore[arg-type]
        headers.put(None)

    sender = threading.Thread(target=send)
    sender.start()
    received: dict[str, torch.Tensor] = {}
    while (header := headers.get(timeout=60)) is not None:
        _NoTensors(io.BytesIO()).dump(header)
        assert header.layout is not None and header.ipc_handle is None
        flat = torch.empty(header.layout.nbytes, dtype=torch.uint8)
        broadcast(groups[1], flat)
        bucket = unflatten(header.layout, flat)
        assert tuple(bucket) == header.names
        received |= {name: t.clone() for name, t in bucket.items()}
    sender.join()
    assert list(received) == [name for name, _ in tensors]
    assert all(torch.equal(received[name], tensor) for name, tensor in tensors)


@pytest.mark.parametrize(
    ("choice", "cuda", "colocated", "engines", "expected"),
    [
        (AUTO, False, False, 1, OBJECT_STORE),
        (AUTO, False, True, 1, OBJECT_STORE),  # CPU keeps the object store, colocated or not
        (AUTO, True, True, 1, CUDA_IPC),
        (AUTO, True, True, 2, OBJECT_STORE),  # IPC reaches the sender's GPU only, NCCL no shared GPU
        (AUTO, True, False, 1, COLLECTIVE),
        (COLLECTIVE, False, False, 2, COLLECTIVE),
        (COLLECTIVE, False, True, 1, COLLECTIVE),  # gloo shares a host
        (OBJECT_STORE, True, True, 1, OBJECT_STORE),
        (CUDA_IPC, True, True, 1, CUDA_IPC),
    ],
)
def test_the_transport_follows_the_placement(choice, cuda, colocated, engines, expected):
    assert resolve_transport(choice, cuda=cuda, colocated=colocated, engines=engines) == expected


@pytest.mark.parametrize(("cuda", "colocated", "engines"), [(False, True, 1), (True, False, 1), (True, True, 2)])
def test_cuda_ipc_where_no_engine_shares_the_senders_gpu_is_refused_naming_the_key(cuda, colocated, engines):
    with pytest.raises(ValueError, match=r"policy\.generation\.refit_transport=cuda_ipc needs one engine colocated"):
        resolve_transport(CUDA_IPC, cuda=cuda, colocated=colocated, engines=engines)


def test_unknown_transports_and_nccl_on_a_shared_gpu_are_refused():
    with pytest.raises(ValueError, match=r"refit_transport=collective broadcasts over NCCL"):
        resolve_transport(COLLECTIVE, cuda=True, colocated=True, engines=2)
    with pytest.raises(ValueError, match=r"policy\.generation\.refit_transport must be one of"):
        resolve_transport("nccl", cuda=True, colocated=False, engines=1)
    with pytest.raises(ValueError, match="resolve 'auto' first"):  # WeightSync takes a resolved transport
        WeightSync([], 1, AUTO)


def test_an_ipc_handle_is_only_made_of_a_cuda_buffer():
    with pytest.raises(ValueError, match="cuda_ipc shares CUDA buffers only"):
        ipc_handle(torch.zeros(4, dtype=torch.uint8))


def test_an_ipc_handle_is_opened_on_the_receivers_index_of_the_gpu():
    """torch's CUDA handle names the sender's device index; the engine maps it on its own index."""
    opened = []
    sender_args = (torch.Tensor, (4,), (1,), 0, object, torch.uint8, 3, b"handle", 4, 0, False)
    open_ipc_handle((lambda *args: opened.append(args), sender_args), 0)
    (args,) = opened
    assert args[6] == 0 and args[:6] == sender_args[:6] and args[7:] == sender_args[7:]
