"""Messages of a rollout run name the running algorithm's own config keys (``distillation.*`` in distillation).

The runs are the real classes, set up from their default recipes up to the
point where Ray would start (the one hook that starts workers does nothing
here): what the parity stop reads comes from the config the run was given.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nemo_rl.algorithms.distillation import DistillationRun
from nemo_rl.algorithms.grpo import GRPORun
from nemo_rl.algorithms.logprob_parity import ParityError, measure_parity
from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import validate_distillation_config, validate_grpo_config

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


def _run_without_workers(run_cls, recipe: str, validate, tmp_path: Path):
    class WithoutWorkers(run_cls):
        def start_workers(self) -> None:
            """The parity check reads only the config; nothing needs to run."""

    overrides = [f"logger.log_dir={tmp_path / 'logs'}", "logger.tensorboard_enabled=false"]
    resolved = resolve_config(load_config(CONFIGS / recipe, overrides))
    return WithoutWorkers(validate(resolved), resolved)


@pytest.mark.parametrize(
    ("run_cls", "recipe", "validate", "section", "other"),
    [
        (GRPORun, "grpo_math.yaml", validate_grpo_config, "grpo", "distillation."),
        (DistillationRun, "distillation_math.yaml", validate_distillation_config, "distillation", "grpo."),
    ],
)
def test_the_parity_stop_names_the_running_algorithms_threshold(run_cls, recipe, validate, section, other, tmp_path):
    run = _run_without_workers(run_cls, recipe, validate, tmp_path)
    try:
        tokens, mask = torch.zeros(1, 64), torch.ones(1, 64)
        run.check_parity(measure_parity(tokens, tokens, mask, run.parity_window()))  # agreeing engines pass
        with pytest.raises(ParityError) as info:
            run.check_parity(measure_parity(tokens, tokens + 0.4, mask, run.parity_window()))
    finally:
        run.close()
    message = str(info.value)
    assert f"exceeds {section}.token_mult_prob_error_threshold = 1.001" in message
    assert other not in message
