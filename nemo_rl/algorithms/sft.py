"""Supervised fine-tuning in the shared offline loop: next-token NLL on assistant tokens (chat rows), or on
every token of documents (``data.format: document``: continued pre-training, e.g. for context extension)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.algorithms.offline_training import OfflineResult, OfflineRun, step_metrics
from nemo_rl.algorithms.run_setup import run_and_close
from nemo_rl.config.schema import SYNTHETIC_RETRIEVAL
from nemo_rl.data.builtin_datasets import resolve_dataset_paths
from nemo_rl.data.dataloader import ResumableDataloader
from nemo_rl.data.document_dataset import BlendSource, DocumentLoader
from nemo_rl.data.sft_dataset import collate, load_sft_dataset
from nemo_rl.models.policy.loss_metrics import logged_metrics
from nemo_rl.utils.cache_paths import nemo_rl_cache_dir

logger = logging.getLogger(__name__)

COMPARISON_FILE = "long_context_before_after.json"


class SFTRun(OfflineRun):
    """Chat SFT (loss on assistant turns) or, with ``data.format: document``, continued pre-training on documents."""

    section = "sft"

    def prepare(self) -> ResumableDataloader:
        """The offline loop's data and checks, and the long-context evaluation's own file read now: a bad row
        there must fail before training, not after it."""
        loader = super().prepare()
        eval_cfg = self.cfg.long_context_eval
        if eval_cfg is not None and eval_cfg.enabled and eval_cfg.data_path:
            from nemo_rl.evals.perplexity import read_documents

            read_documents(Path(eval_cfg.data_path), self.tokenizer)
        return loader

    def load_dataset(self, path: Path, split: str) -> Sequence:
        data, max_len = self.cfg.data, self.cfg.policy.max_total_sequence_length
        if data.format == "chat":
            return load_sft_dataset(path, self.tokenizer, max_len)
        return document_dataset(self._documents, data, path, split, max_len, self.loop.seed)

    @cached_property
    def _documents(self) -> DocumentLoader:
        """One loader for both splits and every blend source, so each file is tokenized once."""
        return document_loader(self.cfg.data, self.tokenizer)

    def _collate(self, samples) -> dict:
        return collate(samples, self.tokenizer.pad_token_id, self.cfg.policy.make_sequence_length_divisible_by)

    def update(self, samples: Sequence) -> dict[str, float]:
        batch = self._collate(samples)
        result = self.policy.train(batch, NLLLoss(), self.cfg.policy.train_micro_batch_size)
        return logged_metrics(result["metrics"], NLLLoss()) | step_metrics(result, batch)

    def validation_sums(self, samples: Sequence) -> dict[str, float]:
        return self.policy.evaluate(self._collate(samples), NLLLoss(), self.loop.val_micro_batch_size)["metrics"]

    def validation_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": logged_metrics(sums, NLLLoss())["loss"]}

    def after_export(self, export: Path, step: int) -> None:
        """The scheduled evaluation, on the exported model (its config.json carries the RoPE block).

        With ``compare_with_base`` the starting model is evaluated too, as it
        ships and with the run's RoPE overrides but no training: the first
        column shows the base failing beyond its window, the second what the
        RoPE change alone does, the third what fine-tuning added.
        """
        eval_cfg = self.cfg.long_context_eval
        if eval_cfg is None or not eval_cfg.enabled:
            return
        from nemo_rl.evals.long_context import compare_table, format_table, run_long_context_eval

        max_len = self.cfg.policy.max_total_sequence_length
        report = run_long_context_eval(export, None, max_len, eval_cfg, self.log_dir, default_data=self.val_path)
        # perplexity@L, passkey@L/depthD, passkey@L (mean over depths), ruler/{task}@L
        self.metrics.log(report.metrics(), step, "long_context_eval")
        logger.info("Long-context evaluation (%s):\n%s", report.report_path, format_table(report))
        if not eval_cfg.compare_with_base:
            return
        stages = {}
        for name, overrides in (("base", None), ("base_extended", self.cfg.policy.effective_hf_config_overrides)):
            stages[name] = run_long_context_eval(
                self.model_path, overrides, max_len, eval_cfg, self.log_dir / name, default_data=self.val_path
            )
            self.metrics.log(stages[name].metrics(), step, f"long_context_eval/{name}")
        stages["fine_tuned"] = report
        table = compare_table(stages)
        (self.log_dir / COMPARISON_FILE).write_text(
            json.dumps({name: r.metrics() for name, r in stages.items()}, indent=2, allow_nan=True)
        )
        print(f"\nLong context before and after ({self.log_dir / COMPARISON_FILE}):\n{table}\n", flush=True)


def document_loader(data_cfg, tokenizer) -> DocumentLoader:
    """The run's document tokenizer, caching its work under the nemo_rl cache."""
    return DocumentLoader(tokenizer, data_cfg.input_key, data_cfg.add_eos, nemo_rl_cache_dir() / "tokenized")


def document_dataset(loader: DocumentLoader, data_cfg, path: Path, split: str, max_len: int, seed: int) -> Sequence:
    """A split's document chunks; the training split also draws the blend's sources (``data.blend``)."""
    if split == "train" and data_cfg.blend:
        return loader.blend(path, max_len, blend_sources(data_cfg.blend, max_len), seed)
    return loader.chunks(path, max_len)


def blend_sources(blend, max_len: int) -> list[BlendSource]:
    """``data.blend`` entries resolved to files (a path, or a built-in's train split) or the synthetic generator."""
    sources = []
    for entry in blend:
        if entry.dataset_name == SYNTHETIC_RETRIEVAL:
            path = None
        else:
            path, _ = resolve_dataset_paths(entry.dataset_name, entry.data_path, None)
        sources.append(BlendSource(entry.dataset_name, entry.share, entry.max_document_tokens or max_len, path))
    return sources


def run_sft(cfg, resolved_config: dict[str, Any]) -> OfflineResult:
    return run_and_close(SFTRun, cfg, resolved_config)
