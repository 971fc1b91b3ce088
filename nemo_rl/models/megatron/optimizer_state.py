"""Saving and loading megatron-core's distributed optimizer state with torch's AdamW.

A distributed optimizer (ZeRO-1) rank holds only its shard of the float32
master weights and Adam moments, so each rank saves its shard
(``optimizer_shard``) and loads it back with the rest of the optimizer's state
dict (``load_optimizer_state``). Two things in megatron-core 0.16 decide how:

- of its shard formats, the bucket-space one (``get_parameter_state_dp_reshardable``)
  is the one whose loader round-trips torch AdamW's per-parameter ``step``; the
  gathered ``dp_zero`` loader raises ``KeyError: 'step'`` unless TE's or Apex's
  fused Adam is installed, which this project does not use;
- ``DistributedOptimizer.load_state_dict`` hands AdamW one ``step`` tensor for
  all its parameters, which AdamW then increments in place once per parameter.

The plain optimizer's state dict needs none of this and passes through unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nemo_rl.models.megatron.fused_adam import use_fused_adam

# The loader of the bucket-space form, in DistributedOptimizer.load_state_dict.
_SHARDING_TYPE = "dp_reshardable"
_FIELD = "policy.megatron_cfg.optimizer.use_distributed_optimizer"


def optimizer_layout(distributed: bool, data_parallel_size: int) -> dict[str, Any]:
    """What a checkpoint records so that a resume can tell whether its optimizer state fits."""
    return {"distributed": distributed, "data_parallel_size": data_parallel_size}


def check_optimizer_layout(
    path: Path, saved: dict[str, Any] | None, distributed: bool, data_parallel_size: int
) -> None:
    """Optimizer state fits only the layout it was saved from; say which setting to resume with.

    ``saved`` is the checkpoint's ``optimizer_layout`` (None: saved before the option, by the plain optimizer).
    ``data_parallel_size`` counts the ranks a distributed optimizer shards over (data x context parallel).
    """
    saved = saved or optimizer_layout(False, data_parallel_size)
    if saved["distributed"] != distributed:
        was, now = str(saved["distributed"]).lower(), str(distributed).lower()
        raise ValueError(f"{path} was saved with {_FIELD}={was} but this run has {now}; resume with {_FIELD}={was}")
    if distributed and saved["data_parallel_size"] != data_parallel_size:
        raise ValueError(
            f"{path}: its {_FIELD}=true state is sharded over {saved['data_parallel_size']} data x context parallel "
            f"ranks, this run has {data_parallel_size}; resume with the cluster size and parallel layout it was "
            "saved with"
        )


def optimizer_shard(optimizer) -> list[dict[Any, Any]]:
    """This rank's shard of each of a ChainedOptimizer's distributed optimizers, as host copies.

    Copies, because a float32 master weight is a view of the whole parameter
    buffer, which torch.save would write whole.
    """
    return [_for_saving(inner.get_parameter_state_dp_reshardable()) for inner in optimizer.chained_optimizers]


def load_optimizer_state(optimizer, saved: Any, shard: list[dict[Any, Any]] | None) -> None:
    """Load ``saved`` (the optimizer's ``state_dict()``) and, for a distributed optimizer, this rank's ``shard``."""
    if shard is not None:
        saved = _with_shard(saved, shard)
    # The distributed optimizer copies the loaded master weights into its shards of the float32 parameters,
    # views of leaves that require grad: autograd refuses that in-place write outside no_grad.
    with torch.no_grad():
        optimizer.load_state_dict(saved)
    if shard is not None:
        _unshare_adam_steps(optimizer)
    use_fused_adam(optimizer)  # the load put back the saved param groups' choice of kernel


def _for_saving(state: dict[Any, Any]) -> dict[Any, Any]:
    """Host copies of a bucket-space state's tensors, every entry flagged as a parameter.

    Its loader (``load_parameter_state_from_dp_reshardable``) skips entries
    flagged as padding, a flag that only megatron-core's dist-checkpointing
    wrapper adds; the entries ``get_parameter_state_dp_reshardable`` returns are
    all parameters. Integer keys hold the buffers, the others bucket sizes.
    """
    for buffer in (value for key, value in state.items() if isinstance(key, int)):
        for buckets in buffer.values():
            for bucket in buckets:
                bucket[:] = [
                    {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                    | {"padding": False}
                    for entry in bucket
                ]
    return state


def _with_shard(saved: Any, shard: list[dict[Any, Any]]) -> Any:
    """The state dict from which DistributedOptimizer.load_state_dict also loads the shard.

    ``saved`` is ChainedOptimizer's ``state_dict()``: its one optimizer's dict, or a list of them.
    """
    states = [saved] if len(shard) == 1 else saved
    merged = [
        state | {"param_state": part, "param_state_sharding_type": _SHARDING_TYPE}
        for state, part in zip(states, shard, strict=True)
    ]
    return merged[0] if len(merged) == 1 else merged


def _unshare_adam_steps(optimizer) -> None:
    """Give every parameter's Adam state its own ``step`` tensor again.

    Shared, AdamW's in-place increment would count each step once per
    parameter after a resume and so get the bias correction wrong.
    """
    for inner in optimizer.chained_optimizers:
        for state in inner.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()
