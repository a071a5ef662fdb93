"""Multi-process (multi-host) start-up through `jax.distributed`.

Every process of a multi-host job runs the same command. `initialize` must run before any
other JAX call: it connects the processes so that `jax.devices()` lists the devices of all of
them and collectives span hosts.
"""

import os
import socket
import time

import jax
import ml_collections
from absl import logging

from tce_jax import models

# Environment variables by which cluster launchers announce a multi-process job; JAX's
# `jax.distributed.initialize()` reads the rest (coordinator, process id) from them itself.
_CLUSTER_SIGNS = {
    "SLURM": ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"),
    "Open MPI": ("OMPI_COMM_WORLD_SIZE",),
}


class DistributedInitError(RuntimeError):
    """The processes of a multi-process job could not connect."""


def _cluster_wants_distributed() -> str | None:
    """The launcher whose environment asks for more than one process, if any."""
    for launcher, variables in _CLUSTER_SIGNS.items():
        for var in variables:
            if int(os.environ.get(var, "1") or "1") > 1:
                return launcher
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "TPU pod"
    return None


def initialize(config: ml_collections.ConfigDict) -> bool:
    """Calls `jax.distributed.initialize` when `config.distributed` or the environment asks.

    `config.distributed.mode`: "off" never, "on" always, "auto" when a coordinator address is
    configured or a launcher (SLURM, Open MPI, a multi-worker TPU slice) started several
    processes. Explicit `coordinator_address` / `num_processes` / `process_id` fields are
    passed on; empty ones are left to JAX's cluster auto-detection. Returns whether it ran.
    """
    cfg = config.distributed
    launcher = _cluster_wants_distributed()
    if cfg.mode == "off" or (
        cfg.mode == "auto" and not cfg.coordinator_address and launcher is None
    ):
        return False
    kwargs = {}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes > 0:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    logging.warning(
        "jax.distributed.initialize(%s) (launcher: %s, timeout %d s). If this process then "
        "aborts with DEADLINE_EXCEEDED or 'another task died', a peer did not arrive or died: "
        "see the other processes' logs.",
        kwargs,
        launcher or "none",
        cfg.initialization_timeout,
    )
    if cfg.coordinator_address and cfg.process_id > 0:
        # JAX aborts the whole process (uncatchably) when the coordinator never answers, so
        # check first that it can be reached, and fail with a message that says what to fix.
        wait_for_coordinator(cfg.coordinator_address, cfg.initialization_timeout)
    try:
        jax.distributed.initialize(
            initialization_timeout=cfg.initialization_timeout,
            heartbeat_timeout_seconds=cfg.heartbeat_timeout,
            **kwargs,
        )
    except Exception as e:  # JAX raises RuntimeError/ValueError/XlaRuntimeError here.
        raise DistributedInitError(
            f"jax.distributed.initialize({kwargs}) failed: {type(e).__name__}: {e}\n"
            "Check that every process runs the same command, that the coordinator address "
            "(config.distributed.coordinator_address, host:port of process 0) is reachable "
            "from every host, and that num_processes matches the processes launched."
        ) from e
    return True


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Waits until `address` (host:port) accepts TCP connections, or raises after `timeout` s."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedInitError(
                    f"Cannot reach the coordinator at {address} after {timeout:.0f} s ({e}). "
                    "Start process 0 (which hosts the coordinator) with the same "
                    "config.distributed.coordinator_address, check the host name and that the "
                    "port is open between hosts, or raise config.distributed."
                    "initialization_timeout."
                ) from e
            time.sleep(1.0)


def log_topology() -> None:
    """Prints, once per process, its index, its local devices and the global device count.

    Printed rather than logged: the CLI keeps absl logging at WARNING (Orbax and TFDS log every
    step at INFO), and a multi-host launch should show every process's view of the mesh.
    """
    print(
        f"[process {jax.process_index()} of {jax.process_count()}] "
        f"{jax.local_device_count()} local devices {[d.id for d in jax.local_devices()]}; "
        f"{jax.device_count()} devices in all ({jax.devices()[0].platform}).",
        flush=True,
    )


def warn_if_cpu_for_paper_scale(config: ml_collections.ConfigDict) -> bool:
    """Warns (logged and printed) when a DeepLabV3+ config is about to train on CPU.

    That is almost surely a JAX installed without its accelerator support (a plain
    `pip install jax` is CPU-only). Returns whether it warned.
    """
    if jax.default_backend() != "cpu" or not models.is_deeplab(config.model.name):
        return False
    message = (
        f"JAX runs on CPU, but config.model.name={config.model.name!r} is a paper-scale model "
        "(hours to days per run on accelerators, far longer on CPU). JAX's accelerator support is "
        "probably not installed: pip install -e '.[cuda12]' (NVIDIA GPU, CUDA 12; '.[cuda13]' "
        "for CUDA 13) or pip install -e '.[tpu]' (Cloud TPU VM); check with "
        "python -c 'import jax; print(jax.devices())'."
    )
    logging.warning(message)
    print(f"WARNING: {message}", flush=True)
    return True


def barrier(name: str) -> None:
    """Waits until every process gets here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
