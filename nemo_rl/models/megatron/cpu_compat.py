"""Make megatron-core run on a CUDA-less torch build.

megatron-core assumes CUDA in a few places that have nothing to do with the maths
it computes: it asks ``torch.cuda.current_device()`` where to put rotary tables
and masks, its RNG tracker and activation recomputation snapshot CUDA generator
states, its schedules/optimizer allocate bookkeeping tensors on "cuda", and its
pipeline p2p synchronises CUDA streams.
Replacing those touch points (attention is this project's ``SDPACoreAttention``,
which needs no mask tensor) is enough for the real GPTModel, DDP, optimizer,
schedules and gloo collectives to run on CPU, so CI exercises the same code that
GPU clusters run. That includes the distributed optimizer: gloo (torch 2.13)
has the reduce-scatter and all-gather of flat buffers it uses, coalesced too,
so it needs no stand-in here.

The redirection of literal "cuda" devices is a ``TorchFunctionMode``, which
sees every torch call made from Python; it stays out of the model's forward and
loss, megatron's backward step and torch's optimizer update
(``without_device_redirect``), where megatron-core and torch allocate on the
devices of inputs, gradients and parameters.

Nothing here is active when CUDA is available.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

_MODE: _CudaToCpuMode | None = None


class CpuRNGStatesTracker:
    """Named CPU generator states with the interface of Megatron's CUDA RNG tracker.

    Megatron forks a separate RNG stream for tensor-parallel regions (dropout,
    weight init) so that TP ranks draw different numbers there; the same idea
    works with the CPU generator.
    """

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return True

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"RNG state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name} was never added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def enable_cpu_compat() -> bool:
    """Install the CPU stand-ins once per process; returns whether they are active."""
    global _MODE
    if torch.cuda.is_available():
        return False
    if _MODE is not None:
        return True
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    # Pipeline p2p waits for CUDA streams after its (here: gloo, already blocking) sends and receives.
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    # Activation recomputation snapshots and restores "the CUDA generator"; the CPU one plays that role.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _skip_one_rank_buffer_collectives()
    _backward_without_redirect()
    # Entered for the life of the process: the worker process exists only to run megatron.
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    logger.info("megatron-core CPU compatibility layer enabled (no CUDA device)")
    return True


def _skip_one_rank_buffer_collectives() -> None:
    """DDP's gradient reduce-scatter and the distributed optimizer's parameter all-gather over one rank.

    megatron-core issues them over the whole flat buffer even when the data-parallel group has one rank,
    where the result is the buffer itself; gloo still clones the buffer (every gradient, a fresh allocation)
    and copies it back. With one rank and the output the input's own memory they are skipped here:
    at the ``tiny-qwen2-20m`` shape (18.4 M floats) a training step's median fell about 120 ms and its
    page faults about 28 k, in-process A/B on 2 CPU cores.
    """
    from megatron.core.distributed import param_and_grad_buffer as buffers

    buffers.dist_reduce_scatter_func = _identity_on_one_rank(buffers.dist_reduce_scatter_func)
    buffers.dist_all_gather_func = _identity_on_one_rank(buffers.dist_all_gather_func)


def _identity_on_one_rank(collective: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(collective)
    def call(output: torch.Tensor, input: torch.Tensor, *args: Any, group: Any = None, **kwargs: Any) -> Any:
        in_place = output.data_ptr() == input.data_ptr() and output.numel() == input.numel()
        if in_place and torch.distributed.get_world_size(group) == 1:
            return None  # under megatron's coalescing manager, whose handle it waits on instead
        return collective(output, input, *args, group=group, **kwargs)

    return call


def _backward_without_redirect() -> None:
    """megatron's backward step (autograd through the model, its DDP gradient hooks) outside the redirection.

    Nothing there names a device: gradients are made like their tensors, megatron's buffers on
    ``torch.cuda.current_device()``. With ``pause_redirect_in_optimizer_update`` too, a tiny-model training
    step passes 239 torch calls through the mode's Python hook instead of 768 (see ``without_device_redirect``);
    what is left is mostly megatron's gradient norm and clipping (which check CUDA type names), about 12 calls
    a parameter.
    """
    from megatron.core.pipeline_parallel import schedules

    schedules.backward_step = without_device_redirect(schedules.backward_step)


# megatron optimizer methods that loop over parameters, views and gradients without naming a device
_PER_PARAMETER_BOOKKEEPING = (
    "zero_grad",
    "get_main_grads_for_grad_norm",
    "_copy_model_grads_to_main_grads",
    "_copy_main_params_to_model_params",
)


def pause_redirect_in_optimizer_update(optimizer) -> None:
    """torch's own update inside megatron's (chained) ``optimizer``, and megatron's per-parameter loops around
    it, run outside the redirection.

    torch's optimizers make their state like their parameters, and megatron's gradient and parameter copies,
    zeroing and list of gradients for the norm only take views of tensors that exist. The rest of megatron's
    wrapper (gradient norm, clipping: they make bookkeeping tensors on "cuda" and check CUDA type names) stays
    under it. A tiny-model training step passed 495 torch calls through the mode's Python hook (3.3 us each on
    2 CPU cores) with only the update paused, and 239 with these loops too; at 4 x 32 tokens, where the step is
    mostly such costs, the optimizer took 2.4 to 2.5 ms instead of 3.3 (in-process, against 1.4 to 1.6 ms for
    a plain loop's clipping and fused AdamW).
    """
    for inner in optimizer.chained_optimizers:
        inner.optimizer.step = without_device_redirect(inner.optimizer.step)
        for name in _PER_PARAMETER_BOOKKEEPING:
            if hasattr(inner, name):
                setattr(inner, name, without_device_redirect(getattr(inner, name)))


def without_device_redirect(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with the CUDA-to-CPU redirection paused (unchanged where it is not active).

    For the model's forward step and loss, which megatron-core's schedules call
    once per micro-batch: there every tensor is made on the device of an input,
    a parameter or ``torch.cuda.current_device()``, so the mode has nothing to
    redirect, yet its Python hook runs on each of their torch calls: 1.4 ms of
    a 23 ms training step of the tiny model at 4 x 64 tokens (in-process A/B
    on 2 CPU cores; at 4 x 1024 tokens, within the noise of a 200 ms step).
    The schedule's own bookkeeping and megatron's optimizer wrapper still run
    under it.
    """

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _MODE is None or torch.overrides._get_current_function_mode() is not _MODE:
            return fn(*args, **kwargs)
        with torch.overrides._pop_mode_temporarily():
            return fn(*args, **kwargs)

    return call


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Redirect tensors that megatron-core creates with a hard-coded ``device="cuda"``.

    Its schedules, DDP buffers and optimizer wrappers allocate small bookkeeping
    tensors (loss-token counters, found-inf flags, norms) on "cuda" literally, pin
    host memory for copies to the GPU, and check ``tensor.type()`` against CUDA
    type names; on a CPU-only torch those
    calls would raise before any maths happens.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # page-locked staging for host-to-GPU copies; needs a GPU
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's grad clipping asserts on CUDA type names; the dtype is what it means.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)
