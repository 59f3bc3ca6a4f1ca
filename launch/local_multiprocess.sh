#!/usr/bin/env bash
# Run `jaxpt train CONFIG [key=value ...]` as N CPU processes on this machine, D fake CPU
# devices each, joined with jax.distributed on 127.0.0.1: a multi-host run in miniature
# (same data sharding, collective checkpoints and process-0 logging as a TPU pod), for
# testing on a laptop or CI.
#
#   launch/local_multiprocess.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] \
#       [-l LOG_DIR] CONFIG [key.sub=value ...]
#
#   -n  processes (default 2)          -d  CPU devices per process (default 4)
#   -p  coordinator port (default: a free one)
#   -l  dir for the logs of processes 1..N-1 (default: a new temp dir); process 0 prints
#       to this terminal.
# Environment: PYTHON (default python3) runs `$PYTHON -m jaxpt.cli`.
#
# If one process fails, the others are stopped (they would wait for it forever). Ctrl-C or
# SIGTERM is forwarded as SIGTERM: the processes save a checkpoint at the same step and exit.
set -euo pipefail
if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "local_multiprocess.sh needs bash >= 5.1 (wait -n -p), this is ${BASH_VERSION}" >&2
  exit 2
fi

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

nproc=2
ndev=4
port=""
log_dir=""
while getopts "n:d:p:l:h" opt; do
  case "$opt" in
    n) nproc="$OPTARG" ;;
    d) ndev="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) log_dir="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -ge 1 ]] || usage
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "error: -n $nproc is not a positive integer" >&2; exit 2; }
[[ "$ndev" =~ ^[1-9][0-9]*$ ]] || { echo "error: -d $ndev is not a positive integer" >&2; exit 2; }

python="${PYTHON:-python3}"
if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
if [[ -z "$log_dir" ]]; then
  log_dir="$(mktemp -d -t jaxpt-multiprocess.XXXXXX)"
fi
mkdir -p "$log_dir"

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${ndev}"

pids=()
forwarded=0
stop_all() {
  local sig="$1"
  for pid in "${pids[@]}"; do
    kill "-$sig" "$pid" 2>/dev/null || true
  done
}
# shellcheck disable=SC2329  # called by the trap below
forward() {
  forwarded=1
  stop_all TERM
}
trap forward INT TERM
trap 'stop_all KILL' EXIT

echo "local_multiprocess: ${nproc} processes x ${ndev} CPU devices, coordinator 127.0.0.1:${port}, logs of processes 1..$((nproc - 1)) in ${log_dir}" >&2
for ((i = 0; i < nproc; i++)); do
  cmd=("$python" -m jaxpt.cli train "$@"
       --coordinator "127.0.0.1:${port}" --num-processes "$nproc" --process-id "$i")
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"${log_dir}/process_${i}.log" 2>&1 &
  fi
  pids+=("$!")
done

status=0
remaining=${#pids[@]}
while ((remaining > 0)); do
  done_pid=""
  rc=0
  wait -n -p done_pid || rc=$?
  if [[ -z "${done_pid:-}" ]]; then
    ((rc != 127)) || break  # no children left
    continue  # woken by a forwarded signal, not by an exit
  fi
  remaining=$((remaining - 1))
  if ((rc != 0 && status == 0)); then
    status=$rc
    if ((!forwarded)); then
      echo "local_multiprocess: process exited with status ${rc}; stopping the others" >&2
      stop_all KILL
      for ((i = 1; i < nproc; i++)); do
        echo "--- process ${i} (last lines of ${log_dir}/process_${i}.log)" >&2
        tail -n 20 "${log_dir}/process_${i}.log" >&2 || true
      done
    fi
  fi
done
trap - EXIT
exit "$status"
