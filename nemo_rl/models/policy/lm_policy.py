"""Policy: the driver-side handle on a group of policy workers (Megatron, or DTensor for the HF model).

It owns the split of a global batch into data-parallel shards and micro-batches
(model-parallel peers of one DP rank receive the same shard) and the reduction
of per-rank metrics, so algorithms only see global batches and global metrics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch

from nemo_rl.data.packing import pack_batch, pack_capacity
from nemo_rl.distributed.parallel_dims import ParallelDims
from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
from nemo_rl.distributed.worker_group import RayWorkerGroup
from nemo_rl.models.generation.weight_sync import WeightBucket, receive
from nemo_rl.models.generation.weight_transports import OBJECT_STORE, Rendezvous
from nemo_rl.models.megatron.context_parallel import single_sample_rows
from nemo_rl.models.policy.dtensor_policy_worker import DTensorPolicyWorker
from nemo_rl.models.policy.interfaces import (
    LogprobsWithReference,
    LossFunction,
    PolicyInterface,
    PolicyWorkerInterface,
)
from nemo_rl.models.policy.loss_metrics import add_totals
from nemo_rl.models.policy.megatron_policy_worker import MegatronPolicyWorker
from nemo_rl.models.policy.micro_batches import (
    MICRO_BATCHES,
    UTILISATION,
    MicroBatchSplit,
    budget_metrics,
    split_by_budget,
    split_fixed,
)

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

# What ``train`` adds about how the step's rows were laid out in micro-batches (packing, token budgets).
LAYOUT_METRICS = ("packing_efficiency", UTILISATION, MICRO_BATCHES)


def layout_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The layout metrics of a ``train`` result, logged with the step's (none with fixed micro-batches)."""
    return {key: result[key] for key in LAYOUT_METRICS if key in result}


def split_rows(batch: Batch, parts: int) -> list[Batch]:
    rows = next(iter(batch.values())).shape[0]
    if rows % parts:
        raise ValueError(f"batch of {rows} rows does not split into {parts} equal parts")
    size = rows // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def _in_row_order(output: Any) -> Any:
    """A result of one-sample rows (context parallelism): already in the shard's row order."""
    return output


class Policy:
    def __init__(
        self,
        cluster: RayVirtualCluster,
        policy_cfg,
        model_path: Path,
        seed: int,
        init_reference_model: bool = False,
        reward_head: bool = False,
        trainable: bool = True,
        role: str = "policy worker",
        rows_per_sample: int = 1,
    ):
        """``init_reference_model`` keeps the starting weights for ``get_logprobs(..., reference=True)`` (KL in
        RL, DPO); ``reward_head`` makes the model a reward model; ``trainable=False`` a forward-only model
        without optimizer state (a distillation teacher). The last two are Megatron-only. ``role`` names the
        workers in the log and in the error when one dies. ``rows_per_sample`` consecutive rows stay in one
        micro-batch under token-budget batching (2: a preference pair, which pairwise losses compare)."""
        self.cfg = policy_cfg
        self.rows_per_sample = rows_per_sample
        self.dims = ParallelDims.for_world(policy_cfg, cluster.world_size)
        worker_cls: type[PolicyWorkerInterface] = (
            DTensorPolicyWorker if policy_cfg.dtensor_cfg.enabled else MegatronPolicyWorker
        )
        megatron_only = ({"reward_head": True} if reward_head else {}) | ({} if trainable else {"trainable": False})
        self.worker_group = RayWorkerGroup(
            cluster,
            worker_cls,
            policy_cfg,
            str(model_path),
            seed=seed,
            init_reference_model=init_reference_model,
            role=role,
            **megatron_only,
        )
        self.worker_info = self.worker_group.run_all("info")
        converted = self.worker_info[0]["checkpoint_dir"]  # the Megatron conversion cache entry, if any
        self.checkpoint_dir = Path(converted) if converted else None
        self.converted_now = self.worker_info[0]["converted_now"]
        last_pp = max(info["pp_rank"] for info in self.worker_info)
        # One reporter per (DP, CP) rank: metrics are identical across TP peers and exist only on the
        # last pipeline stage; CP ranks each hold different tokens of the same samples.
        self._reporters = [
            i for i, info in enumerate(self.worker_info) if info["tp_rank"] == 0 and info["pp_rank"] == last_pp
        ]
        # Per DP rank, the worker whose results stand for its model-parallel group (first CP rank).
        self._dp_reporters = {
            self.worker_info[i]["dp_rank"]: i for i in self._reporters if self.worker_info[i]["cp_rank"] == 0
        }

    def _shard_args(self, batch: Batch, micro_batch_size: int, loss_fn: LossFunction) -> tuple[list[tuple], dict]:
        """Per-worker (micro-batches, loss) and layout metrics.

        With sequence packing each DP shard's samples are packed into rows of
        ``max_total_sequence_length`` tokens, one row per micro-batch; with
        token-budget batching they fill micro-batches of ``train_mb_tokens``
        (``token_budget``). Either way ``micro_batch_size`` does not apply.
        """
        shards = split_rows(batch, self.dims.dp)
        if self.cfg.dynamic_batching.enabled:
            budget = self.cfg.dynamic_batching.train_mb_tokens
            splits = [self._budget_split(shard, budget) for shard in shards]
            return self._per_worker([split.micro_batches for split in splits], loss_fn), budget_metrics(splits, budget)
        per_dp = []
        real = allocated = 0
        multiple = self.dims.sequence_multiple
        for shard in shards:
            if self.cfg.sequence_packing.enabled:
                capacity = pack_capacity(self.cfg.max_total_sequence_length, multiple)
                rows, stats = pack_batch(shard, capacity, multiple)
                real, allocated = real + stats.real_tokens, allocated + stats.allocated_tokens
                per_dp.append(rows)
            else:
                per_dp.append(self._fixed_split(shard, micro_batch_size).micro_batches)
        metrics = {"packing_efficiency": real / allocated} if allocated else {}
        return self._per_worker(per_dp, loss_fn), metrics

    def _per_worker(self, per_dp: list, *args: Any) -> list[tuple]:
        """Each worker's call arguments: its DP rank's share, then ``args``."""
        return [(per_dp[info["dp_rank"]], *args) for info in self.worker_info]

    def _fixed_split(self, shard: Batch, micro_batch_size: int) -> MicroBatchSplit:
        """``shard`` in micro-batches of ``micro_batch_size`` rows, each trimmed to its longest row (``input_lengths``)
        at a length the layout takes, except under pipeline parallelism, whose stages exchange activations of one
        shape per schedule."""
        multiple = math.lcm(self.cfg.make_sequence_length_divisible_by, self.dims.sequence_multiple)
        return split_fixed(shard, micro_batch_size, multiple if self.dims.pp == 1 else None)

    def _budget_split(self, shard: Batch, budget: int) -> MicroBatchSplit:
        """``shard`` in micro-batches of at most ``budget`` tokens, lengths a multiple of both the configured
        round and what the layout needs (sequence parallelism splits the sequence over the TP ranks)."""
        multiple = math.lcm(self.cfg.dynamic_batching.sequence_length_round, self.dims.sequence_multiple)
        return split_by_budget(shard, budget, multiple, self.rows_per_sample)

    def _reduce(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        reported = [results[i] for i in self._reporters]
        out = {k: v for k, v in reported[0].items() if k != "metrics"}
        out["metrics"] = add_totals(result["metrics"] for result in reported)
        return out

    def train(self, batch: Batch, loss_fn: LossFunction, micro_batch_size: int) -> dict[str, Any]:
        return self._run("train_step", batch, loss_fn, micro_batch_size)

    def evaluate(self, batch: Batch, loss_fn: LossFunction, micro_batch_size: int) -> dict[str, Any]:
        return self._run("evaluate", batch, loss_fn, micro_batch_size)

    def _run(self, method: str, batch: Batch, loss_fn: LossFunction, micro_batch_size: int) -> dict[str, Any]:
        args, layout = self._shard_args(batch, micro_batch_size, loss_fn)
        return self._reduce(self.worker_group.run_each(method, args)) | layout

    def get_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits from the last pipeline stage (every rank runs the forward pass)."""
        return self.worker_group.run_all("get_logits", input_ids)[self._reporters[0]]

    def get_logprobs(self, batch: Batch, micro_batch_size: int, reference: bool = False) -> torch.Tensor:
        """log p(x_t | x_<t) of every token of ``batch["input_ids"]`` ([B, L], 0 at t = 0 and meaningless on padding).

        ``reference`` scores with the starting weights (``init_reference_model``).
        """
        return self._forward_rows("get_logprobs", batch, micro_batch_size, reference)

    def get_logprobs_with_reference(self, batch: Batch, micro_batch_size: int) -> LogprobsWithReference:
        """``get_logprobs(batch, ...)`` and ``get_logprobs(batch, ..., reference=True)``, bit for bit, from one call
        of each worker: the batch is split and sent once and each worker scores it twice in a row (live weights
        first). ``seconds`` holds each pass's time on the slowest reporting worker."""
        shards = self._forward_shards("get_logprobs_with_reference", batch, micro_batch_size, ())
        pairs = [restore(scored) for restore, (scored, _) in shards]
        policy, reference = (torch.cat(part) for part in zip(*pairs, strict=True))
        timings = [seconds for _, (_, seconds) in shards]
        return LogprobsWithReference(policy, reference, {name: max(t[name] for t in timings) for name in timings[0]})

    def get_topk_logprobs(self, batch: Batch, micro_batch_size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most likely tokens at every position, (log-probs, vocab ids) ``[B, L, k]`` indexed like
        ``get_logprobs`` (row t: the distribution token t was drawn from); a teacher's summary for distillation."""
        values, indices = zip(*self._forward_rows("get_topk_logprobs", batch, micro_batch_size, k, concat=False))
        return torch.cat(values), torch.cat(indices)

    def _forward_rows(self, method: str, batch: Batch, micro_batch_size: int, *args, concat: bool = True):
        """A forward-only worker ``method`` over the rows of ``batch``, results in row order (one per DP rank
        unless ``concat``)."""
        ordered = [restore(out) for restore, out in self._forward_shards(method, batch, micro_batch_size, args)]
        return torch.cat(ordered) if concat else ordered

    def _forward_shards(
        self, method: str, batch: Batch, micro_batch_size: int, args: tuple
    ) -> list[tuple[Callable[[Any], Any], Any]]:
        """``method`` over the rows of ``batch``: per DP rank, its worker's result and what puts the result's
        rows back in the shard's order. With context parallelism every row is its own sample for megatron's
        packed path (the row length is already a multiple of 2 x CP). Otherwise the rows go in micro-batches
        of ``micro_batch_size`` rows, or with token-budget batching of ``logprob_mb_tokens`` tokens, each trimmed
        to its longest row (``input_lengths``); the results come back in row order at the batch's length (zero
        past each micro-batch's own length, where only padding lies)."""
        if self.dims.cp > 1 and not self.cfg.dynamic_batching.enabled:
            shards = split_rows({"input_ids": batch["input_ids"]}, self.dims.dp)
            per_dp = [single_sample_rows(shard["input_ids"]) for shard in shards]
            return [(_in_row_order, out) for out in self._run_forward(method, per_dp, args)]
        fields = {key: batch[key] for key in ("input_ids", "input_lengths") if key in batch}
        splits = [
            self._budget_split(shard, self.cfg.dynamic_batching.logprob_mb_tokens)
            if self.cfg.dynamic_batching.enabled
            else self._fixed_split(shard, micro_batch_size)
            for shard in split_rows(fields, self.dims.dp)
        ]
        results = self._run_forward(method, [split.micro_batches for split in splits], args)
        return [(split.restore, out) for split, out in zip(splits, results, strict=True)]

    def _run_forward(self, method: str, per_dp: list[list[Batch]], args: tuple) -> list[Any]:
        """``method`` on every worker with its DP rank's micro-batches; one result per DP rank, in rank order."""
        results = self.worker_group.run_each(method, self._per_worker(per_dp, *args))
        return [results[self._dp_reporters[dp]] for dp in range(self.dims.dp)]

    def get_scores(self, batch: Batch, micro_batch_size: int) -> torch.Tensor:
        """A reward model's score of every row ([B]): the head's output at the row's last token (``input_lengths``)."""
        scores = self._forward_rows("get_scores", batch, micro_batch_size)
        return scores[torch.arange(scores.shape[0]), batch["input_lengths"] - 1]

    def stream_hf_weights(self, bucket_bytes: int, transport: str = OBJECT_STORE) -> Iterator[WeightBucket]:
        """The policy's HF-named weights for a refit, as buckets the workers send over ``transport``.

        Every worker streams (those that send nothing take part in their TP
        group's gathers); the driver receives names, layouts and object refs
        only, never a tensor (see ``weight_sync``).
        """
        streams = [
            worker.hf_weight_buckets.options(num_returns="streaming").remote(bucket_bytes, transport)
            for worker in self.worker_group.workers
        ]
        for sender, stream in enumerate(streams):
            yield from receive(stream, sender)

    def weight_group_addresses(self, transport: str) -> dict[int, tuple[str, int, str]]:
        """Each sending worker's weight-group rendezvous (host, port, backend), by worker index."""
        addresses = self.worker_group.run_all("weight_group_address", transport)
        return {sender: address for sender, address in enumerate(addresses) if address is not None}

    def join_weight_group(self, sender: int, rendezvous: Rendezvous) -> ray.ObjectRef:
        """The sender's side of joining its weight group; the engines join at the same time."""
        return self.worker_group.workers[sender].join_weight_group.remote(rendezvous)

    def gathered_state(self, what: str = "params") -> dict[str, torch.Tensor]:
        """Full Megatron-named tensors of the parameters or gradients, merged over every TP x PP shard."""
        return self.worker_group.run_all("gathered_state", what)[0]

    def save_checkpoint(self, directory: Path) -> None:
        self.worker_group.run_all("save_checkpoint", str(directory))

    def load_checkpoint(self, directory: Path) -> None:
        self.worker_group.run_all("load_checkpoint", str(directory))

    def export_hf(self, directory: Path, model_dir: Path | None = None, tokenizer_dir: Path | None = None) -> None:
        self.worker_group.run_all(
            "export_hf",
            str(directory),
            str(model_dir) if model_dir else None,
            str(tokenizer_dir) if tokenizer_dir else None,
        )

    def shutdown(self) -> None:
        self.worker_group.shutdown()


if TYPE_CHECKING:  # basedpyright holds Policy to the contract the algorithms use
    _conforms: type[PolicyInterface] = Policy
