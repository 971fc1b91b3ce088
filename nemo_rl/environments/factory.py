"""The environment a recipe's ``env`` block configures, so the rollout loops import no environment themselves."""

from __future__ import annotations

from nemo_rl.config.schema import EnvConfig
from nemo_rl.environments.interfaces import EnvironmentInterface
from nemo_rl.environments.math_environment import MathEnvironmentPool


def make_environment(env_cfg: EnvConfig) -> EnvironmentInterface:
    """Start the configured environment's workers (math answer verification: ``env.math``); Ray must be running."""
    math = env_cfg.math
    return MathEnvironmentPool(math.num_workers, math.verify_timeout_s, math.format_reward_weight)
