"""Device mesh, data-parallel shardings and multi-host start-up (``jax.jit`` + ``NamedSharding``).

Data parallelism over one mesh axis ``'data'`` spanning every device of every
process:

* the global batch is sharded on its leading axis, ``NamedSharding(mesh, P('data'))``;
* the train state (params, BN statistics, optimizer state) is replicated,
  ``NamedSharding(mesh, P())``.

Because the model computes BatchNorm means and variances over the batch axis
of a *globally* sharded array, XLA inserts the cross-device reductions itself:
the statistics are those of the global batch, i.e. synchronised BN (the
official ``SYBN True``, spec §7) without any explicit ``pmean``. Gradients of
the (global-batch) loss are likewise all-reduced by XLA.

Multi-host: every process runs the same program; each feeds only its own
``batch_size // process_count`` rows (:func:`make_global_batch`), and
:func:`maybe_initialize_distributed` starts ``jax.distributed`` before any
other JAX call.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from asff_jax.errors import ConfigError

logger = logging.getLogger("asff_jax")
DATA_AXIS = "data"



def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all devices of all processes).

  Devices are ordered by (process index, id) so that each process owns a
  contiguous block of the batch axis.
  """
  devs = list(jax.devices() if devices is None else devices)
  devs.sort(key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devs), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of the train state: a full copy on every device."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading axis split over ``'data'``, other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def nearest_valid_batch(global_batch_size: int, num_devices: int) -> int:
  """The smallest multiple of ``num_devices`` that is ≥ ``global_batch_size`` (at least one per device)."""
  return max(1, -(-int(global_batch_size) // int(num_devices))) * int(num_devices)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Validates the global batch against the mesh and returns the per-process batch.

  Raises:
    ConfigError: if the global batch is not a multiple of the number of devices
      (the message names both and the nearest valid batch).
  """
  n = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % n:
    raise ConfigError(
        f"batch_size={global_batch_size} (global) must be a multiple of the number of devices ({n}): "
        f"use --config.batch_size={nearest_valid_batch(global_batch_size, n)}")
  return global_batch_size // jax.process_count()


def process_rows(global_batch_size: int) -> slice:
  """Rows of the global batch this process feeds (contiguous block ``process_index``)."""
  per = global_batch_size // jax.process_count()
  i = jax.process_index()
  return slice(i * per, (i + 1) * per)


def make_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                      global_batch_size: int) -> dict[str, jax.Array]:
  """Host numpy batch → globally sharded ``jax.Array``s of leading size ``global_batch_size``.

  ``batch`` may hold either the process-local rows (leading size
  ``global_batch_size // process_count``) or the whole global batch (then this
  process's rows, :func:`process_rows`, are taken). In a single process both
  are the same.

  Raises:
    ValueError: if the leading size is neither.
  """
  sharding = data_sharded(mesh)
  local = global_batch_size // jax.process_count()
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.shape[0] == global_batch_size and local != global_batch_size:
      v = v[process_rows(global_batch_size)]
    elif v.shape[0] != local:
      raise ValueError(f"batch[{k!r}] has leading size {v.shape[0]}; expected the process-local "
                       f"batch {local} or the global batch {global_batch_size}")
    out[k] = jax.make_array_from_process_local_data(sharding, v, (global_batch_size, *v.shape[1:]))
  return out


def to_host(tree: Any) -> Any:
  """Replicated (or fully addressable) arrays → numpy, valid on every process."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def _multi_host_tpu_type(accelerator_type: str) -> bool:
  """``'v4-32'`` → True: Cloud TPU types whose core/chip count exceeds one host's (8)."""
  try:
    return int(accelerator_type.rsplit("-", 1)[1]) > 8
  except (IndexError, ValueError):
    return False


def cluster_environment(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
  """The cluster manager that launched this process as one of several, or None.

  Recognised (the environments ``jax.distributed.initialize()`` configures
  itself in): Slurm (``SLURM_JOB_ID`` with ``SLURM_NTASKS`` > 1), Open MPI
  (``OMPI_MCA_orte_hnp_uri`` or ``OMPI_COMM_WORLD_SIZE`` > 1), PMI
  (``PMI_SIZE`` > 1), GKE TPU slices (``TPU_WORKER_HOSTNAMES`` with several
  hosts, or ``MEGASCALE_COORDINATOR_ADDRESS``), Cloud TPU VM pods
  (``TPU_ACCELERATOR_TYPE`` larger than one host, e.g. ``v4-32``), and
  ``JAX_NUM_PROCESSES`` > 1; ``ASFF_JAX_DISTRIBUTED=1`` forces it.
  """
  env = os.environ if environ is None else environ

  def more_than_one(key):
    try:
      return int(env.get(key, "1")) > 1
    except ValueError:
      return False

  if env.get("ASFF_JAX_DISTRIBUTED", "") == "1":
    return "forced"
  if "SLURM_JOB_ID" in env and more_than_one("SLURM_NTASKS"):
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env or more_than_one("OMPI_COMM_WORLD_SIZE"):
    return "openmpi"
  if more_than_one("PMI_SIZE"):
    return "pmi"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1 or (
      "MEGASCALE_COORDINATOR_ADDRESS" in env):
    return "gke_tpu"
  if _multi_host_tpu_type(env.get("TPU_ACCELERATOR_TYPE", "")):
    return "cloud_tpu_pod"
  if more_than_one("JAX_NUM_PROCESSES"):
    return "jax_env"
  return None


def distributed_init_args(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                          process_id: Optional[int] = None,
                          environ: Optional[Mapping[str, str]] = None) -> Optional[dict]:
  """Keyword arguments for ``jax.distributed.initialize``, or None for a single process.

  * any of the three flags given → exactly those (the cluster environment may supply the rest);
  * none given but :func:`cluster_environment` recognises a cluster → ``{}``:
    ``initialize()`` with no arguments, JAX's own auto-detection;
  * otherwise None (nothing to initialise).
  """
  if coordinator_address or num_processes is not None or process_id is not None:
    return {"coordinator_address": coordinator_address, "num_processes": num_processes,
            "process_id": process_id}
  return {} if cluster_environment(environ) is not None else None


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None,
                                 environ: Optional[Mapping[str, str]] = None) -> bool:
  """Starts ``jax.distributed`` when running as one of several processes (:func:`distributed_init_args`).

  Must be called before any other JAX call that touches devices.

  Returns:
    True if ``jax.distributed.initialize`` was called.
  """
  kwargs = distributed_init_args(coordinator_address, num_processes, process_id, environ)
  if kwargs is None:
    return False
  logger.info("jax.distributed.initialize(%s) (%s)", ", ".join(f"{k}={v}" for k, v in kwargs.items()),
              cluster_environment(environ) or "flags")
  jax.distributed.initialize(**kwargs)
  return True
