"""A run refuses checkpoint and log directories that hold a run of another config, before it writes anything;
the same run (or one that only trains longer) resumes there."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from nemo_rl.algorithms.run_loop import RunLoop
from nemo_rl.algorithms.run_setup import claim_run_directories, open_run_log
from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import validate_sft_config
from nemo_rl.data.dataloader import ResumableDataloader
from nemo_rl.utils.checkpoint import IDENTITY_FILE, RESUME_SAFE_FIELDS, CheckpointManager, RunIdentity
from nemo_rl.utils.errors import ConfigError
from nemo_rl.utils.logger import read_metrics

SFT_YAML = Path(__file__).resolve().parents[2] / "examples" / "configs" / "sft.yaml"
LR = "policy.megatron_cfg.optimizer.lr"  # 3.0e-3 in sft.yaml


def _resolved(run_dir: Path, *overrides: str) -> dict:
    """The resolved SFT config of a run writing under ``run_dir``."""
    dirs = [f"logger.log_dir={run_dir / 'logs'}", f"checkpointing.checkpoint_dir={run_dir / 'ckpt'}"]
    return resolve_config(load_config(SFT_YAML, [*dirs, "logger.tensorboard_enabled=false", *overrides]))


def _config(run_dir: Path, *overrides: str):
    """The typed and the resolved config, as an entry script passes them to the run."""
    resolved = _resolved(run_dir, *overrides)
    return validate_sft_config(resolved), resolved


def _previous_run(run_dir: Path, *overrides: str, steps: int = 2) -> None:
    """What a run of ``overrides`` leaves behind: its log directory, metrics and a checkpoint."""
    cfg, resolved = _config(run_dir, *overrides)
    checkpoints = claim_run_directories(cfg, resolved)
    log = open_run_log(cfg, resolved, ["megatron"])
    for step in range(1, steps + 1):
        log.log({"loss": 1.0 / step}, step, "train")
    log.close()
    tmp = checkpoints.begin(steps)
    (tmp / "policy.pt").write_bytes(b"weights")
    checkpoints.commit(tmp, steps, {"step": steps})


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------
# the identity
# ----------------------------------------------------------------------------
def test_the_identity_ignores_only_what_a_resume_may_change(tmp_path):
    base = RunIdentity.of(_config(tmp_path)[1])
    for override in (
        "sft.max_num_steps=60",  # lr_decay_iters follows it: ${sft.max_num_steps}
        "sft.max_num_epochs=3",
        "sft.val_period=5",
        "sft.val_at_start=true",
        "sft.export_hf_dir=null",
        "policy.megatron_cfg.force_reconvert_from_hf=true",
        "checkpointing.keep_top_k=1",
        "checkpointing.save_period=1",
        "checkpointing.enabled=false",
        "logger.wandb_enabled=true",
        "logger.wandb.name=second-try",
        "logger.monitor_gpus=true",
    ):
        assert RunIdentity.of(_config(tmp_path, override)[1]) == base, override
    assert RunIdentity.of(_config(tmp_path / "moved")[1]) == base, "a moved run is the same run"
    for override in (f"{LR}=1e-3", "sft.seed=1", "data.dataset_name=other", "policy.train_micro_batch_size=2"):
        other = RunIdentity.of(_config(tmp_path, override)[1])
        assert other != base and other.hash != base.hash, override
    assert len(base.hash) == 16 and int(base.hash, 16) >= 0


def test_differences_name_each_field_with_both_values(tmp_path):
    recorded = RunIdentity.of(_resolved(tmp_path))
    now = RunIdentity.of(_resolved(tmp_path, f"{LR}=1e-3", "+data.extra_key=1", "~data.val_data_path"))
    assert now.differences(recorded) == [
        "data.extra_key: (absent) -> 1",
        "data.val_data_path: null -> (absent)",
        f"{LR}: 0.003 -> 0.001",
    ]
    assert recorded.differences(recorded) == []
    # compared as JSON, types included: equal exactly when the hashes are, and never unequal without a field
    as_float, as_int = (
        RunIdentity.of({"policy": {"max_grad_norm": 1.0}}),
        RunIdentity.of({"policy": {"max_grad_norm": 1}}),
    )
    assert as_float != as_int and as_int.differences(as_float) == ["policy.max_grad_norm: 1.0 -> 1"]


def test_a_record_reads_back_as_the_identity_it_was(tmp_path):
    identity = RunIdentity.of(_config(tmp_path)[1])
    path = identity.write(tmp_path)
    assert path == tmp_path / IDENTITY_FILE
    assert json.loads(path.read_text())["config_hash"] == identity.hash
    assert RunIdentity.read(tmp_path) == identity
    assert RunIdentity.read(tmp_path / "nowhere") is None


# ----------------------------------------------------------------------------
# claiming the run's directories
# ----------------------------------------------------------------------------
def test_another_configs_run_is_refused_before_anything_is_written(tmp_path):
    _previous_run(tmp_path)
    before = _snapshot(tmp_path)
    recorded = RunIdentity.of(_config(tmp_path)[1]).hash
    cfg, resolved = _config(tmp_path, f"{LR}=1e-3")
    with pytest.raises(ConfigError) as info:
        claim_run_directories(cfg, resolved)
    checkpoint_error, log_error = info.value.messages
    now = RunIdentity.of(resolved).hash
    assert recorded != now
    for error, key, directory in (
        (checkpoint_error, "checkpointing.checkpoint_dir", tmp_path / "ckpt"),
        (log_error, "logger.log_dir", tmp_path / "logs"),
    ):
        assert error.startswith(f"{key}: {directory} holds a run of another config: config hash {recorded}")
        assert f"this run's config hash is {now}" in error
        assert f"\n    {LR}: 0.003 -> 0.001\n" in error
        assert f"a directory of its own ({key}=<new path>), or restore the recorded values" in error
    assert f"recorded in {tmp_path / 'ckpt' / 'step_2' / IDENTITY_FILE}" in checkpoint_error
    assert "continue that run's weights" in checkpoint_error
    assert "rewind its metrics.jsonl" in log_error
    assert _snapshot(tmp_path) == before, "the refused run changed nothing"


def test_a_whole_other_recipe_is_shown_by_its_first_differences(tmp_path):
    _previous_run(tmp_path)
    cfg, _ = _config(tmp_path, "checkpointing.enabled=false")
    other_recipe = _resolved(tmp_path, *(f"+data.extra_{i:02d}={i}" for i in range(30)))
    with pytest.raises(ConfigError) as info:
        claim_run_directories(cfg, other_recipe)
    (error,) = info.value.messages  # checkpointing disabled: the run never resumes, only its log directory counts
    assert error.startswith("logger.log_dir: ")
    assert error.count("\n    data.extra_") == 20 and "\n    ... and 10 more\n" in error


def test_the_same_config_and_a_longer_run_resume(tmp_path):
    _previous_run(tmp_path)
    for overrides in ((), ("sft.max_num_steps=60", "logger.wandb.name=longer", "checkpointing.keep_top_k=1")):
        checkpoints = claim_run_directories(*_config(tmp_path, *overrides))
        assert checkpoints.latest() == tmp_path / "ckpt" / "step_2"
        assert checkpoints.identity == RunIdentity.read(tmp_path / "ckpt" / "step_2")


def test_directories_with_nothing_of_another_run_are_taken(tmp_path):
    """No record (a run from before records existed), or a record but nothing logged or saved yet."""
    cfg, resolved = _config(tmp_path)
    claim_run_directories(cfg, resolved)
    assert not tmp_path.joinpath("logs").exists() and not tmp_path.joinpath("ckpt").exists(), "claiming writes nothing"
    legacy = CheckpointManager(tmp_path / "ckpt")  # records no identity
    legacy.commit(legacy.begin(1), 1, {"step": 1})
    RunIdentity.of(_config(tmp_path, f"{LR}=1e-3")[1]).write(tmp_path.joinpath("logs"))  # a run that died at start
    assert claim_run_directories(cfg, resolved).latest() == tmp_path / "ckpt" / "step_1"


def test_every_resume_safe_field_says_why():
    assert all(reason.strip() for reason in RESUME_SAFE_FIELDS.values())
    assert "*.max_num_steps" in RESUME_SAFE_FIELDS and "logger" in RESUME_SAFE_FIELDS


# ----------------------------------------------------------------------------
# through the run loop (no workers: a fake policy)
# ----------------------------------------------------------------------------
class _Saved:
    def save_pretrained(self, directory) -> None:
        Path(directory, "tokenizer.json").write_text("{}")


class _Policy(_Saved):
    def save_checkpoint(self, directory) -> None:
        Path(directory, "policy.pt").write_bytes(b"weights")

    def load_checkpoint(self, directory) -> None:
        assert Path(directory, "policy.pt").read_bytes() == b"weights"


class _CountingRun(RunLoop[int]):
    """The loop itself (set-up order, checkpoints, resume) around steps that only count."""

    section: ClassVar[str] = "sft"
    prepared: ClassVar[int] = 0

    def prepare(self) -> ResumableDataloader:
        type(self).prepared += 1
        self.tokenizer = _Saved()
        return ResumableDataloader(list(range(64)), self.cfg.policy.train_global_batch_size, False, 0)

    def start_workers(self) -> None:
        self.policy = _Policy()  # pyright: ignore[reportAttributeAccessIssue]  (a stand-in for the workers)

    def train_step(self, batch: list, step: int) -> dict[str, float]:
        return {"loss": float(step)}

    def validate(self) -> dict[str, float] | None:
        return None

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {}

    def finish(self, step, last_train, last_validation) -> int:
        return step


def _train(run_dir: Path, *overrides: str) -> int:
    run = _CountingRun(*_config(run_dir, "checkpointing.save_period=1", *overrides))
    try:
        return run.train()
    finally:
        run.close()


def test_the_loop_resumes_its_own_run_and_refuses_another_before_preparing(tmp_path):
    assert _train(tmp_path, "sft.max_num_steps=2") == 2
    assert RunIdentity.read(tmp_path / "ckpt" / "step_2") == RunIdentity.read(tmp_path / "logs")
    assert _train(tmp_path, "sft.max_num_steps=4") == 4  # resumed at step 2
    assert [row["step"] for row in read_metrics(tmp_path / "logs", "train")] == [1, 2, 3, 4]
    before, prepared = _snapshot(tmp_path), _CountingRun.prepared
    with pytest.raises(ConfigError, match=f"{LR}: 0.003 -> 0.001"):
        _train(tmp_path, "sft.max_num_steps=6", f"{LR}=1e-3")
    assert _CountingRun.prepared == prepared, "refused before the data was even loaded"
    assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------------
# the entry script
# ----------------------------------------------------------------------------
def test_run_sft_refuses_another_configs_run_before_ray_starts(tmp_path, capsys):
    from tests.helpers import entry_main

    _previous_run(tmp_path)
    before = _snapshot(tmp_path)
    code = entry_main("run_sft")(
        [
            "--config",
            str(SFT_YAML),
            f"logger.log_dir={tmp_path / 'logs'}",
            f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
            "logger.tensorboard_enabled=false",
            f"{LR}=1e-3",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"checkpointing.checkpoint_dir: {tmp_path / 'ckpt'} holds a run of another config" in err
    assert f"{LR}: 0.003 -> 0.001" in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()
