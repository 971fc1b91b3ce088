#!/usr/bin/env bash
# The GPU check (tools/gpu_check.py) on a lent machine that has Python 3.12, a CUDA build of torch and
# transformers, but no package registry, Ray or vLLM (README "Checking a lent GPU"):
#   bash tools/gpu_check.sh prepare        # here, with the registry: the wheels that machine lacks, into .gpu_check_wheels/
#   bash tools/gpu_check.sh run [ARGS...]  # there, with the repository and that folder: tools/gpu_check.py ARGS
# GPU_CHECK_PYTHON: the interpreter `run` uses (default python3).
# GPU_CHECK_PYTHON_VERSION: the Python the wheels are for (default 3.12, the lent machines').
# GPU_CHECK_TIMEOUT: `run`'s time limit (default 8m; the check writes its results after every row).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.gpu_check_wheels
MAX_MIB=64 # what may travel with the working tree to a lent machine
# What the worker, its config and the tool import beyond torch, transformers and their dependencies
# (numpy, safetensors, tokenizers, pyyaml, filelock, packaging, huggingface-hub), at uv.lock's versions:
# megatron-core, pydantic (nemo_rl.config.schema) and hydra's override parser with omegaconf
# (nemo_rl.config.loader). typing-extensions too: pydantic needs a newer one than torch does.
BINARY=(megatron-core pydantic pydantic-core annotated-types typing-inspection typing-extensions hydra-core omegaconf)
SOURCE_ONLY=(antlr4-python3-runtime) # omegaconf's parser runtime; its 4.9 release is an sdist, built into a wheel here

locked() { # name==version of each package named, as uv.lock pins it
  uv run --no-project python - "$@" <<'EOF'
import sys
import tomllib

with open("uv.lock", "rb") as lock:
    versions = {package["name"]: package["version"] for package in tomllib.load(lock)["package"]}
print("\n".join(f"{name}=={versions[name]}" for name in sys.argv[1:]))
EOF
}

pip_here() {
  uv run --no-project --with pip python -m pip "$@"
}

prepare() {
  local version=${GPU_CHECK_PYTHON_VERSION:-3.12}
  local binary source_only
  mapfile -t binary < <(locked "${BINARY[@]}")
  mapfile -t source_only < <(locked "${SOURCE_ONLY[@]}")
  rm -rf "$WHEELS"
  mkdir "$WHEELS"
  pip_here download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
    --python-version "$version" --implementation cp --abi "cp${version/./}" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 "${binary[@]}"
  pip_here wheel --quiet --no-deps --wheel-dir "$WHEELS" "${source_only[@]}"
  local wheels=("$WHEELS"/*.whl) bytes
  printf '%s\n' "${wheels[@]}"
  bytes=$(cat "${wheels[@]}" | wc -c)
  echo "$WHEELS: ${#wheels[@]} wheels, $((bytes / 1024)) KiB (limit ${MAX_MIB} MiB)"
  if [ "$bytes" -gt $((MAX_MIB * 1024 * 1024)) ]; then
    echo "gpu_check.sh: the wheels exceed ${MAX_MIB} MiB" >&2
    exit 1
  fi
}

run() {
  local python=${GPU_CHECK_PYTHON:-python3}
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: no wheels in $WHEELS; run 'bash tools/gpu_check.sh prepare' where the package registry is reachable" >&2
    exit 2
  fi
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX") # global: the exit trap reads it
  trap 'rm -rf "$SITE"' EXIT
  if "$python" -m pip --version >/dev/null 2>&1; then
    # --no-deps: exactly these wheels; torch and the rest are the machine's own
    "$python" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl
  else # without pip: a wheel's files unpacked onto the path are what an install puts there
    for wheel in "$WHEELS"/*.whl; do "$python" -m zipfile -e "$wheel" "$SITE"; done
  fi
  local rc=0
  PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "${GPU_CHECK_TIMEOUT:-8m}" \
    "$python" tools/gpu_check.py "$@" || rc=$?
  if [ "$rc" -eq 124 ]; then
    echo "gpu_check.sh: stopped after ${GPU_CHECK_TIMEOUT:-8m}; results.json holds the checks that finished" >&2
  fi
  return "$rc"
}

case "${1:-}" in
  prepare) prepare ;;
  run)
    shift
    run "$@"
    ;;
  *)
    echo "usage: bash tools/gpu_check.sh prepare | run [tools/gpu_check.py options]" >&2
    exit 2
    ;;
esac
