"""Opening and closing a run: its directories (only its own: another config's run is refused), its log
directory's contents (resolved config, run identity, long-context receipt, metrics log), and releasing its
workers, engines and cluster however it ends."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from transformers import AutoConfig

from nemo_rl.config.loader import save_config
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.models.long_context import run_receipt, write_receipt
from nemo_rl.rope.base_model import base_model_rope_errors
from nemo_rl.rope.canonical import canonical_overrides_json
from nemo_rl.utils.checkpoint import IDENTITY_FILE, RESUME_SAFE_FIELDS, CheckpointManager, RunIdentity
from nemo_rl.utils.errors import ConfigError
from nemo_rl.utils.logger import METRICS_FILE, Logger

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


def claim_run_directories(cfg, resolved_config: Mapping[str, Any]) -> CheckpointManager:
    """The run's checkpoints, once neither its checkpoint nor its log directory holds a run of another config.

    Called before anything is written or started. Resuming another config's
    latest step would continue its weights under this config, and opening its
    log directory would overwrite its config and rewind (truncate) its
    metrics; so either is a ConfigError naming both config hashes, the
    directory, the fields that differ and the fix. Only the fields in
    ``RESUME_SAFE_FIELDS`` (``max_num_steps`` among them) may change between
    a run and its resume.
    """
    identity = RunIdentity.of(resolved_config)
    checkpoints = CheckpointManager(Path(cfg.checkpointing.checkpoint_dir), cfg.checkpointing.keep_top_k, identity)
    errors = [_foreign_run_error(run, identity) for run in _recorded_runs(cfg, checkpoints) if run.identity != identity]
    if errors:
        raise ConfigError(errors)
    return checkpoints


class _RecordedRun(NamedTuple):
    key: str  # the config key of the directory
    directory: Path
    record_dir: Path  # where its identity is recorded
    identity: RunIdentity
    harm: str  # what starting this run there would do to it


def _recorded_runs(cfg, checkpoints: CheckpointManager) -> Iterator[_RecordedRun]:
    """The runs the checkpoint and log directories hold something of (a step to resume, logged metrics) and
    recorded the identity of; a directory of a run from before records existed cannot be told apart."""
    latest = checkpoints.latest() if cfg.checkpointing.enabled else None  # a run without checkpoints never resumes
    if latest is not None and (recorded := RunIdentity.read(latest)) is not None:
        harm = "Resuming its latest step would continue that run's weights under this config."
        yield _RecordedRun("checkpointing.checkpoint_dir", checkpoints.root, latest, recorded, harm)
    log_dir = Path(cfg.logger.log_dir)
    metrics = log_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0 and (recorded := RunIdentity.read(log_dir)) is not None:
        harm = f"Opening it would overwrite that run's config.yaml and rewind its {METRICS_FILE}."
        yield _RecordedRun("logger.log_dir", log_dir, log_dir, recorded, harm)


_MAX_DIFFERENCES = 20  # a run of a wholly different recipe differs everywhere; the first fields tell enough


def _foreign_run_error(run: _RecordedRun, identity: RunIdentity) -> str:
    differences = identity.differences(run.identity)
    if len(differences) > _MAX_DIFFERENCES:
        differences = [*differences[:_MAX_DIFFERENCES], f"... and {len(differences) - _MAX_DIFFERENCES} more"]
    return "\n".join(
        [
            f"{run.key}: {run.directory} holds a run of another config: config hash {run.identity.hash} (recorded "
            f"in {run.record_dir / IDENTITY_FILE}), while this run's config hash is {identity.hash}. {run.harm} "
            "The fields that differ (recorded -> now):",
            *(f"    {line}" for line in differences),
            f"  Give this run a directory of its own ({run.key}=<new path>), or restore the recorded values to "
            f"resume that run. A resume may change only {', '.join(RESUME_SAFE_FIELDS)} (* is the algorithm's "
            "section).",
        ]
    )


def open_run_log(cfg, resolved_config: Mapping[str, Any], engines: list[str]) -> Logger:
    """The run directory: resolved config, the run's identity (what ``claim_run_directories`` compares), long-context
    receipt (which RoPE each engine uses) and the metrics log."""
    log_dir = Path(cfg.logger.log_dir)
    save_config(resolved_config, log_dir / "config.yaml")
    RunIdentity.of(resolved_config).write(log_dir)
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
