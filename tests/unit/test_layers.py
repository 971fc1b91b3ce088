"""The package's layers only point down, and validating a config stays light.

The order is written in the README's Layout section and enforced by the
import-linter contracts in pyproject.toml (run here, so CI fails on an upward
import, as it does on a ruff finding or a type error beyond the baseline); validating a recipe must not import torch or an engine, which is what
keeps a bad recipe's error instant.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing(command):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ruff"), *command, "nemo_rl", "tests", "examples", "tools", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_validating_a_recipe_imports_no_torch_and_no_engine():
    script = (
        "import sys\n"
        "from nemo_rl.config.loader import load_config, resolve_config\n"
        "from nemo_rl.config.schema import validate_sft_config, validate_grpo_config\n"
        "validate_sft_config(resolve_config(load_config('examples/configs/sft_long_context.yaml')))\n"
        "validate_grpo_config(resolve_config(load_config('examples/configs/grpo_math.yaml')))\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'vllm', 'megatron', 'ray', 'transformers'})\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"config validation imported {result.stdout.strip()}"


@pytest.mark.slow  # about a minute on two cores
def test_type_check_finds_no_error_beyond_the_baseline():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "basedpyright")], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
