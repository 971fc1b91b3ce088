"""Training checkpoints: atomic step directories and resume from the latest.

A step is written into ``tmp_step_N`` and renamed to ``step_N`` only after every
writer finished, so a run killed mid-save leaves no ``step_N`` that looks
complete; leftover ``tmp_step_*`` directories are removed at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_STEP = re.compile(r"^step_(\d+)$")
TRAINING_INFO = "training_info.json"


class CheckpointManager:
    def __init__(self, checkpoint_dir: Path, keep_top_k: int | None = None):
        self.root = Path(checkpoint_dir)
        self.keep_top_k = keep_top_k

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
        """Write the training state last, then publish the directory atomically."""
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
