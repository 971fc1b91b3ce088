#!/bin/bash
# A real Slurm cluster on this one machine, to try tools/slurm/ray.sub without a cluster:
# munged, slurmctld and one slurmd per Slurm node, all started directly (no systemd; works as root
# in a container) with their configuration, keys, sockets, pid files, logs and state in one state
# directory. Nothing is installed unless asked (--install: `apt-get install -y slurm-wlm`).
#
#   tools/slurm/local_cluster.sh start [--nodes=N] [--install] [STATE_DIR]  # waits until sinfo shows N idle nodes
#   eval "$(tools/slurm/local_cluster.sh env [STATE_DIR])"                # SLURM_CONF for sbatch/srun/sinfo
#   COMMAND="..." GPUS_PER_NODE=0 sbatch --nodes=2 tools/slurm/ray.sub
#   tools/slurm/local_cluster.sh status [STATE_DIR]                       # exit 0 when every daemon is up
#   tools/slurm/local_cluster.sh stop [STATE_DIR]                         # cancels the jobs, stops the daemons
#
# STATE_DIR defaults to $LOCAL_SLURM_DIR, else ${TMPDIR:-/tmp}/nemo-rl-slurm-$USER. Other settings:
#   LOCAL_SLURM_NODES  Slurm nodes (2; --nodes), named n1, n2, ...
#   LOCAL_SLURM_PORT   slurmctld's port (16817); node i's slurmd listens on LOCAL_SLURM_PORT + i
#   LOCAL_SLURM_CPUS   CPUs each node advertises (all of this machine's, `nproc`)
#   LOCAL_SLURM_TIMEOUT  seconds `start` waits for the nodes to be idle (60)
#
# Several Slurm nodes on one host: Debian's slurm-wlm (22.05.8, bookworm) is built with
# --enable-multiple-slurmd (its libslurmfull lacks the one-slurmd-per-host check's message,
# "Duplicated NodeHostName %s in the config file"), so each node is its own `slurmd -N nI` with
# NodeAddr=127.0.0.1 and its own Port=, SlurmdSpoolDir, pid and log file (%n in their names); jobs
# see distinct SLURMD_NODENAMEs and srun -w picks the node. A build without that option logs that
# error for the second node and never registers it; use --nodes=1 there.
#
# The configuration is what a container needs: ProctrackType=proctrack/linuxproc (processes tracked
# by their parent chain, no cgroups), TaskPlugin=task/none, JobAcctGatherType=jobacct_gather/none,
# no accounting database (no sacct; `scontrol show job` reports a finished job's ExitCode for
# MinJobAge seconds, and `sbatch --wait` exits with the job's status), SelectType=select/cons_tres.
# With these plugins Slurm 22.05 reads no cgroup.conf, so none is written. munged gets its own key
# (created if missing) and socket in the state directory (AuthInfo=socket=...), so a system munged
# is neither needed nor touched. The daemons run as the invoking user (root in a container; as
# another user, jobs can only run as that user).
set -euo pipefail

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
}

CMD="${1:-}"
if [[ "$CMD" == "-h" || "$CMD" == "--help" ]]; then
  usage
  exit 0
fi
if [[ -z "$CMD" ]]; then
  usage
  exit 2
fi
shift
NODES="${LOCAL_SLURM_NODES:-2}"
INSTALL=0
STATE_DIR="${LOCAL_SLURM_DIR:-}"
for arg in "$@"; do
  case "$arg" in
    --nodes=*) NODES="${arg#--nodes=}" ;;
    --install) INSTALL=1 ;;
    -*)
      echo "error: unknown option $arg" >&2
      usage
      exit 2
      ;;
    *) STATE_DIR="$arg" ;;
  esac
done
USER_NAME="$(id -un)"
STATE_DIR="${STATE_DIR:-${TMPDIR:-/tmp}/nemo-rl-slurm-$USER_NAME}"
if [[ ! "$NODES" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: the number of nodes must be a positive integer, got '$NODES'" >&2
  exit 2
fi
PORT="${LOCAL_SLURM_PORT:-16817}"
CPUS="${LOCAL_SLURM_CPUS:-$(nproc)}"
TIMEOUT="${LOCAL_SLURM_TIMEOUT:-60}"
CONF="$STATE_DIR/slurm.conf"
MUNGE_SOCKET="$STATE_DIR/munge/munge.socket"
export SLURM_CONF="$CONF"

# Daemons this script started, by pid file: munged, slurmctld, then one slurmd per node.
pid_files() {
  local f
  echo "$STATE_DIR/munge/munged.pid"
  echo "$STATE_DIR/slurmctld.pid"
  for f in "$STATE_DIR"/slurmd-*.pid; do
    [[ -e "$f" ]] && echo "$f"
  done
  return 0
}

pid_alive() { # PIDFILE: the daemon named in it is running
  local pid
  [[ -s "$1" ]] || return 1
  pid=$(<"$1")
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

# The nodes configured in STATE_DIR's slurm.conf (n1 n2 ...).
conf_nodes() {
  [[ -f "$CONF" ]] && sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF"
  return 0
}

need_binaries() {
  local missing=() b
  for b in munged slurmctld slurmd sinfo scontrol sbatch srun squeue scancel; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    return 0
  fi
  if [[ $INSTALL -eq 1 ]]; then
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo -n)
    echo "Installing slurm-wlm (missing: ${missing[*]})" >&2
    if ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y slurm-wlm; then
      DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update
      DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y slurm-wlm
    fi
    return 0
  fi
  echo "error: not installed: ${missing[*]}. Install Slurm with" >&2
  echo "  apt-get install -y slurm-wlm        # (sudo) Debian/Ubuntu: slurmctld, slurmd, munge" >&2
  echo "or run: $0 start --install" >&2
  exit 3
}

write_conf() {
  local host i
  host="$(hostname -s)"
  mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/log"
  {
    echo "# Written by tools/slurm/local_cluster.sh: $NODES node(s) on this host."
    echo "ClusterName=nemorl-local"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmctldPort=$PORT"
    echo "SlurmUser=$USER_NAME"
    echo "SlurmdUser=$USER_NAME"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "AuthInfo=socket=$MUNGE_SOCKET"
    echo "StateSaveLocation=$STATE_DIR/ctld"
    echo "SlurmdSpoolDir=$STATE_DIR/spool-%n"
    echo "SlurmctldPidFile=$STATE_DIR/slurmctld.pid"
    echo "SlurmdPidFile=$STATE_DIR/slurmd-%n.pid"
    echo "SlurmctldLogFile=$STATE_DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "SchedulerType=sched/backfill"
    echo "SlurmdParameters=config_overrides"
    echo "MpiDefault=none"
    echo "ReturnToService=2"
    echo "KillWait=5"
    echo "MinJobAge=600"
    echo "InactiveLimit=0"
    for ((i = 1; i <= NODES; i++)); do
      echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$CPUS State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
}

start_munged() {
  local key="$STATE_DIR/munge/munge.key"
  mkdir -p "$STATE_DIR/munge"
  chmod 755 "$STATE_DIR/munge" # munged: the socket's directory must be searchable by all
  if [[ ! -s "$key" ]]; then
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile="$key"
    else
      dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
  fi
  chmod 600 "$key"
  if pid_alive "$STATE_DIR/munge/munged.pid"; then
    return 0
  fi
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  munged --key-file="$key" --socket="$MUNGE_SOCKET" --pid-file="$STATE_DIR/munge/munged.pid" \
    --log-file="$STATE_DIR/log/munged.log" --seed-file="$STATE_DIR/munge/munged.seed"
}

# sinfo's node states, one "node state" line each.
node_states() {
  sinfo -h -N -o '%N %T' 2>/dev/null || true
}

cmd_start() {
  need_binaries
  mkdir -p "$STATE_DIR"
  chmod 755 "$STATE_DIR"
  if pid_alive "$STATE_DIR/slurmctld.pid"; then
    echo "A local Slurm cluster is already running in $STATE_DIR (stop it first to change it)" >&2
  else
    write_conf
  fi
  start_munged
  if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
    slurmctld -f "$CONF"
  fi
  local node
  for node in $(conf_nodes); do
    if ! pid_alive "$STATE_DIR/slurmd-$node.pid"; then
      slurmd -f "$CONF" -N "$node"
    fi
  done
  local want deadline=$((SECONDS + TIMEOUT)) states idle
  want=$(conf_nodes | wc -l)
  while true; do
    states=$(node_states)
    idle=$(awk '$2 == "idle" { n++ } END { print n + 0 }' <<<"$states")
    if [[ "$idle" -ge "$want" ]]; then
      break
    fi
    if [[ $SECONDS -ge $deadline ]]; then
      echo "error: only $idle of $want Slurm node(s) idle after ${TIMEOUT}s (LOCAL_SLURM_TIMEOUT):" >&2
      echo "${states:-(sinfo answered nothing)}" >&2
      tail -n 5 "$STATE_DIR"/log/*.log >&2 || true
      exit 1
    fi
    sleep 0.5
  done
  echo "Slurm on this host: $want node(s) idle ($(conf_nodes | paste -sd " ")), state in $STATE_DIR" >&2
  echo "  eval \"\$($0 env $STATE_DIR)\"   # SLURM_CONF for sbatch, srun, sinfo" >&2
}

cmd_env() {
  printf 'export SLURM_CONF=%q\n' "$CONF"
}

cmd_status() {
  local f ok=0 name
  if [[ ! -f "$CONF" ]]; then
    echo "no local Slurm cluster in $STATE_DIR" >&2
    exit 1
  fi
  for f in $(pid_files); do
    name=$(basename "$f" .pid)
    if pid_alive "$f"; then
      echo "$name: running (pid $(<"$f"))"
    else
      echo "$name: not running"
      ok=1
    fi
  done
  if [[ $ok -eq 0 ]]; then
    sinfo -N -o '%N %T %c'
  fi
  exit "$ok"
}

# Stops the daemons named in the given pid files together: SIGTERM, then SIGKILL after 10 s.
stop_pid_files() {
  local f pids=() pid i alive
  for f in "$@"; do
    if pid_alive "$f"; then
      pids+=("$(<"$f")")
    fi
  done
  if [[ ${#pids[@]} -gt 0 ]]; then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      alive=0
      for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
          alive=1
        fi
      done
      [[ $alive -eq 1 ]] || break
      sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
  rm -f "$@"
}

cmd_stop() {
  if [[ ! -d "$STATE_DIR" ]]; then
    echo "no local Slurm cluster in $STATE_DIR" >&2
    return 0
  fi
  local jobs i f
  # Jobs first: their steps (slurmstepd) outlive slurmd by design.
  if pid_alive "$STATE_DIR/slurmctld.pid"; then
    jobs=$(squeue -h -o '%i' 2>/dev/null || true)
    if [[ -n "$jobs" ]]; then
      # shellcheck disable=SC2086  # one job id per word
      scancel $jobs 2>/dev/null || true
      for ((i = 0; i < 150; i++)); do # KillWait=5, then the steps are killed
        [[ -z "$(squeue -h -o '%i' 2>/dev/null || true)" ]] && break
        sleep 0.2
      done
    fi
  fi
  local slurmds=()
  for f in "$STATE_DIR"/slurmd-*.pid; do
    [[ -e "$f" ]] && slurmds+=("$f")
  done
  [[ ${#slurmds[@]} -eq 0 ]] || stop_pid_files "${slurmds[@]}"
  stop_pid_files "$STATE_DIR/slurmctld.pid" "$STATE_DIR/munge/munged.pid"
  echo "Stopped the local Slurm cluster in $STATE_DIR" >&2
}

case "$CMD" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *)
    echo "error: unknown command $CMD" >&2
    usage
    exit 2
    ;;
esac
