#!/usr/bin/env bash
# Train on the GPUs of this machine: one process drives every visible GPU (single host, no
# jax.distributed), the batch and the weights sharded over them by the config's mesh
# (mesh.fsdp=-1, the default, spreads over all of them).
#
#   launch/gpu_local.sh [-g GPU_IDS] CONFIG [key.sub=value ...]
#
#   -g  comma-separated GPU ids to use (default: all; sets CUDA_VISIBLE_DEVICES)
# Environment: PYTHON (default python3) runs `$PYTHON -m jaxpt.cli`; needs jaxpt[cuda]
# (pip install -e ".[cuda]"). Extra XLA flags can be passed in XLA_FLAGS as usual.
#
# Ctrl-C / SIGTERM reach the trainer: it saves a checkpoint and exits; running the same
# command again resumes from it.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

while getopts "g:h" opt; do
  case "$opt" in
    g) export CUDA_VISIBLE_DEVICES="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -ge 1 ]] || usage

python="${PYTHON:-python3}"
if ! command -v nvidia-smi >/dev/null; then
  echo "gpu_local.sh: nvidia-smi not found: no NVIDIA driver on this machine" >&2
  exit 1
fi
# Fail before loading data and weights when JAX cannot see a GPU.
if ! "$python" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  echo "gpu_local.sh: JAX does not see a GPU; install the CUDA build: pip install -e \".[cuda]\"" >&2
  exit 1
fi
ngpu="$("$python" -c 'import jax; print(jax.local_device_count())')"
echo "gpu_local.sh: ${ngpu} GPU(s) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all})" >&2

# Let XLA take most of GPU memory up front (no fragmentation from on-demand growth), and
# overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

exec "$python" -m jaxpt.cli train "$@"
