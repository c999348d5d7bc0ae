#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (Debian's slurm-wlm and munge; run as root), for the SLURM tests.
#   scripts/slurm_local.sh start   # writes /etc/slurm/slurm.conf, starts munged, slurmctld, slurmd; waits for "idle"
#   scripts/slurm_local.sh stop    # stops the three daemons by the pids they wrote (never by name)
# Install first: apt-get install -y slurm-wlm munge. The node offers every core of the machine, 20 GB of memory,
# one partition "debug". KillWait=5: a requeued or cancelled job is killed 5 s after its SIGTERM;
# cred_expire=10: a requeued job may start again after 10 s (SLURM's default is 120 s).
set -euo pipefail
PIDS=(/run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid)

start() {
  if [ "$(id -u)" -ne 0 ]; then echo "slurm_local.sh: run as root (it writes /etc/slurm and starts daemons)" >&2; exit 1; fi
  for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || {
      echo "slurm_local.sh: $tool is missing; apt-get install -y slurm-wlm munge" >&2; exit 1; }
  done
  local host; host=$(hostname)
  mkdir -p /etc/slurm /var/spool/slurmd /var/spool/slurmctld /run/munge /var/log
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmUser=root
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
SlurmctldLogFile=/var/log/slurmctld.log
SlurmdLogFile=/var/log/slurmd.log
KillWait=5
MinJobAge=600
NodeName=$host CPUs=$(nproc) RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  [ -f /etc/munge/munge.key ] || mungekey -c
  chown munge:munge /etc/munge/munge.key /run/munge && chmod 400 /etc/munge/munge.key
  [ -s /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null \
    || su -s /bin/sh munge -c /usr/sbin/munged
  [ -s /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null || /usr/sbin/slurmctld -c
  [ -s /run/slurmd.pid ] && kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null || /usr/sbin/slurmd
  for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then sinfo; return 0; fi
    sleep 0.5
  done
  echo "slurm_local.sh: the node did not come up in 30 s; see /var/log/slurmctld.log and /var/log/slurmd.log" >&2
  exit 1
}

stop() {
  local f pid
  for f in "${PIDS[@]}"; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
