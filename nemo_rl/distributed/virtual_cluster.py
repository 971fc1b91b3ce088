"""Reserving the cluster's devices for one run with Ray placement groups.

One bundle per worker process: a GPU (plus CPUs) on GPU clusters, or a share of
the CPUs on a machine without GPUs, where each "GPU" of the config becomes one
CPU worker process; a worker that drives several devices itself (a vLLM engine
with tensor parallelism) gets a bundle of that many. Bundles are packed per node so model-parallel peers sit
together.

Colocated worker groups (GRPO's policy and its vLLM engines) share the same
bundles: each of the ``max_colocated_worker_groups`` actors placed in a bundle
reserves an equal fraction of it, and they take turns using all of it (the
training step and generation never overlap). Groups on bundles of their own
split a CPU node between their clusters with ``node_share``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundleSpec:
    num_gpus: float
    num_cpus: float


class RayVirtualCluster:
    def __init__(
        self,
        workers_per_node: int,
        num_nodes: int = 1,
        use_gpus: bool | None = None,
        name: str = "nemo_rl",
        max_colocated_worker_groups: int = 1,
        node_share: float = 1.0,
        devices_per_bundle: int = 1,
    ):
        """``devices_per_bundle``: GPUs (or CPU shares) one worker holds, e.g. a vLLM engine with tensor parallelism."""
        resources = ray.cluster_resources()
        self.use_gpus = resources.get("GPU", 0) > 0 if use_gpus is None else use_gpus
        self.workers_per_node = workers_per_node
        self.num_nodes = num_nodes
        self.max_colocated_worker_groups = max_colocated_worker_groups
        self.node_share = node_share
        self.devices_per_bundle = devices_per_bundle
        self.bundle = self._bundle_spec(resources)
        self._groups = [self._reserve_node(i, name) for i in range(num_nodes)]

    @property
    def world_size(self) -> int:
        return self.workers_per_node * self.num_nodes

    def _bundle_spec(self, resources: dict) -> BundleSpec:
        total_cpus = resources.get("CPU", 1)
        if self.use_gpus:
            return BundleSpec(num_gpus=self.devices_per_bundle, num_cpus=self.devices_per_bundle)
        per_node_cpus = max(total_cpus * self.node_share / max(self.num_nodes, 1), 1)
        return BundleSpec(num_gpus=0, num_cpus=max(per_node_cpus // self.workers_per_node, 1))

    def _reserve_node(self, node: int, name: str) -> PlacementGroup:
        bundles = [
            {"CPU": self.bundle.num_cpus, "GPU": self.bundle.num_gpus}
            if self.use_gpus
            else {"CPU": self.bundle.num_cpus}
            for _ in range(self.workers_per_node)
        ]
        group = placement_group(bundles, strategy="STRICT_PACK", name=f"{name}_node{node}")
        ready, _ = ray.wait([group.ready()], timeout=300)
        if not ready:
            raise RuntimeError(
                f"could not reserve {self.workers_per_node} bundles of {bundles[0]} on node {node} within 300 s; "
                f"cluster has {ray.cluster_resources()}. Lower cluster.gpus_per_node or add nodes."
            )
        return group

    def bundles(self) -> list[tuple[PlacementGroup, int]]:
        """(placement group, bundle index) for every worker, in global-rank order."""
        return [(group, i) for group in self._groups for i in range(self.workers_per_node)]

    def actor_options(self, rank: int, env: dict[str, str] | None = None) -> dict[str, Any]:
        """Ray ``.options(...)`` that place one actor of a (possibly colocated) worker group on bundle ``rank``.

        The actor reserves its group's fraction of the bundle but runs with the
        whole bundle's CPU threads: colocated groups take turns, never overlap.
        """
        group, index = self.bundles()[rank]
        share = 1.0 / self.max_colocated_worker_groups
        threads = str(int(self.bundle.num_cpus))
        return {
            "num_cpus": self.bundle.num_cpus * share,
            "num_gpus": self.bundle.num_gpus * share,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, **(env or {})}},
        }

    def shutdown(self) -> None:
        for group in self._groups:
            remove_placement_group(group)
        self._groups = []
