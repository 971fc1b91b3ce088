"""Policy: the driver-side handle on a group of Megatron policy workers.

It owns the split of a global batch into data-parallel shards and micro-batches
(model-parallel peers of one DP rank receive the same shard) and the reduction
of per-rank metrics, so algorithms only see global batches and global metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
from nemo_rl.distributed.worker_group import RayWorkerGroup
from nemo_rl.models.policy.megatron_policy_worker import LossFn, MegatronPolicyWorker

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def split_rows(batch: Batch, parts: int) -> list[Batch]:
    rows = next(iter(batch.values())).shape[0]
    if rows % parts:
        raise ValueError(f"batch of {rows} rows does not split into {parts} equal parts")
    size = rows // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


class Policy:
    def __init__(self, cluster: RayVirtualCluster, policy_cfg, model_path: Path, seed: int):
        self.cfg = policy_cfg
        self.worker_group = RayWorkerGroup(cluster, MegatronPolicyWorker, policy_cfg, str(model_path), seed=seed)
        self.worker_info = self.worker_group.run_all("info")
        self.dp_size = 1 + max(info["dp_rank"] for info in self.worker_info)
        self.checkpoint_dir = Path(self.worker_info[0]["checkpoint_dir"])
        self.converted_now = self.worker_info[0]["converted_now"]
        last_pp = max(info["pp_rank"] for info in self.worker_info)
        # One reporter per DP rank: metrics are identical across its TP peers.
        self._reporters = [
            i for i, info in enumerate(self.worker_info) if info["tp_rank"] == 0 and info["pp_rank"] == last_pp
        ]

    def _shard_args(self, batch: Batch, micro_batch_size: int, loss_fn: LossFn) -> list[tuple]:
        shards = split_rows(batch, self.dp_size)
        per_dp = []
        for shard in shards:
            rows = next(iter(shard.values())).shape[0]
            per_dp.append(split_rows(shard, max(rows // micro_batch_size, 1)))
        return [(per_dp[info["dp_rank"]], loss_fn) for info in self.worker_info]

    def _reduce(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        reported = [results[i] for i in self._reporters]
        metrics: dict[str, float] = {}
        for result in reported:
            for key, value in result["metrics"].items():
                metrics[key] = metrics.get(key, 0.0) + value
        out = {k: v for k, v in reported[0].items() if k != "metrics"}
        out["metrics"] = metrics
        return out

    def train(self, batch: Batch, loss_fn: LossFn, micro_batch_size: int) -> dict[str, Any]:
        return self._reduce(
            self.worker_group.run_each("train_step", self._shard_args(batch, micro_batch_size, loss_fn))
        )

    def evaluate(self, batch: Batch, loss_fn: LossFn, micro_batch_size: int) -> dict[str, Any]:
        return self._reduce(self.worker_group.run_each("evaluate", self._shard_args(batch, micro_batch_size, loss_fn)))

    def get_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits from the last pipeline stage (every rank runs the forward pass)."""
        return self.worker_group.run_all("get_logits", input_ids)[self._reporters[0]]

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
