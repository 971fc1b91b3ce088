"""Direct preference optimization on (chosen, rejected) pairs, in the shared offline loop.

The reference policy is the starting weights, kept by the workers
(``Policy(init_reference_model=True)``) and scored before every update, so
nothing is doubled on the accelerator and the reference always sees the
same YaRN-extended model the policy started from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nemo_rl.algorithms.loss_functions import DPOLoss
from nemo_rl.algorithms.offline_training import OfflineResult, PreferenceRun
from nemo_rl.algorithms.run_setup import run_and_close


class DPORun(PreferenceRun):
    section = "dpo"
    policy_kwargs = {"init_reference_model": True}

    def loss_fn(self) -> DPOLoss:
        loop = self.loop
        return DPOLoss(loop.reference_policy_kl_penalty, loop.sft_loss_weight, loop.preference_average_log_probs)

    def scored_batch(self, pairs: Sequence, pair_micro_batch: int) -> dict:
        """The collated pairs with the reference policy's log-prob of every token."""
        batch = super().scored_batch(pairs, pair_micro_batch)
        batch["reference_logprobs"] = self.policy.get_logprobs(batch, 2 * pair_micro_batch, reference=True)
        return batch


def run_dpo(cfg, resolved_config: dict[str, Any]) -> OfflineResult:
    return run_and_close(DPORun, cfg, resolved_config)
