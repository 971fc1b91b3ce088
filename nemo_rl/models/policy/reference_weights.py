"""The reference policy of KL-regularised RL, kept as a copy of the starting weights inside each worker.

GRPO penalises drift from the model it started from. Holding that model as a
second network would double the accelerator memory and duplicate the parallel
layout; instead each worker keeps a host copy of its own parameter shards and
puts it in place for the few forward passes that score the reference. Both
policy workers use it: Megatron's plain tensors and FSDP2's DTensor shards alike
(only the local shard is copied, so the reference is sharded the way the policy is).
On resume the copy is taken again before the checkpoint is loaded, so it is
the run's starting model, not the resumed one.

A parameter whose reference lies on its own device (every parameter of a CPU
run) is *swapped*: ``param.data`` points at the reference for the block and at
its own storage again after it, so a reference pass copies nothing. Megatron's
DDP parameters are views into one contiguous buffer that its distributed
optimizer reads and writes; they are the very same views after the block, and
the buffer is never written. Parameters on an accelerator with the reference on
the host are copied in and back (three copies of the weights per pass), and so
are DTensor shards: FSDP2 gathers from a flat buffer of its own, not from the
parameter, so only new values in that buffer reach the forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from nemo_rl.models.policy.interfaces import WorkerLogprobsWithReference


def _local(param: torch.Tensor) -> torch.Tensor:
    """The storage this rank owns (a DTensor's local shard, a plain tensor itself)."""
    return param.to_local() if hasattr(param, "to_local") else param


def _swappable(param: torch.Tensor, saved: torch.Tensor) -> bool:
    """A plain tensor whose reference is on its device: the forward pass reads ``param.data`` itself."""
    return not hasattr(param, "to_local") and param.device == saved.device


class ReferenceWeights:
    def __init__(self, module: torch.nn.Module):
        params = list(module.parameters())
        saved = [_local(p).detach().to("cpu", copy=True) for p in params]
        pairs = list(zip(params, saved, strict=True))
        self._swapped = [(p, s) for p, s in pairs if _swappable(p, s)]
        self._copied = [(_local(p), s) for p, s in pairs if not _swappable(p, s)]

    @contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block the module computes with the reference weights; the live ones come back after."""
        own = [param.data for param, _ in self._swapped]
        live = [p.detach().to("cpu", copy=True) for p, _ in self._copied]  # host, like the reference
        try:
            with torch.no_grad():
                for param, saved in self._swapped:
                    param.data = saved
                for param, saved in self._copied:
                    param.copy_(saved)
            yield
        finally:
            with torch.no_grad():
                for (param, _), data in zip(self._swapped, own, strict=True):
                    param.data = data
                for (param, _), current in zip(self._copied, live, strict=True):
                    param.copy_(current)


def scoring_weights(reference: ReferenceWeights | None, use_reference: bool) -> AbstractContextManager:
    """The context a worker scores in: its live weights, or the reference's when asked for."""
    if not use_reference:
        return nullcontext()
    if reference is None:
        raise RuntimeError("reference log-probs need the policy to be built with init_reference_model=True")
    return reference.active()


def logprobs_with_reference(
    get_logprobs: Callable[[bool], torch.Tensor | None],
) -> WorkerLogprobsWithReference | None:
    """A worker's ``get_logprobs_with_reference``: ``get_logprobs(reference)`` with the live weights, then with
    the reference, each pass timed on this rank (None where ``get_logprobs`` has no result, e.g. an earlier
    pipeline stage). Two passes of the same code path as two calls, so the results are the same bits."""
    scored, seconds = [], {}
    for name, reference in (("policy", False), ("reference", True)):
        start = time.perf_counter()
        scored.append(get_logprobs(reference))
        seconds[name] = time.perf_counter() - start
    policy, reference = scored
    return None if policy is None or reference is None else ((policy, reference), seconds)
