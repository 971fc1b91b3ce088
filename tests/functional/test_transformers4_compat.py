"""The translations under transformers 4, whose configs spell the block ``rope_scaling`` (not ``rope_parameters``).

The lock pins transformers 5, so this runs the probe in a throwaway uv
environment with transformers 4.57 (config classes only, no torch). It needs the
package registry; without it the test is skipped, not passed.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRANSFORMERS_4 = "transformers==4.57.1"


@pytest.mark.slow
def test_translations_write_the_transformers4_spelling():
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    command = [uv, "run", "--isolated", "--no-project", "--python", sys.executable, "--with", TRANSFORMERS_4]
    command += ["--with", "omegaconf", "--with", "hydra-core", "--with", "pydantic", "--with", "filelock"]
    command += ["python", str(ROOT / "tests/functional/transformers4_probe.py")]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if done.returncode != 0 and "Failed to fetch" in done.stderr:
        pytest.skip(f"package registry unreachable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["transformers"].startswith("4.")
    assert not result["has_rope_parameters"]
    # the block goes under rope_scaling, rope_theta to its own attribute, fields in their declared types
    expected_yarn = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 256,
        "truncate": True,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.0,
    }
    assert result["yarn_rope_scaling"] == expected_yarn
    assert result["yarn_rope_theta"] == 1e6
    assert result["yarn_max_position_embeddings"] == 1024
    assert result["yarn_read_back"] == expected_yarn
    assert result["yarn_theta_read_back"] == 1e6
    assert result["linear_rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert result["linear_rope_theta"] == 1e6
    # vLLM gets exactly the changed entries, whole, in the same spelling
    assert result["vllm"] == {
        "hf_overrides": {"max_position_embeddings": 1024, "rope_scaling": expected_yarn},
        "max_model_len": 1024,
    }
    assert result["warnings"] == [], result["warnings"]
