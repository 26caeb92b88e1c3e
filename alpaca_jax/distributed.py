"""Multi-host start-up: `jax.distributed.initialize` from config or the usual environment.

Call `initialize` before anything touches JAX devices. With nothing configured it does nothing,
so single-process runs (a laptop, one GPU node driven by one process) need no setup. Sources,
in order: `distributed.coordinator_address` (+ num_processes, process_id) in the config; the
`JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` environment variables; and
`distributed.auto=true`, which lets JAX detect SLURM, Open MPI, TPU pods and similar clusters.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("alpaca_jax")


def initialize(dist_cfg) -> bool:
    """Join the process group if one is configured; returns whether it did."""
    address = dist_cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address is None and not dist_cfg.auto:
        return False
    if jax.distributed.is_initialized():  # a second run in the same process (notebooks, tests)
        return True
    if dist_cfg.cpu_collectives != "none":
        # CPU devices need an explicit collectives backend to talk across processes.
        jax.config.update("jax_cpu_collectives_implementation", dist_cfg.cpu_collectives)
    if address is None:
        jax.distributed.initialize()
    else:
        num = dist_cfg.num_processes if dist_cfg.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
        pid = dist_cfg.process_id if dist_cfg.process_id is not None else _env_int("JAX_PROCESS_ID")
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    log.info("process %d of %d; %d local of %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value is not None else None
