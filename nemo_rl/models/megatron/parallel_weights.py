"""Where each tensor of a full Megatron state dict lives under tensor and pipeline parallelism.

The converted checkpoint holds full tensors with global layer numbers. A rank of
a TP x PP layout holds its pipeline stage's layers (renumbered from 0, as
megatron-core's ``TransformerBlock`` names them) and its TP slice of every
partitioned tensor. The same rules serve loading (full -> shard), exporting a
live model and exporting a training checkpoint written as one file per shard
(shards -> full), so a layout can never be written one way and read another.

TP partitioning follows megatron-core's local layer spec (a unit test checks the
table against the ``tensor_model_parallel`` / ``partition_dim`` attributes the
model sets on its own parameters): column-parallel layers and the vocabulary
are split on dim 0, row-parallel layers on dim 1. The SwiGLU ``linear_fc1`` is
column-parallel over ``[gate; up]``, so each rank holds ``[gate_i; up_i]`` and
the two halves are split separately. The fused QKV rows are grouped per query
group (see ``hf_weights``), so a contiguous split gives each rank whole groups.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from itertools import groupby
from pathlib import Path

import torch

from nemo_rl.distributed.parallel_dims import ParallelDims, pipeline_stage_layers

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
# (name suffix, partition dim); anything else is replicated across TP ranks.
_TP_DIMS = (
    ("embedding.word_embeddings.weight", 0),
    ("output_layer.weight", 0),
    ("self_attention.linear_qkv.weight", 0),
    ("self_attention.linear_qkv.bias", 0),
    ("self_attention.linear_proj.weight", 1),
    ("mlp.linear_fc1.weight", 0),
    ("mlp.linear_fc2.weight", 1),
)
_GLU = "mlp.linear_fc1.weight"
TIED_OUTPUT = "output_layer.weight"
EMBEDDING = "embedding.word_embeddings.weight"


@dataclass(frozen=True)
class ShardLayout:
    """One rank's place in the TP x PP grid: all a weight shard depends on (a checkpoint's shard files record
    no more, so merging them needs no data- or context-parallel size)."""

    tp_size: int = 1
    pp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0

    @classmethod
    def of(cls, dims: ParallelDims, tp_rank: int, pp_rank: int) -> ShardLayout:
        return cls(dims.tp, dims.pp, tp_rank, pp_rank)

    def stage_layers(self, num_layers: int) -> range:
        """Global indices of the decoder layers on this pipeline stage."""
        return pipeline_stage_layers(num_layers, self.pp_size, self.pp_rank)


def tp_partition_dim(name: str) -> int | None:
    """The dim a tensor is split on across TP ranks, or None if every rank holds it whole."""
    for suffix, dim in _TP_DIMS:
        if name.endswith(suffix):
            return dim
    return None


def global_name(local: str, layout: ShardLayout, num_layers: int) -> str:
    """A stage-local parameter name with its layer index made global."""
    match = _LAYER.match(local)
    if not match:
        return local
    return f"decoder.layers.{layout.stage_layers(num_layers).start + int(match[1])}.{match[2]}"


def tp_slice(full: torch.Tensor, name: str, layout: ShardLayout) -> torch.Tensor:
    """This rank's TP slice of a full tensor."""
    dim = tp_partition_dim(name)
    if dim is None or layout.tp_size == 1:
        return full
    if name.endswith(_GLU):
        return torch.cat([_chunk(half, 0, layout) for half in full.chunk(2)])
    return _chunk(full, dim, layout)


def _chunk(full: torch.Tensor, dim: int, layout: ShardLayout) -> torch.Tensor:
    if full.shape[dim] % layout.tp_size:
        raise ValueError(
            f"a dimension of size {full.shape[dim]} does not split over "
            f"policy.megatron_cfg.tensor_model_parallel_size={layout.tp_size}; use a divisor of it "
            "(attention: num_key_value_heads; MLP: intermediate_size; embeddings: vocab_size)"
        )
    return full.chunk(layout.tp_size, dim=dim)[layout.tp_rank].contiguous()


def tp_merge(slices: list[torch.Tensor], name: str) -> torch.Tensor:
    """Inverse of ``tp_slice`` over the slices of ranks 0..tp_size-1 (exact: no arithmetic)."""
    dim = tp_partition_dim(name)
    if dim is None or len(slices) == 1:
        return slices[0]
    if name.endswith(_GLU):
        halves = [s.chunk(2) for s in slices]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(slices, dim=dim)


def shard_state(
    local_names: list[str], read_full: Callable[[str], torch.Tensor], layout: ShardLayout, num_layers: int
) -> dict[str, torch.Tensor]:
    """The state dict of one rank: for each of its (stage-local) names, its slice of the full tensor.

    With tied embeddings the checkpoint has no ``output_layer.weight``; the last
    pipeline stage of a PP > 1 model still holds a copy (megatron keeps the two
    in sync through its embedding group), which is loaded from the embedding.
    """
    state = {}
    for local in local_names:
        name = global_name(local, layout, num_layers)
        try:
            full = read_full(name)
        except KeyError:
            if name != TIED_OUTPUT:
                raise
            full = read_full(EMBEDDING)
        state[local] = tp_slice(full, name, layout)
    return state


def merge_shards(
    shards: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], num_layers: int, tied_embeddings: bool
) -> dict[str, torch.Tensor]:
    """Full tensors with global names from every rank's state dict, keyed by (tp_rank, pp_rank)."""
    tp_size = 1 + max(tp for tp, _ in shards)
    pp_size = 1 + max(pp for _, pp in shards)
    merged: dict[str, torch.Tensor] = {}
    for pp in range(pp_size):
        per_tp = [shards[(tp, pp)] for tp in range(tp_size)]
        layout = ShardLayout(tp_size, pp_size, 0, pp)
        slices = partial(_slices_of, per_tp)
        merged.update(stage_tensors(list(per_tp[0]), slices, layout, num_layers, tied_embeddings))
    return merged


def _slices_of(per_tp: list[Mapping[str, torch.Tensor]], local: str) -> list[torch.Tensor]:
    return [state[local] for state in per_tp]


def stage_tensors(
    local_names: Iterable[str],
    tp_slices: Callable[[str], list[torch.Tensor]],
    layout: ShardLayout,
    num_layers: int,
    tied_embeddings: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """One pipeline stage's full tensors (global names), merged one at a time from ``tp_slices(local)``.

    Lazy, so a live model can stream a stage without holding it merged: only
    the tensor being yielded is full. ``tp_slices`` gives the slices of TP
    ranks 0..tp_size-1 (a replicated tensor may come as one).
    """
    for local in local_names:
        if local.endswith("_extra_state"):
            continue
        name = global_name(local, layout, num_layers)
        if tied_embeddings and name == TIED_OUTPUT:
            continue  # the last stage's copy of the embedding
        yield name, tp_merge(tp_slices(local), name)


def layer_groups(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive full tensors grouped by decoder layer (a non-layer tensor is a group of its own).

    A layer is what ``megatron_to_hf`` needs whole (its fused QKV and SwiGLU
    split into HF tensors), and no more.
    """
    for _, items in groupby(tensors, key=lambda item: _layer_key(item[0])):
        yield dict(items)


def _layer_key(name: str) -> str:
    match = _LAYER.match(name)
    return match[1] if match else name


# ----------------------------------------------------------------------------
# Training checkpoints: one file per model-parallel shard
# ----------------------------------------------------------------------------
SHARD_GLOB = "policy_tp*_pp*.pt"
_SHARD_NAME = re.compile(r"^policy_tp(\d+)_pp(\d+)\.pt$")


def shard_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"policy_tp{tp_rank:02d}_pp{pp_rank:02d}.pt"


def optimizer_shard_file_name(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    """One distributed-optimizer rank's share of a model shard's optimizer state (``SHARD_GLOB`` skips it)."""
    return f"optimizer_tp{tp_rank:02d}_pp{pp_rank:02d}_dp{dp_rank:03d}.pt"


def read_checkpoint_model_shards(directory: Path) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """The model state of every shard file of a training checkpoint, keyed by (tp_rank, pp_rank)."""
    shards = {}
    for path in sorted(Path(directory).glob(SHARD_GLOB)):
        match = _SHARD_NAME.match(path.name)
        if match:
            state = torch.load(path, map_location="cpu", weights_only=False)["model"]
            shards[(int(match[1]), int(match[2]))] = state
    if not shards:
        raise FileNotFoundError(f"no {SHARD_GLOB} shard files in {directory}")
    tp_size = 1 + max(tp for tp, _ in shards)
    pp_size = 1 + max(pp for _, pp in shards)
    missing = [shard_file_name(tp, pp) for tp in range(tp_size) for pp in range(pp_size) if (tp, pp) not in shards]
    if missing:
        raise FileNotFoundError(f"{directory} is an incomplete checkpoint: missing {', '.join(missing)}")
    return shards
