"""jaxpt: JAX-native post-training for language models."""

import os as _os

__version__ = "0.1.0"


def _serialize_cpu_collectives() -> None:
    """Several CPU devices in one process (``--xla_force_host_platform_device_count=N``:
    the CPU sharding tests, ``launch/local_multiprocess.sh``) run their collectives on one
    small shared thread pool. XLA:CPU's concurrency-optimized scheduler lets independent
    collectives start in different orders on different devices, and once every thread
    waits in one rendezvous the devices that are owed another never get there: an 8-device
    FSDP train step deadlocked this way. Its memory-optimized schedule keeps one order.
    Set before JAX starts its CPU backend (importing jaxpt first is enough); an explicit
    setting of the flag is left alone."""
    flags = _os.environ.get("XLA_FLAGS", "")
    flag = "--xla_cpu_enable_concurrency_optimized_scheduler"
    if "xla_force_host_platform_device_count" not in flags or flag in flags:
        return
    for part in flags.split():
        if part.startswith("--xla_force_host_platform_device_count="):
            count = part.split("=", 1)[1]
            if count.isdigit() and int(count) > 1:
                _os.environ["XLA_FLAGS"] = f"{flags} {flag}=false"
            return


_serialize_cpu_collectives()
