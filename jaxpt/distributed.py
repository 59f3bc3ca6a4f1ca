"""Multi-process JAX: one ``jaxpt train`` process per host (or per GPU), all started alike.

Every process runs the same command; :func:`initialize` connects them before any JAX
computation (``jaxpt train`` calls it first thing). How the processes find each other,
first match wins:

1. **Explicit**: ``--coordinator HOST:PORT --num-processes N --process-id I`` on the
   command line, else the run config's ``distributed:`` section (same keys:
   ``coordinator``, ``num_processes``, ``process_id``, optional ``local_device_ids``).
   All three or none. JAX's cluster auto-detection is then switched off, so
   ``local_device_ids`` unset means every local device (one process per node).
2. **Auto** (``distributed.auto: true``, the default), with nothing explicit:
   * Cloud TPU VM (``libtpu`` installed and ``/dev/accel*`` or ``/dev/vfio/N`` present) or
     GKE TPU (``TPU_WORKER_HOSTNAMES`` lists more than one host),
   * SLURM job step with more than one task (``srun``: ``SLURM_STEP_NODELIST`` set and
     ``SLURM_NTASKS`` > 1; JAX then gives each task one local device, ``SLURM_LOCALID``),
   * Open MPI with more than one rank (``OMPI_MCA_orte_hnp_uri`` set,
     ``OMPI_COMM_WORLD_SIZE`` > 1),

   call ``jax.distributed.initialize()`` and let JAX read the cluster's environment.
3. Otherwise: a single process, nothing to initialize.

What changes with several processes (``jax.process_count() > 1``):

* data: each process reads its rows of every global batch (``jaxpt.data.pipeline``), and
  ``put_batch`` assembles the global arrays with ``jax.make_array_from_process_local_data``;
  :func:`check_batch_layout` checks that process p's devices hold exactly block p of the
  batch rows (else the rows a process loads would land on another process's devices);
* metrics, ``config.yaml``, progress bars and summaries: process 0 only (:func:`is_primary`);
* checkpoints: orbax saves collectively (every process writes its shards, process 0 the
  metadata), so ``out_dir`` must be one filesystem shared by all hosts
  (:func:`check_shared_dir` fails early otherwise);
* preemption: SIGTERM on any host is propagated by JAX's preemption service; every process
  stops and saves at the same step (``multihost_utils.reached_preemption_sync_point``).

CPU processes (tests, ``launch/local_multiprocess.sh``) use gloo collectives: the default
of ``jax_cpu_collectives_implementation`` in jax 0.10, so nothing needs setting.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxpt import config as config_lib


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """The ``distributed:`` section of a run config (CLI flags take precedence)."""

    coordinator: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None  # None: every local device
    auto: bool = True  # detect Cloud TPU / SLURM / Open MPI when nothing is explicit
    initialization_timeout: int = 300  # seconds to wait for every process to connect


# `distributed:` is a config section; skip registering when config.py has it as a field.
if "distributed" not in config_lib._COMMON_FIELDS:
    config_lib.register_section("distributed", DistributedConfig)


@dataclasses.dataclass(frozen=True)
class InitPlan:
    """What :func:`initialize` will do: ``method`` is "single", "explicit" or an auto
    method ("tpu", "slurm", "ompi"); ``kwargs`` go to ``jax.distributed.initialize``."""

    method: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def settings_from(cfg_section: DistributedConfig | None = None, **cli) -> DistributedConfig:
    """The config section with every CLI value that is not None put over it."""
    base = cfg_section or DistributedConfig()
    given = {k: v for k, v in cli.items() if v is not None}
    if "local_device_ids" in given:
        given["local_device_ids"] = tuple(given["local_device_ids"])
    return dataclasses.replace(base, **given)


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env.get(key, "0"))
    except ValueError:
        return 0


def _on_cloud_tpu(env: Mapping[str, str]) -> bool:
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return True
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def detect_method(env: Mapping[str, str] | None = None) -> str | None:
    """The cluster environment this process runs in ("tpu", "slurm", "ompi"), or None
    for a single process."""
    env = os.environ if env is None else env
    if "SLURM_STEP_NODELIST" in env and _int_env(env, "SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    if _on_cloud_tpu(env):
        return "tpu"
    return None


def plan_init(settings: DistributedConfig, env: Mapping[str, str] | None = None) -> InitPlan:
    """Decide how to initialize (pure: reads ``env``, starts nothing)."""
    s = settings
    explicit = {
        "coordinator": s.coordinator,
        "num_processes": s.num_processes,
        "process_id": s.process_id,
    }
    given = [k for k, v in explicit.items() if v is not None]
    if given and len(given) < 3:
        missing = [k for k in explicit if k not in given]
        raise ValueError(
            f"distributed: {', '.join(given)} given without {', '.join(missing)}; set "
            "--coordinator, --num-processes and --process-id together (or the "
            "distributed.coordinator / num_processes / process_id config keys)"
        )
    if given:
        if ":" not in s.coordinator:
            raise ValueError(
                f"distributed.coordinator={s.coordinator!r} must be host:port "
                "(process 0's address and a free port)"
            )
        if s.num_processes < 1:
            raise ValueError(f"distributed.num_processes={s.num_processes} must be >= 1")
        if not 0 <= s.process_id < s.num_processes:
            raise ValueError(
                f"distributed.process_id={s.process_id} must be in [0, {s.num_processes})"
            )
        if s.num_processes == 1:
            return InitPlan("single")
        kwargs: dict[str, Any] = dict(
            coordinator_address=s.coordinator,
            num_processes=s.num_processes,
            process_id=s.process_id,
            cluster_detection_method="deactivate",
            initialization_timeout=s.initialization_timeout,
        )
        if s.local_device_ids is not None:
            kwargs["local_device_ids"] = list(s.local_device_ids)
        return InitPlan("explicit", kwargs)
    if not s.auto:
        return InitPlan("single")
    method = detect_method(env)
    if method is None:
        return InitPlan("single")
    kwargs = {"initialization_timeout": s.initialization_timeout}
    if s.local_device_ids is not None:
        kwargs["local_device_ids"] = list(s.local_device_ids)
    return InitPlan(method, kwargs)


def initialize(settings: DistributedConfig | None = None, *, verbose: bool = True) -> InitPlan:
    """Connect this process to the others (see the module doc); a no-op for a single
    process or when JAX is already initialized. Call before any JAX computation."""
    import jax

    plan = plan_init(settings or DistributedConfig())
    if plan.method == "single" or jax.distributed.is_initialized():
        return plan
    try:
        jax.distributed.initialize(**plan.kwargs)
    except (RuntimeError, ValueError) as e:
        raise RuntimeError(
            f"distributed ({plan.method}): jax.distributed.initialize failed: {e}. It must run "
            "before any JAX computation, with every process started and the coordinator "
            "reachable from all of them."
        ) from e
    if verbose and jax.process_index() == 0:
        print(
            f"distributed ({plan.method}): {jax.process_count()} processes, "
            f"{jax.device_count()} devices ({jax.local_device_count()} per process)",
            flush=True,
        )
    return plan


def is_primary() -> bool:
    """True on process 0, the one that writes metrics, configs and summaries."""
    import jax

    return jax.process_index() == 0


# ----------------------------------------------------------------------------- checks


def host_rows(x):
    """A jax.Array (maybe spread over several hosts' devices) as a numpy array holding
    every row, on every process (a collective there: every process must call it)."""
    import numpy as np

    if isinstance(x, np.ndarray) or getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_batch_layout(mesh, rules=None, *, process_count=None, process_of=None) -> None:
    """Raise unless the batch dimension is laid out by process: with P processes and the
    batch split into D shards over the mesh's batch axes, process p's devices must hold
    exactly rows [p*D/P, (p+1)*D/P) of every global batch (what the loaders give it).
    ``process_count`` / ``process_of(device)`` default to JAX's (tests pass others)."""
    import jax

    from jaxpt.sharding import TRAIN_RULES, batch_divisor, batch_sharding

    rules = rules or TRAIN_RULES
    n = jax.process_count() if process_count is None else process_count
    process_of = process_of or (lambda d: d.process_index)
    if n == 1:
        return
    shards = batch_divisor(mesh, rules)
    axes = rules["batch"]
    if shards % n:
        raise ValueError(
            f"the batch is split into {shards} shard(s) over mesh axes {axes} "
            f"({dict(mesh.shape)}), which do not divide over {n} processes: every process "
            "must hold whole batch shards of its own (raise mesh.data or mesh.fsdp)"
        )
    block = shards // n
    index_map = batch_sharding(mesh, 1, rules).devices_indices_map((shards,))
    for dev, (rows,) in index_map.items():
        start, stop, _ = rows.indices(shards)
        p = process_of(dev)
        if not (p * block <= start and stop <= (p + 1) * block):
            raise ValueError(
                f"device {dev} of process {p} holds batch rows [{start}, {stop}) of {shards}, "
                f"outside process {p}'s block [{p * block}, {(p + 1) * block}): the mesh "
                f"({dict(mesh.shape)}) splits the batch across processes in another order. "
                "Keep mesh.tensor within one host and order devices by process."
            )


def global_sum_fn(mesh, rules=None):
    """``f(local_value) -> replicated int32 scalar``: the sum over processes of one host
    number per process, computed on device (no host sync; fetch it later)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpt.sharding import TRAIN_RULES, batch_divisor, batch_sharding, replicated

    rules = rules or TRAIN_RULES
    shards = batch_divisor(mesh, rules)
    n = jax.process_count()
    sharding = batch_sharding(mesh, 1, rules)
    total = jax.jit(lambda x: jnp.sum(x), out_shardings=replicated(mesh))

    def f(value) -> jax.Array:
        local = np.zeros(shards // n, np.int32)
        local[0] = int(value)
        return total(jax.make_array_from_process_local_data(sharding, local, (shards,)))

    return f


def check_shared_dir(path: str | Path) -> None:
    """Raise (on every process) unless ``path`` is one filesystem shared by all processes:
    process 0 writes a token file that every other process must read back."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils as mh

    if jax.process_count() == 1:
        return
    path = Path(path)
    token = int(
        mh.broadcast_one_to_all(np.int32(secrets.randbelow(2**31 - 1) if is_primary() else 0))
    )
    marker = path / ".jaxpt_shared_dir_check"
    if is_primary():
        marker.write_text(str(token))
    mh.sync_global_devices("jaxpt_shared_dir_written")
    try:
        ok = marker.read_text().strip() == str(token)
    except OSError:
        ok = False
    oks = np.asarray(mh.process_allgather(np.int32(ok))).reshape(-1)
    mh.sync_global_devices("jaxpt_shared_dir_read")
    if is_primary():
        marker.unlink(missing_ok=True)
    bad = [i for i, v in enumerate(oks) if not v]
    if bad:
        raise ValueError(
            f"out_dir {path} is not shared by all {jax.process_count()} processes "
            f"(process(es) {bad} cannot read a file process 0 wrote there). Orbax writes one "
            "checkpoint collectively, so out_dir must be on a filesystem every host mounts "
            "(NFS, Filestore, a gcsfuse bucket)."
        )


def add_cli_flags(parser) -> None:
    """``--coordinator/--num-processes/--process-id/--local-device-ids`` on a parser."""
    g = parser.add_argument_group(
        "multi-process",
        "explicit multi-process setup (default: the config's distributed: section, else "
        "auto-detected on Cloud TPU, SLURM srun steps and Open MPI)",
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    g.add_argument(
        "--local-device-ids",
        type=lambda s: tuple(int(x) for x in s.split(",") if x.strip()),
        metavar="0,1,..",
        help="local devices this process uses (default: all)",
    )


def settings_from_args(cfg_section: DistributedConfig | None, args) -> DistributedConfig:
    return settings_from(
        cfg_section,
        coordinator=getattr(args, "coordinator", None),
        num_processes=getattr(args, "num_processes", None),
        process_id=getattr(args, "process_id", None),
        local_device_ids=getattr(args, "local_device_ids", None),
    )


__all__ = (
    "DistributedConfig",
    "InitPlan",
    "add_cli_flags",
    "check_batch_layout",
    "check_shared_dir",
    "detect_method",
    "global_sum_fn",
    "initialize",
    "is_primary",
    "plan_init",
    "settings_from",
    "settings_from_args",
)
