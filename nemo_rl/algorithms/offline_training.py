"""The algorithms that train the policy on a fixed dataset: SFT, DPO and reward modeling.

They differ in their data, their loss and what validation reports; set-up
order, resume, validation and checkpoint cadence and progress are the run
loop's (``nemo_rl.algorithms.run_loop``), and what is offline-specific (the
policy on its own cluster, validation over a fixed number of batches, step
throughput, the final HF export) is written here once for all three.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from transformers import AutoTokenizer

from nemo_rl.algorithms.run_loop import RunLoop
from nemo_rl.algorithms.run_setup import resolve_policy_model
from nemo_rl.data.builtin_datasets import resolve_dataset_paths
from nemo_rl.data.dataloader import ResumableDataloader
from nemo_rl.data.preference_dataset import PreferenceDataset, collate_pairs, load_preference_dataset
from nemo_rl.distributed.ray_init import init_ray
from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.models.policy.interfaces import LossFunction
from nemo_rl.models.policy.lm_policy import Policy, layout_metrics
from nemo_rl.models.policy.loss_metrics import add_totals, logged_metrics

logger = logging.getLogger(__name__)


@dataclass
class OfflineResult:
    final_step: int
    last_train: dict[str, float]
    last_validation: dict[str, float] | None
    converted_checkpoint: Path | None  # None on the DTensor backend (it trains the HF model directly)
    hf_export: Path | None


class OfflineRun(RunLoop[OfflineResult]):
    """One run of an offline algorithm.

    Subclasses name their config section (``section``), load their data
    (``load_dataset``), take one optimizer step on a batch of samples
    (``update``) and evaluate their loss on a validation batch
    (``validation_sums``: the totals of its parts, which add up over batches;
    ``validation_metrics`` logs them). The data a
    subclass needs is ready before any of that: the tokenizer, the data files
    and the section's config.
    """

    policy_kwargs: ClassVar[dict[str, Any]] = {}  # e.g. a reference model (DPO) or the scalar head (reward model)

    def prepare(self) -> ResumableDataloader:
        cfg, pcfg = self.cfg, self.cfg.policy
        self.model_path = resolve_policy_model(pcfg)
        self.tokenizer_path = resolve_model_path(pcfg.tokenizer.name)
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        train_path, self.val_path = resolve_dataset_paths(
            cfg.data.dataset_name, cfg.data.train_data_path, cfg.data.val_data_path
        )
        self.train_data = self.load_dataset(train_path, "train")
        self.val_data = self.load_dataset(self.val_path, "validation") if self.val_path else None
        return ResumableDataloader(self.train_data, pcfg.train_global_batch_size, cfg.data.shuffle, self.loop.seed)

    def start_workers(self) -> None:
        cfg = self.cfg
        init_ray(workers=cfg.cluster.gpus_per_node * cfg.cluster.num_nodes)
        self.cluster = self.started(RayVirtualCluster(cfg.cluster.gpus_per_node, cfg.cluster.num_nodes))
        self.policy = self.started(
            Policy(
                self.cluster,
                cfg.policy,
                self.model_path,
                seed=self.loop.seed,
                rows_per_sample=cfg.rows_per_sample,
                **self.policy_kwargs,
            )
        )
        self.log_checkpoint_source()

    # ------------------------------------------------------------ per algorithm
    def load_dataset(self, path: Path, split: str) -> Sequence:
        raise NotImplementedError

    def update(self, samples: Sequence) -> dict[str, float]:
        """One optimizer step on ``samples``: its loss, ``lr``, ``input_tokens`` and whatever else it reports."""
        raise NotImplementedError

    def validation_sums(self, samples: Sequence) -> dict[str, float]:
        raise NotImplementedError

    def validation_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def after_export(self, export: Path, step: int) -> None:
        """Work scheduled on the exported model (SFT's long-context evaluation)."""

    # ------------------------------------------------------------- loop hooks
    def train_step(self, batch: list, step: int) -> dict[str, float]:
        """The step's metrics with its wall time and throughput over the sequences' real (unpadded) tokens."""
        start = time.perf_counter()
        metrics = self.update(batch)
        elapsed = time.perf_counter() - start
        return metrics | {"step_time_s": elapsed, "tokens_per_s": metrics["input_tokens"] / elapsed}

    def validate(self) -> dict[str, float] | None:
        """The validation metrics over ``val_batches`` batches (fewer if the split is smaller), or None without data."""
        if self.val_data is None:
            return None
        loader = ResumableDataloader(self.val_data, self.loop.val_global_batch_size, shuffle=False, seed=self.loop.seed)
        batches = []
        for _ in range(self.loop.val_batches):
            batches.append(self.validation_sums(loader.next_batch()))
            if loader.epoch > 0:
                break
        return self.validation_metrics(add_totals(batches))

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}"}

    def finish(
        self, step: int, last_train: dict[str, float], last_validation: dict[str, float] | None
    ) -> OfflineResult:
        """The HF export (and the work scheduled on it) when ``export_hf_dir`` is set."""
        export = None
        if self.loop.export_hf_dir:
            export = Path(self.loop.export_hf_dir)
            self.policy.export_hf(export, self.model_path, self.tokenizer_path)
            logger.info("Exported the trained policy to %s", export)
            self.after_export(export, step)
        return OfflineResult(step, last_train, last_validation, self.policy.checkpoint_dir, export)


class PreferenceRun(OfflineRun):
    """An offline run on (chosen, rejected) pairs (DPO, reward modeling); batch sizes count pairs.

    ``loss_fn`` and ``scored_batch`` are all a subclass adds; the loss declares
    what is logged (its means per pair), in training and validation alike.
    """

    def load_dataset(self, path: Path, split: str) -> PreferenceDataset:
        return load_preference_dataset(path, self.tokenizer, self.cfg.policy.max_total_sequence_length)

    def loss_fn(self) -> LossFunction:
        raise NotImplementedError

    def scored_batch(self, pairs: Sequence, pair_micro_batch: int) -> dict:
        """The collated pairs plus whatever per-token fields the loss needs."""
        return collate_pairs(pairs, self.tokenizer.pad_token_id, self.cfg.policy.make_sequence_length_divisible_by)

    def update(self, samples: Sequence) -> dict[str, float]:
        micro, loss_fn = self.cfg.policy.train_micro_batch_size, self.loss_fn()
        batch = self.scored_batch(samples, micro)
        result = self.policy.train(batch, loss_fn, 2 * micro)  # two rows per pair
        return logged_metrics(result["metrics"], loss_fn) | step_metrics(result, batch)

    def validation_sums(self, samples: Sequence) -> dict[str, float]:
        micro = self.loop.val_micro_batch_size
        return self.policy.evaluate(self.scored_batch(samples, micro), self.loss_fn(), 2 * micro)["metrics"]

    def validation_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return logged_metrics(sums, self.loss_fn())


def step_metrics(result: dict[str, Any], batch: dict) -> dict[str, float]:
    """What every training step reports besides its loss: the update, the batch's shape and its micro-batch
    layout (``layout_metrics``)."""
    return layout_metrics(result) | {
        "grad_norm": result["grad_norm"],
        "lr": result["lr"],
        "sequence_length": batch["input_ids"].shape[1],
        "max_input_length": int(batch["input_lengths"].max()),
        "input_tokens": int(batch["input_lengths"].sum()),
    }


def summary(name: str, result: OfflineResult, cfg, reported: Sequence[str]) -> str:
    """What an entry script prints at the end: the ``reported`` metrics and where the outputs are."""

    def line(metrics: dict[str, float]) -> str:
        return ", ".join(f"{key} {metrics[key]:.4f}" for key in reported if key in metrics)

    text = f"{name} finished at step {result.final_step}: train {line(result.last_train)}"
    if result.last_validation:
        text += f"; validation {line(result.last_validation)}"
    if result.converted_checkpoint:
        text += f"\n  converted Megatron checkpoint: {result.converted_checkpoint}"
    text += f"\n  logs and metrics: {cfg.logger.log_dir}"
    if cfg.checkpointing.enabled:
        text += f"\n  checkpoints: {cfg.checkpointing.checkpoint_dir}"
    if result.hf_export:
        text += f"\n  HF export: {result.hf_export}"
    return text
