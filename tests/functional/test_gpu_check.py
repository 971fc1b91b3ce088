"""tools/gpu_check.py end to end in its CPU mode, as a lent GPU machine runs it: one process, no Ray, no vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import WITHOUT_RAY_OR_VLLM

pytestmark = [pytest.mark.functional, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LENGTHS = (256, 512)


def test_every_check_passes_or_measures_on_cpu_without_ray_or_vllm(tmp_path):
    out = tmp_path / "gpu_check"
    argv = ["tools/gpu_check.py", "--device", "cpu", "--out", str(out)]
    code = f"{WITHOUT_RAY_OR_VLLM}; import runpy; sys.argv = {argv!r}; runpy.run_path({argv[0]!r}, run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    checks = results["checks"]
    expected = {
        "parity_worker": "pass",
        "yarn_parity_4x": "pass",
        "model_worker": "pass",
        "refit_buckets": "pass",
        "model_parity": "pass",
        "sdpa_kernel": "skipped: no CUDA",
        "train_step": "pass",
        **{f"throughput@{length}": "measured" for length in LENGTHS},
    }
    assert {name: row["status"] for name, row in checks.items()} == expected
    assert results["passed"] and results["environment"]["device"] == "cpu"

    parity = checks["yarn_parity_4x"]["details"]
    assert parity["tokens"] == 4 * parity["window"]  # 4x the pre-trained model's window, with YaRN
    assert parity["max_abs_diff"] <= parity["tolerance"] < parity["no_yarn_control"]
    # Measured on CPU too, only not judged: the worker's attention is SDPA's fused CPU kernel.
    assert checks["sdpa_kernel"]["details"]["worker_forward_ops"] == [
        "aten::_scaled_dot_product_flash_attention_for_cpu"
    ]
    for length in LENGTHS:
        measured = checks[f"throughput@{length}"]["details"]
        assert measured["tokens"] == length and measured["tokens_per_s"] > 0 and measured["model_tflops_per_step"] > 0
        assert measured["mfu"] is None and measured["peak_memory_gib"] is None  # no peak FLOP/s given, no CUDA
    # The table printed at the end names every check.
    table = done.stdout[done.stdout.rindex("check ") :]
    assert all(name in table for name in expected)
