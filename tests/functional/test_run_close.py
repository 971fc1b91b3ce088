"""A run whose set-up fails part-way stops what it had started: no worker or reservation outlives the error.

The engines, launched beside the policy, are made to fail after the policy's
Megatron workers (and the KL reference they hold) are up, the way a bad generator setting only detected
when vLLM starts does. ``run_and_close`` never gets a run object to close, so
the run itself must have stopped the workers and released the placement
group before the error reached the caller, while the caller still holds the
error (and with it every frame of the failed constructor).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.helpers import local_ray

pytestmark = pytest.mark.functional

ROOT = Path(__file__).resolve().parents[2]
GRPO = ROOT / "examples" / "configs" / "grpo_math.yaml"


def test_a_run_failing_after_its_workers_started_leaves_none_running(tmp_path):
    import ray
    from ray.exceptions import RayActorError
    from ray.util import placement_group_table

    from nemo_rl.algorithms.grpo import GRPORun
    from nemo_rl.algorithms.run_setup import run_and_close
    from nemo_rl.config.loader import load_config, resolve_config
    from nemo_rl.config.schema import validate_grpo_config

    resolved = resolve_config(
        load_config(
            GRPO,
            [
                f"logger.log_dir={tmp_path / 'logs'}",
                f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
                "logger.tensorboard_enabled=false",
            ],
        )
    )
    policy_workers, engines = [], []
    policy_up = threading.Event()

    class EnginesFailToStart(GRPORun):
        def start_policy(self):
            policy = super().start_policy()  # in a thread of its own, while the engines are awaited
            policy_workers.extend(policy.worker_group.workers)
            policy_up.set()
            return policy

        def start_generation(self, policy_cfg):
            generation = super().start_generation(policy_cfg)  # real engines, launched beside the policy

            def engines_fail_while_the_policy_runs() -> None:
                engines.extend(generation.engines)
                assert policy_up.wait(timeout=600)  # its workers up and running
                raise RuntimeError("the vLLM engines failed to start")

            generation.wait_until_started = engines_fail_while_the_policy_runs
            return generation

    with local_ray(2, tmp_path / "mcore"):
        with pytest.raises(RuntimeError, match="the vLLM engines failed to start"):
            run_and_close(EnginesFailToStart, validate_grpo_config(resolved), resolved)
        assert policy_workers and engines
        for worker in policy_workers + engines:  # the test's own handles would keep them alive; only the run stops them
            with pytest.raises(RayActorError):
                ray.get(worker.__ray_ready__.remote(), timeout=120)
        assert {group["state"] for group in placement_group_table().values()} == {"REMOVED"}
