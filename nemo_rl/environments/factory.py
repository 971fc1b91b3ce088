"""The environment a recipe's ``env`` block configures, so the rollout loops import no environment themselves."""

from __future__ import annotations

from nemo_rl.config.schema import EnvConfig
from nemo_rl.environments.interfaces import EnvironmentInterface
from nemo_rl.environments.math_environment import MathEnvironmentPool


def make_environment(env_cfg: EnvConfig) -> EnvironmentInterface:
    """Start the configured environment's workers (math answer verification: ``env.math``); Ray must be running."""
    return MathEnvironmentPool(env_cfg.math.num_workers, env_cfg.math.format_reward_weight)
