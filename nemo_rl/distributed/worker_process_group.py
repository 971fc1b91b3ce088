"""Joining a policy worker to the run's torch.distributed world (NCCL on GPUs, gloo on CPU).

torch is imported by the function that needs it, not by the module: the
worker group's rendezvous probe and the math environment's actors import this
module (``free_port``) in Ray processes of their own, and a torch import there
cost a run's start-up about 5 s on two busy cores, the probe's in series
before the policy workers could even be launched.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from nemo_rl.distributed.gloo_one_device import gloo_one_device_backend
from nemo_rl.utils.host_allocator import keep_freed_host_memory

if TYPE_CHECKING:
    import torch


def free_port() -> int:
    """A TCP port free on this host now, for a rendezvous this process hosts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def init_worker_process_group(rank: int, world_size: int, master_addr: str, master_port: int) -> torch.device:
    """Join the world and return this worker's device.

    On CPU the worker uses the threads its Ray bundle was given
    (``OMP_NUM_THREADS``, set by the worker group), so workers sharing a machine
    do not oversubscribe it, and keeps the memory it frees for its next step
    (``host_allocator``), as torch's caching allocator does on a GPU. Its gloo
    groups share one transport device (``gloo_one_device``): megatron-core's
    groups would otherwise wake the idle worker 1,800 times a second.
    """
    import torch

    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1)
        keep_freed_host_memory()
        backend = gloo_one_device_backend()
    torch.distributed.init_process_group(
        backend=backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
    )
    return device
