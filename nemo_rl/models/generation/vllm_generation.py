"""The driver's handle on the vLLM engines of an RL run: placement, data-parallel rollouts, refit, sleep/wake.

One engine per bundle of its cluster, or per ``tensor_parallel_size`` bundles
with vLLM tensor parallelism (TP inside a node, engines data parallel).
Colocated, the engines share the policy's bundles (each actor reserves half of
a bundle, see ``RayVirtualCluster.actor_options``) and, where vLLM supports it
(the CUDA build), sleep during training so the trainer gets the accelerator
memory back. Otherwise they run on bundles of their own, each holding an
engine's ``tensor_parallel_size`` devices. Rollouts are split over the engines
in contiguous shares; every request carries its own seed, so results do not
depend on the number of engines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import ray
from ray.exceptions import RayActorError

from nemo_rl.distributed.actor_roster import ActorRoster, kill
from nemo_rl.distributed.sharding import split_evenly
from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
from nemo_rl.distributed.worker_group import wait_until_ready
from nemo_rl.models.generation.interfaces import GenerationInterface
from nemo_rl.models.generation.vllm_worker import Completion, VllmGenerationWorker
from nemo_rl.models.generation.weight_sync import MIB, WeightSource, WeightSync
from nemo_rl.models.generation.weight_transports import resolve_transport
from nemo_rl.utils.errors import ConfigError

logger = logging.getLogger(__name__)


class VllmGeneration:
    def __init__(self, cluster: RayVirtualCluster, policy_cfg, model_path: str, seed: int):
        gen = policy_cfg.generation
        self.cfg = gen
        colocated = gen.colocated.enabled
        sleep_mode = colocated and cluster.use_gpus
        placements = engine_placements(cluster, engine_tensor_parallel_size(gen.vllm_kwargs), colocated)
        transport = resolve_transport(
            gen.refit_transport, cuda=cluster.use_gpus, colocated=colocated, engines=len(placements)
        )
        actor = ray.remote(VllmGenerationWorker)
        self.engines = [
            actor.options(**cluster.actor_options(bundle)).remote(
                policy_cfg,
                model_path,
                dict(gen.vllm_kwargs),
                seed=seed + rank,
                sleep_mode=sleep_mode,
                cpu_slot=slot,
            )
            for rank, (bundle, slot) in enumerate(placements)
        ]
        self.weight_sync = WeightSync(self.engines, gen.refit_bucket_mib * MIB, transport)
        self.roster: ActorRoster | None = None  # once the engines are up
        self._placement_note = (
            f"{len(self.engines)} vLLM engine(s) {'colocated with the policy' if colocated else 'on their own bundles'}"
            f", refit over {transport}"
        )

    def wait_until_started(self) -> None:
        """Return once every engine is up; the constructor only launches them, so the caller can start the policy
        workers while the engines import vLLM and load. An engine's constructor error surfaces here."""
        wait_until_ready(self.engines)
        self.roster = ActorRoster("vLLM engine", self.engines)
        logger.info(self._placement_note)

    def generate(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], greedy: bool = False
    ) -> list[Completion]:
        """One completion per prompt with the run's sampling settings (``greedy`` for validation)."""
        gen = self.cfg
        return self._on_shares(
            lambda engine, share_prompts, share_seeds: engine.generate.remote(
                share_prompts,
                gen.max_new_tokens,
                temperature=0.0 if greedy else gen.temperature,
                top_p=1.0 if greedy else gen.top_p,
                stop_strings=gen.stop_strings,
                seeds=share_seeds,
            ),
            prompts,
            seeds,
        )

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token t | tokens < t) for t >= 1 of each prompt, from the engines' current weights."""
        return self._on_shares(lambda engine, share: engine.prompt_logprobs.remote(share), prompts)

    def _on_shares(self, call: Callable[..., ray.ObjectRef], *columns: Sequence) -> list:
        """``call(engine, *shares)`` on each engine's contiguous share of the ``columns`` (prompts first, then
        one value per prompt), results concatenated in prompt order; an engine without prompts is not called."""
        shares = zip(*(split_evenly(column, len(self.engines)) for column in columns), strict=True)
        calls = [
            (rank, call(engine, *map(list, share)))
            for rank, (engine, share) in enumerate(zip(self.engines, shares, strict=True))
            if share[0]
        ]
        results = self._get([ref for _, ref in calls], [rank for rank, _ in calls])
        return [item for result in results for item in result]

    def _get(self, refs: list[ray.ObjectRef], ranks: list[int] | None = None) -> list:
        assert self.roster is not None, "wait_until_started() first"
        return self.roster.get(refs, ranks)

    def refit(self, policy: WeightSource) -> int:
        """Load the policy's current weights into every engine, bucket by bucket from the policy workers
        (``weight_sync``: nothing passes through the driver); returns the number of tensors sent."""
        assert self.roster is not None, "wait_until_started() first"
        try:
            return self.weight_sync.refit(policy)
        except RayActorError as err:  # an engine (or a policy worker) died while the weights moved
            raise self.roster.explain(err) or err from None

    def wake_up(self) -> None:
        self._get([engine.wake_up.remote() for engine in self.engines])

    def sleep(self) -> None:
        self._get([engine.sleep.remote() for engine in self.engines])

    def shutdown(self) -> None:
        """Engines that never finished starting are killed at once (waiting would mean waiting out their start)."""
        if self.roster is None:
            kill(self.engines)
        else:
            self.roster.shutdown()
        self.engines = []


def engine_tensor_parallel_size(vllm_kwargs) -> int:
    return int(vllm_kwargs.get("tensor_parallel_size", 1))


def engine_placements(cluster: RayVirtualCluster, tp: int, colocated: bool) -> list[tuple[int, tuple[int, int]]]:
    """(bundle, (index among the node's engines, engines on the node)) of every engine.

    On bundles of its own an engine's bundle already holds its ``tp`` devices.
    Colocated, an engine's TP ranks are the processes of ``tp`` consecutive
    policy bundles, which a Ray actor cannot span on GPUs (it sees its own
    bundle's GPU only), so that combination is refused; on CPU the engine's
    processes share the node's cores (``cpu_slot``).
    """
    if not colocated or tp == 1:
        per_node = cluster.workers_per_node
        return [(rank, (rank % per_node, per_node)) for rank in range(cluster.world_size)]
    if cluster.use_gpus:
        raise ConfigError(
            f"policy.generation.vllm_kwargs.tensor_parallel_size: {tp} with colocated.enabled=true on GPUs; a "
            f"colocated engine would span {tp} of the policy's one-GPU bundles, which this version does not "
            "place; set policy.generation.colocated.enabled=false with resources of their own (bundles of "
            f"{tp} GPUs per engine) or tensor_parallel_size=1"
        )
    per_node = cluster.workers_per_node // tp
    return [(rank * tp, (rank % per_node, per_node)) for rank in range(cluster.world_size // tp)]


if TYPE_CHECKING:  # basedpyright holds VllmGeneration to the contract the rollout algorithms use
    _conforms: type[GenerationInterface] = VllmGeneration
