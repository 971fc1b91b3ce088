"""Supervised fine-tuning on the Megatron policy, driven from one process.

The driver owns data, metrics, checkpoints and the loop; the workers own the
model. Everything here runs after the config was validated, so a bad recipe
fails before Ray starts or any directory is created.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.data.builtin_assets import resolve_dataset_paths, resolve_model_path
from nemo_rl.data.dataloader import ResumableDataloader
from nemo_rl.data.sft_dataset import collate, load_sft_dataset
from nemo_rl.distributed.ray_init import init_ray
from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
from nemo_rl.models.policy.lm_policy import Policy
from nemo_rl.utils.checkpoint import CheckpointManager, restore_training_state, save_training_state
from nemo_rl.utils.logger import open_run_log

logger = logging.getLogger(__name__)


@dataclass
class SFTResult:
    final_step: int
    last_train_loss: float
    last_val_loss: float | None
    converted_checkpoint: Path | None  # None on the DTensor backend (it trains the HF model directly)
    hf_export: Path | None


class SFTRun:
    """Everything one SFT run needs, set up in the order that keeps failures cheap."""

    def __init__(self, cfg, resolved_config: dict[str, Any]):
        self.cfg = cfg
        pcfg = cfg.policy
        self.model_path = resolve_model_path(pcfg.model_name)
        self.tokenizer_path = resolve_model_path(pcfg.tokenizer.name)
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        train_path, self.val_path = resolve_dataset_paths(
            cfg.data.dataset_name, cfg.data.train_data_path, cfg.data.val_data_path
        )
        self.train_data = load_sft_dataset(train_path, self.tokenizer, pcfg.max_total_sequence_length)
        self.val_data = (
            load_sft_dataset(self.val_path, self.tokenizer, pcfg.max_total_sequence_length) if self.val_path else None
        )
        self.train_loader = ResumableDataloader(
            self.train_data, pcfg.train_global_batch_size, cfg.data.shuffle, cfg.sft.seed
        )

        self.log_dir = Path(cfg.logger.log_dir)
        self.metrics = open_run_log(cfg, resolved_config, ["megatron"])
        self.checkpoints = CheckpointManager(Path(cfg.checkpointing.checkpoint_dir), cfg.checkpointing.keep_top_k)

        init_ray(workers=cfg.cluster.gpus_per_node * cfg.cluster.num_nodes)
        self.cluster = RayVirtualCluster(cfg.cluster.gpus_per_node, cfg.cluster.num_nodes)
        self.policy = Policy(self.cluster, pcfg, self.model_path, seed=cfg.sft.seed)
        if self.policy.checkpoint_dir is not None:
            cache_note = "converted now" if self.policy.converted_now else "reused from cache"
            logger.info("Megatron checkpoint %s (%s)", self.policy.checkpoint_dir, cache_note)

    # ------------------------------------------------------------------
    def _collate(self, samples) -> dict:
        return collate(samples, self.tokenizer.pad_token_id, self.cfg.policy.make_sequence_length_divisible_by)

    def _train_step(self, samples) -> dict[str, float]:
        start = time.perf_counter()
        batch = self._collate(samples)
        result = self.policy.train(batch, NLLLoss(), self.cfg.policy.train_micro_batch_size)
        elapsed = time.perf_counter() - start
        m = result["metrics"]
        layout = {"packing_efficiency": m["packing_efficiency"]} if "packing_efficiency" in m else {}
        return layout | {
            "loss": m["nll_sum"] / max(m["num_tokens"], 1),
            "grad_norm": result["grad_norm"],
            "lr": result["lr"],
            "num_loss_tokens": m["num_tokens"],
            "sequence_length": batch["input_ids"].shape[1],
            "max_input_length": int(batch["input_lengths"].max()),
            "step_time_s": elapsed,
            "tokens_per_s": float(batch["input_lengths"].sum()) / elapsed,
        }

    def validate(self) -> float | None:
        if self.val_data is None:
            return None
        scfg = self.cfg.sft
        loader = ResumableDataloader(self.val_data, scfg.val_global_batch_size, shuffle=False, seed=scfg.seed)
        nll, tokens = 0.0, 0.0
        for _ in range(scfg.val_batches):
            batch = self._collate(loader.next_batch())
            out = self.policy.evaluate(batch, NLLLoss(), scfg.val_micro_batch_size)
            nll += out["metrics"]["nll_sum"]
            tokens += out["metrics"]["num_tokens"]
            if loader.epoch > 0:
                break
        return nll / max(tokens, 1)

    def save(self, step: int) -> Path:
        return save_training_state(self.checkpoints, step, self.policy, self.tokenizer, self.train_loader)

    def resume(self) -> int:
        return restore_training_state(self.checkpoints, self.policy, self.train_loader, self.metrics)

    def train(self) -> SFTResult:
        scfg, ccfg = self.cfg.sft, self.cfg.checkpointing
        step = self.resume() if ccfg.enabled else 0
        last_loss, val_loss = float("nan"), None
        if scfg.val_at_start and step == 0:
            val_loss = self.validate()
            self.metrics.log({"loss": val_loss}, step, "validation")
        with tqdm(total=scfg.max_num_steps, initial=step, desc="sft", dynamic_ncols=True) as bar:
            while step < scfg.max_num_steps and self.train_loader.epoch < scfg.max_num_epochs:
                metrics = self._train_step(self.train_loader.next_batch())
                step += 1
                last_loss = metrics["loss"]
                self.metrics.log(metrics, step, "train")
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{metrics['lr']:.2e}")
                if scfg.val_period and step % scfg.val_period == 0:
                    val_loss = self.validate()
                    self.metrics.log({"loss": val_loss}, step, "validation")
                    bar.write(f"step {step}: validation loss {val_loss:.4f}")
                if ccfg.enabled and (step % ccfg.save_period == 0 or step == scfg.max_num_steps):
                    bar.write(f"step {step}: checkpoint {self.save(step)}")
        export = None
        if scfg.export_hf_dir:
            export = Path(scfg.export_hf_dir)
            self.policy.export_hf(export, self.model_path, self.tokenizer_path)
            logger.info("Exported the trained policy to %s", export)
            self._long_context_eval(export, step)
        return SFTResult(step, last_loss, val_loss, self.policy.checkpoint_dir, export)

    def _long_context_eval(self, export: Path, step: int) -> None:
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

    def close(self) -> None:
        self.metrics.close()
        self.policy.shutdown()
        self.cluster.shutdown()


def run_sft(cfg, resolved_config: dict[str, Any]) -> SFTResult:
    run = SFTRun(cfg, resolved_config)
    try:
        return run.train()
    finally:
        run.close()
