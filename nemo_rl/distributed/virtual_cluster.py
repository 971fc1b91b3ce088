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

On a cluster of several Ray nodes each logical node of a virtual cluster is
pinned to one Ray node (the head first, then by node name), so ranks fill the
nodes in order: rank 0, and with it torch.distributed's rendezvous, sits on the
first, model-parallel peers share a node, data-parallel replicas span nodes,
and a cluster can start at ``first_node`` (vLLM engines on nodes of their own).
Where the Ray cluster has fewer nodes than asked for (one CPU machine standing
in for several nodes) Ray places the groups wherever they fit, as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nemo_rl.utils.errors import ConfigError

logger = logging.getLogger(__name__)

NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node: a hard pin, unlike a soft target node


@dataclass(frozen=True)
class BundleSpec:
    num_gpus: float
    num_cpus: float


@dataclass(frozen=True)
class RayNode:
    """One live node of the Ray cluster, as the messages and the placement name it."""

    node_id: str
    name: str  # ``ray start --node-name``, by default the node's IP address
    cpus: float
    gpus: float
    is_head: bool

    def describe(self) -> str:
        """The name, and the id's start: two nodes on one host share an IP, the default name."""
        return f"{self.name} (id {self.node_id[:8]})"


def alive_nodes() -> list[RayNode]:
    """The cluster's live nodes in the order ranks fill them: the head (where the driver runs) first, then by name."""
    nodes = [
        RayNode(
            node_id=n["NodeID"],
            name=n.get("NodeName") or n["NodeManagerAddress"],
            cpus=n["Resources"].get("CPU", 0.0),
            gpus=n["Resources"].get("GPU", 0.0),
            is_head="node:__internal_head__" in n["Resources"],
        )
        for n in ray.nodes()
        if n["Alive"]
    ]
    return sorted(nodes, key=lambda n: (not n.is_head, n.name, n.node_id))


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
        first_node: int = 0,
    ):
        """``devices_per_bundle``: GPUs (or CPU shares) one worker holds, e.g. a vLLM engine with tensor parallelism;
        ``first_node``: the Ray node (in ``alive_nodes`` order) this cluster's first logical node is pinned to."""
        resources = ray.cluster_resources()
        self.use_gpus = resources.get("GPU", 0) > 0 if use_gpus is None else use_gpus
        self.workers_per_node = workers_per_node
        self.num_nodes = num_nodes
        self.max_colocated_worker_groups = max_colocated_worker_groups
        self.node_share = node_share
        self.devices_per_bundle = devices_per_bundle
        nodes = alive_nodes()
        self.targets: list[RayNode] | None = (
            nodes[first_node : first_node + num_nodes] if len(nodes) >= first_node + num_nodes else None
        )
        self.bundle = self._bundle_spec(resources)
        self._groups = [self._reserve_node(i, name) for i in range(num_nodes)]

    @property
    def world_size(self) -> int:
        return self.workers_per_node * self.num_nodes

    def _bundle_spec(self, resources: dict) -> BundleSpec:
        if self.use_gpus:
            return BundleSpec(num_gpus=self.devices_per_bundle, num_cpus=self.devices_per_bundle)
        if self.targets is not None:  # each logical node has a Ray node's CPUs (the smallest one sizes them all)
            per_node_cpus = min(node.cpus for node in self.targets) * self.node_share
        else:  # the machine's CPUs shared by the logical nodes placed on it
            per_node_cpus = resources.get("CPU", 1) * self.node_share / max(self.num_nodes, 1)
        return BundleSpec(num_gpus=0, num_cpus=max(max(per_node_cpus, 1) // self.workers_per_node, 1))

    def _reserve_node(self, node: int, name: str) -> PlacementGroup:
        bundles = [
            {"CPU": self.bundle.num_cpus, "GPU": self.bundle.num_gpus}
            if self.use_gpus
            else {"CPU": self.bundle.num_cpus}
            for _ in range(self.workers_per_node)
        ]
        target = None if self.targets is None else self.targets[node]
        if target is not None:
            self._check_fits(bundles, target)
        selector = None if target is None else [{NODE_ID_LABEL: target.node_id}] * len(bundles)
        group = placement_group(
            bundles,
            strategy="STRICT_PACK",
            name=f"{name}_node{node}",
            bundle_label_selector=cast("list[dict[str, str]]", selector),  # None, its default, is not in its annotation
        )
        ready, _ = ray.wait([group.ready()], timeout=300)
        if not ready:
            remove_placement_group(group)
            where = f"node {node} (Ray node {target.describe()})" if target else f"node {node}"
            raise RuntimeError(
                f"could not reserve {self.workers_per_node} bundles of {bundles[0]} on {where} within 300 s; "
                f"cluster has {ray.cluster_resources()}. Lower cluster.gpus_per_node or add nodes."
            )
        return group

    def _check_fits(self, bundles: list[dict[str, float]], target: RayNode) -> None:
        """Refuse now what the node can never hold, rather than after Ray's 300 s wait for it."""
        for resource, have in (("CPU", target.cpus), ("GPU", target.gpus)):
            need = sum(b.get(resource, 0) for b in bundles)
            if need > have:
                raise ConfigError(
                    f"cluster: {self.workers_per_node} workers of {bundles[0]} need {need:g} {resource}s on one node, "
                    f"but Ray node {target.describe()} has {have:g}; lower the workers per node (cluster.gpus_per_node "
                    "or the generation's resources) or start the node with more"
                )

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


def has_nodes(count: int) -> bool:
    """Whether the Ray cluster has ``count`` live nodes: room for clusters on nodes of their own."""
    return len(alive_nodes()) >= count
