"""The driver's handle on the vLLM engines of an RL run: placement, data-parallel rollouts, refit, sleep/wake.

One engine per bundle of its cluster. Colocated, the engines share the
policy's bundles (each actor reserves half of a bundle, see
``RayVirtualCluster.actor_options``) and, where vLLM supports it (the CUDA
build), sleep during training so the trainer gets the accelerator memory back.
Otherwise they run on bundles of their own. Rollouts are split over the engines
in contiguous shares; every request carries its own seed, so results do not
depend on the number of engines.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import ray

from nemo_rl.distributed.sharding import split_evenly
from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
from nemo_rl.distributed.worker_group import wait_until_ready
from nemo_rl.models.generation.vllm_worker import Completion, VllmGenerationWorker
from nemo_rl.models.generation.weight_sync import MIB, WeightSource, WeightSync
from nemo_rl.models.generation.weight_transports import resolve_transport

logger = logging.getLogger(__name__)


class VllmGeneration:
    def __init__(self, cluster: RayVirtualCluster, policy_cfg, model_path: str, seed: int):
        gen = policy_cfg.generation
        self.cfg = gen
        colocated = gen.colocated.enabled
        sleep_mode = colocated and cluster.use_gpus
        transport = resolve_transport(
            gen.refit_transport, cuda=cluster.use_gpus, colocated=colocated, engines=cluster.world_size
        )
        actor = ray.remote(VllmGenerationWorker)
        self.engines = [
            actor.options(**cluster.actor_options(rank)).remote(
                policy_cfg, model_path, dict(gen.vllm_kwargs), seed=seed + rank, sleep_mode=sleep_mode
            )
            for rank in range(cluster.world_size)
        ]
        wait_until_ready(self.engines)  # constructor errors surface here
        self.weight_sync = WeightSync(self.engines, gen.refit_bucket_mib * MIB, transport)
        logger.info(
            "%d vLLM engine(s) %s, refit over %s",
            len(self.engines),
            "colocated with the policy" if colocated else "on their own bundles",
            transport,
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], greedy: bool = False
    ) -> list[Completion]:
        """One completion per prompt with the run's sampling settings (``greedy`` for validation)."""
        gen = self.cfg
        shares = list(
            zip(split_evenly(prompts, len(self.engines)), split_evenly(seeds, len(self.engines)), strict=True)
        )
        futures = [
            engine.generate.remote(
                list(share_prompts),
                gen.max_new_tokens,
                temperature=0.0 if greedy else gen.temperature,
                top_p=1.0 if greedy else gen.top_p,
                stop_strings=gen.stop_strings,
                seeds=list(share_seeds),
            )
            for engine, (share_prompts, share_seeds) in zip(self.engines, shares, strict=True)
            if share_prompts
        ]
        return [completion for result in ray.get(futures) for completion in result]

    def refit(self, policy: WeightSource) -> int:
        """Load the policy's current weights into every engine, bucket by bucket from the policy workers
        (``weight_sync``: nothing passes through the driver); returns the number of tensors sent."""
        return self.weight_sync.refit(policy)

    def wake_up(self) -> None:
        ray.get([engine.wake_up.remote() for engine in self.engines])

    def sleep(self) -> None:
        ray.get([engine.sleep.remote() for engine in self.engines])

    def shutdown(self) -> None:
        try:
            ray.get([engine.shutdown.remote() for engine in self.engines])
        finally:
            for engine in self.engines:
                ray.kill(engine)
            self.engines = []
