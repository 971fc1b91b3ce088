"""Opening and closing a run: its directory (resolved config, long-context receipt, metrics log), and
releasing its workers, engines and cluster however it ends."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from transformers import AutoConfig

from nemo_rl.config.loader import save_config
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.models.long_context import run_receipt, write_receipt
from nemo_rl.rope.base_model import base_model_rope_errors
from nemo_rl.rope.canonical import canonical_overrides_json
from nemo_rl.utils.errors import ConfigError
from nemo_rl.utils.logger import Logger

if TYPE_CHECKING:
    from nemo_rl.algorithms.run_loop import RunLoop

logger = logging.getLogger(__name__)

ResultT = TypeVar("ResultT")


def resolve_policy_model(policy_cfg, model_name: str | None = None, field: str = "policy.model_name") -> Path:
    """The local HF directory of the policy's model (or ``model_name``, e.g. a teacher run with the policy's RoPE).

    Refused before anything starts when the run's RoPE block would replace the
    RoPE scaling the model's config.json ships, or when the Megatron backend
    cannot build the model's own RoPE (see ``base_model_rope_errors``).
    """
    name = model_name or policy_cfg.model_name
    path = resolve_model_path(name)
    errors = base_model_rope_errors(
        AutoConfig.from_pretrained(path),
        f"{field} ({name})",
        policy_cfg.hf_config_overrides,
        policy_cfg.max_total_sequence_length,
        megatron_enabled=policy_cfg.megatron_cfg.enabled and not policy_cfg.dtensor_cfg.enabled,
    )
    if errors:
        raise ConfigError(errors)
    return path


def open_run_log(cfg, resolved_config: Mapping[str, Any], engines: list[str]) -> Logger:
    """The run directory: resolved config, long-context receipt (which RoPE each engine uses) and the metrics log."""
    log_dir = Path(cfg.logger.log_dir)
    save_config(resolved_config, log_dir / "config.yaml")
    yarn = cfg.policy.long_context
    if yarn is not None:
        block = json.loads(canonical_overrides_json(cfg.policy.effective_hf_config_overrides))
        receipt = run_receipt(yarn, block["rope_scaling"], cfg.policy.max_total_sequence_length, engines)
        logger.info("Long-context receipt: %s", write_receipt(receipt, log_dir))
    return Logger(
        log_dir,
        tensorboard=cfg.logger.tensorboard_enabled,
        wandb_cfg=cfg.logger.wandb.model_dump() if cfg.logger.wandb_enabled else None,
        run_config=resolved_config,
    )


def run_and_close(run_cls: type[RunLoop[ResultT]], cfg, resolved_config: dict[str, Any]) -> ResultT:
    """``run_cls(cfg, resolved).train()``, releasing its workers, engines and cluster however the run ends.

    A constructor that fails part-way has already stopped what it started (``RunLoop.started``), so only a
    constructed run is closed here.
    """
    run = run_cls(cfg, resolved_config)
    try:
        return run.train()
    finally:
        run.close()
