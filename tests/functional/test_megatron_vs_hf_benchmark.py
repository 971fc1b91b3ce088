"""benchmarks/megatron_vs_hf_throughput.py end to end at a small shape: same work on both sides, phases that add up."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.functional, pytest.mark.slow]

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "megatron_vs_hf_throughput.py"


def test_both_sides_do_the_same_work_and_every_phase_is_timed(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("megatron_vs_hf_throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    monkeypatch.setenv("NRL_MEGATRON_CHECKPOINT_DIR", str(tmp_path / "set by the benchmark"))  # restored after
    out = tmp_path / "bench"
    shape = ["--models", "tiny-qwen2", "--seq-len", "512", "--batch-size", "2", "--num-cpus", "2"]
    module.main([*shape, "--rounds", "1", "--steps", "1", "--warmup", "1", "--phase-steps", "2", "--out", str(out)])

    row = json.loads((out / "results.json").read_text())["models"]["tiny-qwen2"]
    assert {p.name for p in out.glob("*.png")} == {"throughput.png", "phases.png"}
    assert row["first_loss_difference"] < 1e-5  # same weights, same batch, same loss
    assert row["ratio"] == pytest.approx(row["hf"]["s_per_step"] / row["megatron"]["s_per_step"])
    # one round of one step a side: nothing to resample, the interval is the ratio itself
    assert row["ratio_interval_90"] == pytest.approx([row["ratio"]] * 2) and len(row["ratio_each_round"]) == 1
    megatron, hf = row["phases"]["megatron"], row["phases"]["hf"]
    # each side's wrapped phases fired (a renamed method would leave its phase out) and add up to the step
    assert list(megatron) == [
        "forward and loss",
        "backward",
        "gradient finalisation",
        "optimizer",
        "rest of the step",
        "step",
    ]
    assert list(hf) == ["forward and loss", "backward", "optimizer", "rest of the step", "step"]
    for phases in (megatron, hf):
        assert all(seconds > 0 for name, seconds in phases.items() if name != "rest of the step")
        assert sum(seconds for name, seconds in phases.items() if name != "step") == pytest.approx(phases["step"])
