"""Starting or joining the Ray cluster that every run uses."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None, workers: int | None = None) -> None:
    """Join ``RAY_ADDRESS`` when set (a Slurm/Kubernetes cluster), else start a local cluster.

    On a local machine without GPUs every worker needs a CPU bundle; when the
    run asks for more ``workers`` than there are cores (e.g. a TP x CP layout
    tested on a laptop) the local cluster advertises one CPU per worker, so the
    workers share the cores instead of the reservation failing.
    """
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
        if num_cpus is None and workers and not _has_local_gpus():
            cores = os.cpu_count() or 1
            if workers > cores:
                logger.warning("%d CPU workers share %d cores (each runs with fewer threads)", workers, cores)
                num_cpus = workers
        # "local": a new cluster of this process's own, never one that `ray start` left on this host.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        logger.info("Started a local Ray cluster: %s", ray.cluster_resources())


def _has_local_gpus() -> bool:
    import torch

    return torch.cuda.is_available()
