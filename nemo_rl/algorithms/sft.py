"""Supervised fine-tuning: next-token NLL on assistant tokens, in the shared offline loop."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.algorithms.offline_training import OfflineResult, OfflineRun, step_metrics
from nemo_rl.data.sft_dataset import SFTDataset, collate, load_sft_dataset
from nemo_rl.utils.entry import run_and_close

logger = logging.getLogger(__name__)


class SFTRun(OfflineRun):
    section = "sft"

    def load_dataset(self, path: Path) -> SFTDataset:
        return load_sft_dataset(path, self.tokenizer, self.cfg.policy.max_total_sequence_length)

    def _collate(self, samples) -> dict:
        return collate(samples, self.tokenizer.pad_token_id, self.cfg.policy.make_sequence_length_divisible_by)

    def train_step(self, samples: Sequence) -> dict[str, float]:
        batch = self._collate(samples)
        result = self.policy.train(batch, NLLLoss(), self.cfg.policy.train_micro_batch_size)
        m = result["metrics"]
        layout = {"packing_efficiency": m["packing_efficiency"]} if "packing_efficiency" in m else {}
        return (
            layout
            | {"loss": m["nll_sum"] / max(m["num_tokens"], 1), "num_loss_tokens": m["num_tokens"]}
            | step_metrics(result, batch)
        )

    def validation_sums(self, samples: Sequence) -> dict[str, float]:
        out = self.policy.evaluate(self._collate(samples), NLLLoss(), self.loop.val_micro_batch_size)
        return {"nll_sum": out["metrics"]["nll_sum"], "num_tokens": out["metrics"]["num_tokens"]}

    def validation_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["nll_sum"] / max(sums["num_tokens"], 1)}

    def after_export(self, export: Path, step: int) -> None:
        """The scheduled evaluation, on the exported model (its config.json carries the RoPE block)."""
        eval_cfg = self.cfg.long_context_eval
        if eval_cfg is None or not eval_cfg.enabled:
            return
        from nemo_rl.evals.long_context import format_table, run_long_context_eval

        perplexity, passkey, report = run_long_context_eval(
            export, None, self.cfg.policy.max_total_sequence_length, eval_cfg, self.log_dir, default_data=self.val_path
        )
        metrics = {f"perplexity@{p.length}": p.perplexity for p in perplexity}
        metrics |= {f"passkey@{p.length}/depth{p.depth:g}": p.accuracy for p in passkey}
        self.metrics.log(metrics, step, "long_context_eval")
        logger.info("Long-context evaluation (%s):\n%s", report, format_table(perplexity, passkey))


def run_sft(cfg, resolved_config: dict[str, Any]) -> OfflineResult:
    return run_and_close(SFTRun, cfg, resolved_config)
