"""Starting or joining the Ray cluster that every run uses."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Join ``RAY_ADDRESS`` when set (a Slurm/Kubernetes cluster), else start a local cluster."""
    import ray
    from ray._private import ray_constants

    # Ray reads RAY_ENABLE_UV_RUN_RUNTIME_ENV (set in nemo_rl.distributed) when it is first
    # imported; if something imported ray earlier, apply the setting here.
    if os.environ.get("RAY_ENABLE_UV_RUN_RUNTIME_ENV") == "0":
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("Connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        logger.info("Started a local Ray cluster: %s", ray.cluster_resources())
