"""The reference policy of KL-regularised RL, kept as a copy of the starting weights inside each worker.

GRPO penalises drift from the model it started from. Holding that model as a
second network would double the accelerator memory and duplicate the parallel
layout; instead each worker keeps a host copy of its own parameter shards and
swaps it in for the few forward passes that score the reference. Both policy
workers use it: Megatron's plain tensors and FSDP2's DTensor shards alike
(only the local shard is copied, so the reference is sharded the way the policy is).
On resume the copy is taken again before the checkpoint is loaded, so it is
the run's starting model, not the resumed one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch


def _local(param: torch.Tensor) -> torch.Tensor:
    """The storage this rank owns (a DTensor's local shard, a plain tensor itself)."""
    return param.to_local() if hasattr(param, "to_local") else param


class ReferenceWeights:
    def __init__(self, module: torch.nn.Module):
        self._params = [_local(p) for p in module.parameters()]
        self._saved = [p.detach().to("cpu", copy=True) for p in self._params]

    @contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block the module computes with the reference weights; the live ones come back after."""
        live = [p.detach().to("cpu", copy=True) for p in self._params]  # host, like the reference
        try:
            with torch.no_grad():
                for param, saved in zip(self._params, self._saved, strict=True):
                    param.copy_(saved)
            yield
        finally:
            with torch.no_grad():
                for param, current in zip(self._params, live, strict=True):
                    param.copy_(current)


def scoring_weights(reference: ReferenceWeights | None, use_reference: bool) -> AbstractContextManager:
    """The context a worker scores in: its live weights, or the reference's when asked for."""
    if not use_reference:
        return nullcontext()
    if reference is None:
        raise RuntimeError("reference log-probs need the policy to be built with init_reference_model=True")
    return reference.active()
