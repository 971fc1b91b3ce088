"""Reward modeling: a Bradley-Terry scalar head on the policy's transformer, trained on preference pairs.

The export is an HF ``*ForSequenceClassification`` directory (one label)
whose config carries the run's RoPE overrides, so the reward model scores
long sequences in transformers exactly as it did in training.
"""

from __future__ import annotations

from typing import Any

from nemo_rl.algorithms.loss_functions import BradleyTerryLoss
from nemo_rl.algorithms.offline_training import OfflineResult, PreferenceRun
from nemo_rl.algorithms.run_setup import run_and_close


class RMRun(PreferenceRun):
    section = "rm"
    policy_kwargs = {"reward_head": True}

    def loss_fn(self) -> BradleyTerryLoss:
        return BradleyTerryLoss()


def run_rm(cfg, resolved_config: dict[str, Any]) -> OfflineResult:
    return run_and_close(RMRun, cfg, resolved_config)
