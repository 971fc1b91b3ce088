"""gloo process groups of one process sharing one transport device, for CPU workers.

torch builds every gloo process group on a device of its own, and each gloo
TCP device runs an event-loop thread that wakes every 10 ms whether or not
anything is sent. megatron-core's ``initialize_model_parallel`` makes one
group per parallel dimension and combination (18 with gloo as the main
backend, 21 with its extra gloo data-parallel groups), so an idle CPU worker
woke about 1,800 to 2,100 times a second. On a host whose cores all train,
each wakeup takes a core from an OpenMP thread, and the whole team waits for
it at the next barrier: the training step of the tiny model (two threads on
two cores, through Ray) and a plain transformers loop beside an idle worker
were both 7 to 24 % slower than with the groups on one device (four
alternating cycles, every one in the same direction;
``benchmarks/megatron_vs_hf_throughput.py`` has the figures).

gloo lets many contexts share one device (a device is a listening socket and
one event loop; each group's pairs are registered on it), so this registers a
c10d backend, ``gloo_one_device``, whose groups are ordinary
``ProcessGroupGloo`` objects built on the process's one device (one per
interface where ``GLOO_SOCKET_IFNAME`` lists several, as torch does). The
collectives, their algorithms and their tensors are gloo's own; only the
event loop is shared, so the sockets of different groups are served by one
thread, which costs nothing where collectives of different groups do not
overlap, as in a CPU worker's step. GPU workers use NCCL and never see it.

Libraries that name ``"gloo"`` themselves are reached by
``gloo_groups_share_device``: vLLM makes a device group and a CPU group per
parallel dimension (13 groups, so 13 loops, in a CPU engine of one process),
and its idle engine, colocated with the policy, woke 1,850 times a second
while the policy trained, 565 with one loop; the tiny GRPO recipe's step did
not move beyond the host's noise (``benchmarks/grpo_step_phases.py``). The
weight-refit group (``weight_transports``), made outside torch's registry, is
built on the same device (``process_group``).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

BACKEND = "gloo_one_device"

_devices: list = []


def _process_devices() -> list:
    """The process's devices, made once as torch makes a group's: one per ``GLOO_SOCKET_IFNAME`` interface if set."""
    from torch.distributed import ProcessGroupGloo

    if not _devices:
        interfaces = [name for name in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if name]
        _devices.extend(
            [ProcessGroupGloo.create_device(interface=name) for name in interfaces]
            or [ProcessGroupGloo.create_default_device()]
        )
    return _devices


def process_group(store, rank: int, size: int, timeout):
    """A ProcessGroupGloo on the process's devices, with torch's default two threads each (the backend's hook)."""
    from torch.distributed import ProcessGroupGloo

    # The binding's options with devices are ``_Options`` (torch's stub calls them ``Options``, which at run time
    # has none), and the constructor that takes them is missing from the stub.
    options = ProcessGroupGloo._Options()  # pyright: ignore[reportAttributeAccessIssue]
    options._devices = _process_devices()
    options._threads = 2 * len(options._devices)
    options._timeout = timeout
    return ProcessGroupGloo(store, rank, size, options)


def gloo_one_device_backend() -> str:
    """The backend name to pass to ``init_process_group``, registered with torch on first use."""
    from torch.distributed import Backend

    if BACKEND not in Backend.backend_list:
        Backend.register_backend(BACKEND, process_group, devices=["cpu"])
    return BACKEND


@contextmanager
def gloo_groups_share_device() -> Iterator[None]:
    """Within: ``torch.distributed.init_process_group`` and ``new_group`` called with ``backend="gloo"`` make
    ``gloo_one_device`` groups instead, so a library that names gloo itself (vLLM's CPU groups) shares the device.

    Only the calls made inside are redirected, so the library's later groups, if any, are plain gloo ones; either
    kind computes the same.
    """
    import torch.distributed as dist

    backend = gloo_one_device_backend()
    originals = {name: getattr(dist, name) for name in ("init_process_group", "new_group")}
    for name, original in originals.items():
        setattr(dist, name, _with_backend(original, backend))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _with_backend(make: Callable, backend: str) -> Callable:
    """``make`` (a torch.distributed group constructor) with ``backend="gloo"`` replaced by ``backend``."""
    signature = inspect.signature(make)

    @functools.wraps(make)
    def redirected(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if bound.arguments.get("backend") == "gloo":
            bound.arguments["backend"] = backend
        return make(*bound.args, **bound.kwargs)

    return redirected
