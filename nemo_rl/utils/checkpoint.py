"""Training checkpoints: atomic step directories, resume from the latest, and which config wrote them.

A step is written into ``tmp_step_N`` and renamed to ``step_N`` only after every
writer finished, so a run killed mid-save leaves no ``step_N`` that looks
complete; leftover ``tmp_step_*`` directories are removed at start-up.

Each step also records the identity of the run that wrote it (``RunIdentity``:
the resolved config less the fields a resume may change, and its hash), so a
run started on another run's directory is refused instead of continuing that
run's weights under a different config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_STEP = re.compile(r"^step_(\d+)$")
TRAINING_INFO = "training_info.json"
IDENTITY_FILE = "run_identity.json"

# Resolved-config fields a resume may change, and why: none changes what the steps already taken computed nor
# what the steps to come compute. ``*`` is the algorithm's section (sft, dpo, rm, grpo, distillation).
RESUME_SAFE_FIELDS: dict[str, str] = {
    "*.max_num_steps": "where the run stops: training further is what a resume is for",
    "*.max_num_epochs": "the other stop criterion",
    "policy.megatron_cfg.scheduler.lr_decay_iters": (
        "the recipes derive it from max_num_steps, and a resumed Megatron scheduler keeps the value saved in the "
        "checkpoint anyway (megatron-core's use_checkpoint_opt_param_scheduler)"
    ),
    "policy.megatron_cfg.force_reconvert_from_hf": (
        "rebuilds the cached conversion the policy starts from: the same model and overrides convert to the same "
        "weights, and a resume loads the step's own"
    ),
    "*.val_period": "when validation runs: it reads the weights and changes neither them nor the data order",
    "*.val_at_start": "likewise, and a resumed run never validates at its start",
    "*.export_hf_dir": "where the model is exported once training ends",
    "checkpointing": "whether, where and how often checkpoints are written and how many are kept",
    "logger": "where and how metrics are reported (log directory, TensorBoard, wandb, GPU monitoring)",
}


@dataclass(frozen=True, eq=False)
class RunIdentity:
    """What makes two runs one run: their resolved configs, less ``RESUME_SAFE_FIELDS``, hash the same.

    Compared as JSON, types included (``1`` is not ``1.0``), so two identities are equal exactly when their
    hashes are, and every pair that is not shows at least one differing field.
    """

    config: dict[str, Any]

    @classmethod
    def of(cls, resolved_config: Mapping[str, Any]) -> RunIdentity:
        config = json.loads(json.dumps(resolved_config))  # a deep copy, with JSON's types (as a record reads back)
        for field in RESUME_SAFE_FIELDS:
            _drop(config, field.split("."))
        return cls(config)

    @cached_property
    def hash(self) -> str:
        """The first 16 hex digits of SHA-256 over the identity's canonical JSON."""
        return hashlib.sha256(_canonical(self.config).encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunIdentity) and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def write(self, directory: Path) -> Path:
        """``directory/run_identity.json``, written whole or not at all."""
        path = Path(directory) / IDENTITY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"config_hash": self.hash, "config": self.config}, indent=2, sort_keys=True))
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, directory: Path) -> RunIdentity | None:
        """The identity recorded in ``directory``, or None where none was (a run from before records existed).

        The fields are dropped again, so a record compares by the resume-safe fields of this version.
        """
        path = Path(directory) / IDENTITY_FILE
        return cls.of(json.loads(path.read_text())["config"]) if path.is_file() else None

    def differences(self, other: RunIdentity) -> list[str]:
        """``field: other's value -> this one's`` for every field the two configs disagree on (dotted keys)."""
        mine, theirs = dict(_leaves(self.config)), dict(_leaves(other.config))
        return [
            f"{key}: {_shown(theirs.get(key))} -> {_shown(mine.get(key))}"
            for key in sorted(mine.keys() | theirs.keys())
            if mine.get(key) != theirs.get(key)
        ]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _drop(config: dict[str, Any], path: list[str]) -> None:
    head, rest = path[0], path[1:]
    for key in list(config) if head == "*" else [head]:
        if key not in config:
            continue
        if not rest:
            del config[key]
        elif isinstance(config[key], dict):
            _drop(config[key], rest)


def _leaves(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """Each leaf of ``config`` as (dotted key, canonical JSON of its value)."""
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", _canonical(value)


def _shown(value: str | None, width: int = 60) -> str:
    if value is None:
        return "(absent)"
    return value if len(value) <= width else value[: width - 3] + "..."


class CheckpointManager:
    def __init__(self, checkpoint_dir: Path, keep_top_k: int | None = None, identity: RunIdentity | None = None):
        self.root = Path(checkpoint_dir)
        self.keep_top_k = keep_top_k
        self.identity = identity  # recorded in every step this manager commits

    def _steps(self) -> list[int]:
        if not self.root.exists():
            return []
        steps = []
        for child in self.root.iterdir():
            match = _STEP.match(child.name)
            if match and (child / TRAINING_INFO).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def clean_incomplete(self) -> None:
        if not self.root.exists():
            return
        for child in self.root.glob("tmp_step_*"):
            logger.warning("Removing incomplete checkpoint %s", child)
            shutil.rmtree(child, ignore_errors=True)

    def latest(self) -> Path | None:
        steps = self._steps()
        return self.root / f"step_{steps[-1]}" if steps else None

    def begin(self, step: int) -> Path:
        """A fresh temporary directory for the writers of ``step``."""
        tmp = self.root / f"tmp_step_{step}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int, training_info: dict[str, Any]) -> Path:
        """Write the run's identity, the training state last, then publish the directory atomically."""
        if self.identity is not None:
            self.identity.write(tmp)
        (tmp / TRAINING_INFO).write_text(json.dumps(training_info, indent=2, sort_keys=True))
        final = self.root / f"step_{step}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        self._prune()
        return final

    def _prune(self) -> None:
        if not self.keep_top_k:
            return
        for step in self._steps()[: -self.keep_top_k]:
            shutil.rmtree(self.root / f"step_{step}", ignore_errors=True)

    @staticmethod
    def training_info(checkpoint: Path) -> dict[str, Any]:
        return json.loads((Path(checkpoint) / TRAINING_INFO).read_text())
