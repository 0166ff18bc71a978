#!/usr/bin/env bash
# local_cluster.sh — a real two-node Slurm cluster on this one host, for tests and trying train.sbatch.
#
#   scripts/slurm/local_cluster.sh start DIR   # writes DIR/slurm.conf, starts munged, slurmctld, slurmd n1 + n2
#   export SLURM_CONF=DIR/slurm.conf           # then sbatch/srun/sinfo/scontrol talk to this cluster
#   scripts/slurm/local_cluster.sh stop DIR    # cancels its jobs, stops its daemons (by their pid files)
#
# Needs root and Debian's packages: apt-get install slurmctld slurmd slurm-client munge (Slurm 22.05 builds
# with MULTIPLE_SLURMD, so two slurmd "nodes" n1, n2 share this host: NodeAddr 127.0.0.1, own ports, 1 CPU
# each). Nothing outside DIR is touched: the config, state, spool, logs, pid files and munge socket all live
# there, and the ports are free ones picked at start, so a system Slurm or a second test cluster can coexist.
# Auth is munge with a private munged when the package's key is there (DS_SLURM_AUTH=none forces auth/none:
# then any local user may submit as anyone while the cluster runs).
# Exit status: 0 up / stopped, 2 Slurm or munge binaries missing or not root, 1 the daemons did not come up.
set -euo pipefail

die() { echo "local_cluster.sh: $1" >&2; exit "${2:-1}"; }

# Free TCP ports on 127.0.0.1 (one per line): the controller's and each slurmd's.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print("\n".join(str(s.getsockname()[1]) for s in socks))
EOF
}

check_binaries() {
  local b missing=()
  for b in slurmctld slurmd sinfo scontrol sbatch srun squeue scancel; do
    command -v "$b" >/dev/null || missing+=("$b")
  done
  [ ${#missing[@]} -eq 0 ] ||
    die "missing Slurm binaries: ${missing[*]} (apt-get install slurmctld slurmd slurm-client munge)" 2
  [ "$(id -u)" -eq 0 ] || die "must run as root (slurmd runs jobs as their submitter and needs root for that)" 2
}

auth_mode() {
  if [ "${DS_SLURM_AUTH:-munge}" = none ]; then echo none; return; fi
  if command -v munged >/dev/null && [ -r /etc/munge/munge.key ] && id munge >/dev/null 2>&1; then
    echo munge
  else
    die "munged or /etc/munge/munge.key missing (apt-get install munge), or set DS_SLURM_AUTH=none" 2
  fi
}

write_conf() {
  local dir=$1 auth=$2 ports host auth_lines
  mapfile -t ports < <(free_ports 3)
  host="$(hostname -s)"
  if [ "$auth" = munge ]; then
    auth_lines="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10"
  else
    auth_lines="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10"
  fi
  cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm/local_cluster.sh: two slurmd nodes on one host.
ClusterName=dstrainer
SlurmctldHost=$host
SlurmctldPort=${ports[0]}
$auth_lines
SlurmUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
# cred_expire (AuthInfo, default 120 s) is also how long a requeued job waits before it may start again.
# A finished job leaves the queue after 4 s: sbatch --wait polls at 2 s, 8 s, then every 32 s.
MinJobAge=4
KillWait=5
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[1]} CPUs=1 RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[2]} CPUs=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
  local dir=$1
  install -d -o munge -g munge -m 755 "$dir/munge"
  runuser -u munge -- munged --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
    --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
}

# Until both nodes are idle (the controller has heard from both slurmd), at most $2 seconds.
wait_idle() {
  local deadline=$((SECONDS + $2))
  while [ $SECONDS -lt "$deadline" ]; do
    [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle$')" -eq 2 ] && return 0
    sleep 0.5
  done
  return 1
}

start() {
  local dir=$1 auth
  check_binaries
  auth="$(auth_mode)"
  [ ! -e "$dir/run/slurmctld.pid" ] || die "$dir already has a running cluster (stop it first)"
  mkdir -p "$dir"
  chmod 755 "$dir"
  mkdir -p "$dir/state" "$dir/spool" "$dir/run" "$dir/log"
  write_conf "$dir" "$auth"
  export SLURM_CONF="$dir/slurm.conf"
  [ "$auth" = none ] || start_munged "$dir"
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF" -N n1
  slurmd -f "$SLURM_CONF" -N n2
  if ! wait_idle "$dir" "${DS_SLURM_START_TIMEOUT:-60}"; then
    echo "local_cluster.sh: the nodes did not become idle; sinfo says:" >&2
    sinfo -N >&2 || true
    tail -n 20 "$dir"/log/*.log "$dir"/munge/munged.log >&2 2>/dev/null || true
    stop "$dir"
    exit 1
  fi
  echo "local Slurm cluster up (auth/$auth): export SLURM_CONF=$SLURM_CONF"
}

# Stop the processes in the given pid files: TERM to all at once, KILL to any left after 10 s.
# Stale or missing files are fine; only these pids are signalled, never processes found by name.
stop_pidfiles() {
  local f pid pids=() i alive
  for f in "$@"; do
    [ -s "$f" ] || continue
    pid="$(cat "$f")"
    kill -0 "$pid" 2>/dev/null && kill "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$f"
  done
  for i in $(seq 100); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

stop() {
  local dir=$1 i
  export SLURM_CONF="$dir/slurm.conf"
  if [ -s "$dir/run/slurmctld.pid" ] && command -v scancel >/dev/null; then
    # Jobs first: their slurmstepd processes outlive slurmd.
    scancel --quiet --user root 2>/dev/null || true
    for i in $(seq 30); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  stop_pidfiles "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid"
  stop_pidfiles "$dir/munge/munged.pid"  # last: the daemons authenticate their goodbyes
  echo "local Slurm cluster in $dir stopped"
}

case "${1:-}" in
  start) [ $# -eq 2 ] || die "usage: $0 start DIR" 2; start "$(realpath -m "$2")" ;;
  stop) [ $# -eq 2 ] || die "usage: $0 stop DIR" 2; stop "$(realpath -m "$2")" ;;
  *) die "usage: $0 start|stop DIR" 2 ;;
esac
