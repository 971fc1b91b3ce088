"""Run metrics: a JSONL file in the run directory, TensorBoard, and optionally wandb."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class Logger:
    def __init__(
        self,
        log_dir: Path,
        tensorboard: bool = True,
        wandb_cfg: Mapping[str, Any] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.log_dir / METRICS_FILE, "a", buffering=1)
        self._tb = self._tensorboard() if tensorboard else None
        self._wandb = None
        if wandb_cfg is not None:
            import wandb  # pyright: ignore[reportMissingImports]  (optional: only imported when enabled)

            self._wandb = wandb.init(
                project=wandb_cfg.get("project"),
                name=wandb_cfg.get("name"),
                config=dict(run_config or {}),
                dir=str(self.log_dir),
            )

    def _tensorboard(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.log_dir / "tensorboard"), purge_step=purge_step)

    def rewind(self, step: int) -> None:
        """Forget everything logged after ``step``: a resumed run repeats those steps.

        A run killed after its last checkpoint has already logged the steps it
        will now redo; without this, the JSONL and TensorBoard would show them twice.
        """
        self._jsonl.close()
        path = self.log_dir / METRICS_FILE
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        self._jsonl = open(path, "a", buffering=1)
        if self._tb is not None:
            self._tb.close()
            self._tb = self._tensorboard(purge_step=step + 1)

    def log(self, metrics: Mapping[str, float], step: int, prefix: str) -> None:
        """Record one step's metrics under ``prefix`` (train/validation/timing)."""
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        record = {"step": step, "split": prefix, "time": time.time(), **clean}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        for key, value in clean.items():
            if self._tb is not None and math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in clean.items()}, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(log_dir: Path, split: str | None = None) -> list[dict[str, Any]]:
    path = Path(log_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]
