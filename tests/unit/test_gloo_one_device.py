"""CPU workers' gloo groups on one transport device: gloo's results, one event-loop thread per process.

Two ranks run the same collectives (the kinds megatron-core's schedules,
distributed optimizer and pipeline p2p use, plus object collectives, and two
groups' collectives in flight at once) on torch's plain ``gloo``, on
``gloo_one_device``, and on groups asked for as ``"gloo"`` by name inside
``gloo_groups_share_device`` (as vLLM asks); plain gloo is the reference.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_rl.distributed.gloo_one_device import BACKEND, gloo_groups_share_device, gloo_one_device_backend
from nemo_rl.distributed.worker_process_group import free_port
from tests.helpers import gloo_loop_threads

WORLD = 2
ROUNDS = 3  # of new groups: one of both ranks, and one of each rank alone
EXTRA_GROUPS = 2 * ROUNDS  # each rank belongs to the group of both and to its own, per round


def _collectives(rank: int, group_backend: str | None = None) -> dict:
    both, own = None, None
    for _ in range(ROUNDS):
        both = dist.new_group([0, 1], backend=group_backend)
        singles = [dist.new_group([r], backend=group_backend) for r in range(WORLD)]
        own = singles[rank]
    x = torch.arange(8, dtype=torch.float32) + 10 * rank
    out: dict = {}
    reduced = x.clone()
    dist.all_reduce(reduced)
    out["all_reduce"] = reduced
    gathered = torch.empty(WORLD * 8)
    dist.all_gather_into_tensor(gathered, x, group=both)
    out["all_gather"] = gathered
    scattered = torch.empty(4)
    dist.reduce_scatter_tensor(scattered, x, group=both)
    out["reduce_scatter"] = scattered
    sent = x.clone()
    dist.broadcast(sent, src=1, group=both)
    out["broadcast"] = sent
    received = torch.empty(8)
    ops = [dist.P2POp(dist.isend, x, 1 - rank), dist.P2POp(dist.irecv, received, 1 - rank)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    out["p2p"] = received
    # Two groups' collectives in flight at once, their sockets served by the one loop.
    a, b = x.clone(), x.clone() * 2
    pending = [dist.all_reduce(a, group=both, async_op=True), dist.all_reduce(b, async_op=True)]
    alone = x.clone()
    dist.all_reduce(alone, group=own)  # a group of one: the rank's own tensor
    for work in pending:
        work.wait()
    out["overlapped"] = torch.cat([a, b, alone])
    objects: list = [None] * WORLD
    dist.all_gather_object(objects, {"rank": rank, "backend": dist.get_backend()})
    out["objects"] = [o["rank"] for o in objects]
    out["backends"] = sorted({o["backend"] for o in objects})
    dist.barrier()
    out["loop_threads"] = gloo_loop_threads()
    return out


REDIRECTED = "gloo, redirected"  # every group asked for by name as "gloo", inside gloo_groups_share_device


def _rank(rank: int, port: int, mode: str, result_dir: str) -> None:
    originals = dist.init_process_group, dist.new_group
    with gloo_groups_share_device() if mode == REDIRECTED else nullcontext():
        backend = {BACKEND: gloo_one_device_backend(), REDIRECTED: "gloo"}.get(mode, mode)  # registered here too
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        try:
            out = _collectives(rank, "gloo" if mode == REDIRECTED else None)
        finally:
            dist.destroy_process_group()
    out["restored"] = (dist.init_process_group, dist.new_group) == originals
    torch.save(out, os.path.join(result_dir, f"{rank}.pt"))


def _run(mode: str, tmp_path) -> list[dict]:
    directory = tmp_path / mode.replace(", ", "_")
    directory.mkdir()
    mp.spawn(_rank, args=(free_port(), mode, str(directory)), nprocs=WORLD, join=True)
    return [torch.load(directory / f"{rank}.pt") for rank in range(WORLD)]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_collectives_equal_plain_gloos_with_one_event_loop_per_process(tmp_path):
    reference = _run("gloo", tmp_path)
    shared, redirected = _run(BACKEND, tmp_path), _run(REDIRECTED, tmp_path)
    for rank in range(WORLD):
        expected = reference[rank]
        # torch's gloo: a device, so a loop thread, per group (the world and the extra ones); here one in all.
        assert expected["loop_threads"] == 1 + EXTRA_GROUPS and expected["backends"] == ["gloo"]
        for got in (shared[rank], redirected[rank]):
            for kind in ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "p2p", "overlapped"):
                assert torch.equal(got[kind], expected[kind]), kind
            assert got["objects"] == expected["objects"] == [0, 1]
            assert got["backends"] == [BACKEND]
            assert got["loop_threads"] == 1
            assert got["restored"]  # torch's own constructors are back once the redirect ends
    # The arithmetic itself, so that a shared wrong answer cannot pass: rank r holds arange(8) + 10 r.
    base = torch.arange(8, dtype=torch.float32)
    assert torch.equal(shared[0]["all_reduce"], 2 * base + 10)
    assert torch.equal(shared[1]["p2p"], base)
    assert torch.equal(shared[0]["reduce_scatter"], (2 * base + 10)[:4])
