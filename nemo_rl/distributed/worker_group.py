"""A group of identical Ray actors, one per bundle of a RayVirtualCluster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nemo_rl.distributed.actor_roster import ActorRoster, kill
from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
from nemo_rl.distributed.worker_process_group import free_port


def wait_until_ready(actors: Sequence[Any]) -> None:
    """Block until every actor's constructor ran; when one failed, kill them all, so none outlives the error."""
    try:
        ray.get([actor.__ray_ready__.remote() for actor in actors])
    except BaseException:
        kill(actors)
        raise


def node_address_and_port() -> tuple[str, int]:
    """This node's address and a port free now: a rendezvous hosted by this process."""
    return ray.util.get_node_ip_address(), free_port()


_node_address_and_port = ray.remote(node_address_and_port)  # the same, probed in another actor's bundle


class RayWorkerGroup:
    """Starts ``worker_cls`` on every bundle with rank/world size and a rendezvous address.

    The rendezvous (torch.distributed's master) is on the node of rank 0, found by
    running a probe in rank 0's bundle, so multi-node clusters work unchanged.
    ``role`` names the workers in the log and when one dies (``ActorRoster``).
    """

    def __init__(
        self,
        cluster: RayVirtualCluster,
        worker_cls: type,
        *args: Any,
        role: str = "worker",
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ):
        bundles = cluster.bundles()
        first_group, first_index = bundles[0]
        master_addr, master_port = ray.get(
            _node_address_and_port.options(
                num_cpus=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    first_group, placement_group_bundle_index=first_index
                ),
            ).remote()
        )
        remote_cls = ray.remote(worker_cls)
        self.workers = [
            remote_cls.options(**cluster.actor_options(rank, env)).remote(
                *args, rank=rank, world_size=len(bundles), master_addr=master_addr, master_port=master_port, **kwargs
            )
            for rank in range(len(bundles))
        ]
        # Surface constructor failures (bad checkpoint, OOM) here rather than at first use.
        wait_until_ready(self.workers)
        self.roster = ActorRoster(role, self.workers)

    def run_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self.roster.get([getattr(w, method).remote(*args, **kwargs) for w in self.workers])

    def run_each(self, method: str, per_worker_args: Sequence[tuple], **kwargs: Any) -> list[Any]:
        return self.roster.get(
            [getattr(w, method).remote(*args, **kwargs) for w, args in zip(self.workers, per_worker_args, strict=True)]
        )

    def shutdown(self) -> None:
        self.roster.shutdown()
        self.workers = []
