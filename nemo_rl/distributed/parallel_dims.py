"""The parallel layout of a run: world size, TP, PP, CP, sequence parallelism and every size derived from them.

One object, so config validation, the driver's batch split, the model builder,
the weight sharding and the workers' process groups cannot disagree on what a
layout means (after torchtitan's ``ParallelDims``). Its checks return the
messages config validation reports, naming the recipe keys a user would fix.

It imports nothing heavy: validating a recipe builds one, and must stay torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

_PARALLEL_KEYS = tuple(
    f"policy.megatron_cfg.{name}"
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")
)


class MegatronLayoutFields(Protocol):
    """The layout keys of ``policy.megatron_cfg`` (structural, so this layer need not import the schema)."""

    @property
    def tensor_model_parallel_size(self) -> int: ...
    @property
    def pipeline_model_parallel_size(self) -> int: ...
    @property
    def context_parallel_size(self) -> int: ...
    @property
    def sequence_parallel(self) -> bool: ...


class _BackendSwitch(Protocol):
    @property
    def enabled(self) -> bool: ...


class PolicyLayoutFields(Protocol):
    """The keys of ``policy`` a layout is read from."""

    @property
    def dtensor_cfg(self) -> _BackendSwitch: ...
    @property
    def megatron_cfg(self) -> MegatronLayoutFields: ...


class ClusterFields(Protocol):
    @property
    def gpus_per_node(self) -> int: ...
    @property
    def num_nodes(self) -> int: ...


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of one layout; the defaults are a single process."""

    world_size: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False

    @classmethod
    def from_config(cls, policy: PolicyLayoutFields, cluster: ClusterFields) -> ParallelDims:
        return cls.for_world(policy, cluster.gpus_per_node * cluster.num_nodes)

    @classmethod
    def for_world(cls, policy: PolicyLayoutFields, world_size: int) -> ParallelDims:
        """The layout the policy's backend runs: the DTensor backend is data parallel over whole sequences."""
        if policy.dtensor_cfg.enabled:
            return cls(world_size)
        mcfg = policy.megatron_cfg
        return cls(
            world_size,
            mcfg.tensor_model_parallel_size,
            mcfg.pipeline_model_parallel_size,
            mcfg.context_parallel_size,
            mcfg.sequence_parallel,
        )

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one copy of the model between them (a data-parallel rank's group)."""
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: each takes its own shard of a global batch."""
        if errors := self.world_size_errors():
            raise ValueError(errors[0])
        return self.world_size // self.model_parallel_size

    @property
    def dp_cp(self) -> int:
        """What the distributed optimizer shards over: CP ranks hold the same weights, like DP ranks."""
        return self.dp * self.cp

    @property
    def sequence_multiple(self) -> int:
        """What every sequence length must be a multiple of.

        Context parallelism splits each sequence into 2 x CP chunks (each rank takes
        one early and one late chunk, balancing causal attention); sequence
        parallelism splits the sequence dimension over the TP ranks on top of that.
        """
        return (2 * self.cp if self.cp > 1 else 1) * (self.tp if self.sequence_parallel else 1)

    # ------------------------------------------------------------------ checks
    def world_size_errors(self) -> list[str]:
        if self.world_size % self.model_parallel_size == 0:
            return []
        return [
            f"cluster: gpus_per_node * num_nodes = {self.world_size} is not divisible by tensor * pipeline * "
            f"context parallel size = {self.model_parallel_size} ({', '.join(_PARALLEL_KEYS)})"
        ]

    def sequence_parallel_errors(self) -> list[str]:
        if not (self.sequence_parallel and self.tp == 1):
            return []
        return [
            "policy.megatron_cfg.sequence_parallel: true needs policy.megatron_cfg.tensor_model_parallel_size > 1 "
            "(it splits activations over the TP ranks); set it to false or raise tensor_model_parallel_size"
        ]

    def packing_errors(self, packing: bool) -> list[str]:
        if self.cp == 1 or packing:
            return []
        return [
            f"policy.megatron_cfg.context_parallel_size: {self.cp} needs sequence packing (each rank holds chunks "
            "of every packed sample, as in megatron-core); set policy.sequence_packing.enabled=true"
        ]

    def sequence_length_errors(self, divisible_by: int) -> list[str]:
        """``make_sequence_length_divisible_by`` must fit the layout; the message names the values that would."""
        need = self.sequence_multiple
        if divisible_by % need == 0:
            return []
        why = " x ".join(
            part
            for part, used in (
                (f"2 x context_parallel_size ({self.cp})", self.cp > 1),
                (f"tensor_model_parallel_size ({self.tp}) with sequence_parallel", self.sequence_parallel),
            )
            if used
        )
        return [
            f"policy.make_sequence_length_divisible_by: {divisible_by} must be a multiple of {need} ({why}); "
            f"the smallest valid value is {need}, the nearest above yours {-(-divisible_by // need) * need}"
        ]


def pipeline_stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Global indices of the decoder layers on a pipeline stage (an even split, as megatron-core makes).

    A function of the PP size alone, so a checkpoint's shard files (which record
    TP x PP, not the world) map to layers without a whole layout.
    """
    if num_layers % pp_size:
        raise ValueError(
            f"policy.megatron_cfg.pipeline_model_parallel_size={pp_size} does not divide the model's "
            f"{num_layers} layers; use a divisor of {num_layers}"
        )
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)
