"""Starting or joining the Ray cluster that every run uses."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Join ``RAY_ADDRESS`` when set (a Slurm/Kubernetes cluster), else start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("Connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        logger.info("Started a local Ray cluster: %s", ray.cluster_resources())
