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

logger = logging.getLogger("asff_jax")
DATA_AXIS = "data"

# Environment variables that mean "a cluster manager launched us as one of several
# processes": jax.distributed.initialize() can then find everything itself.
_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JAX_NUM_PROCESSES")


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


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Validates the global batch against the mesh and returns the per-process batch.

  Raises:
    ValueError: if the global batch is not a multiple of the number of devices.
  """
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(f"batch_size={global_batch_size} (global) must be a multiple of the "
                     f"number of devices ({n})")
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


def looks_like_managed_cluster(environ: Optional[Mapping[str, str]] = None) -> bool:
  """True if a cluster manager (Slurm, Open MPI, PMI, or ``JAX_NUM_PROCESSES``) launched >1 process.

  TPU pods and GKE are detected by ``jax.distributed.initialize()`` itself; set
  ``--coordinator_address`` etc. explicitly elsewhere.
  """
  env = os.environ if environ is None else environ
  for key in _CLUSTER_ENV:
    try:
      if int(env.get(key, "1")) > 1:
        return True
    except ValueError:
      continue
  return False


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None,
                                 environ: Optional[Mapping[str, str]] = None) -> bool:
  """Starts ``jax.distributed`` when running as one of several processes.

  * Any of the three arguments given → ``jax.distributed.initialize(coordinator_address,
    num_processes, process_id)`` (all three are needed unless the cluster
    environment supplies the rest).
  * None given but :func:`looks_like_managed_cluster` → ``jax.distributed.initialize()``
    with no arguments: JAX's own cluster detection (Slurm, Open MPI, …) fills them in.
  * Otherwise nothing is done (single process).

  Must be called before any other JAX call that touches devices.

  Returns:
    True if ``jax.distributed.initialize`` was called.
  """
  if coordinator_address or num_processes is not None or process_id is not None:
    logger.info("jax.distributed.initialize(%s, num_processes=%s, process_id=%s)",
                 coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True
  if looks_like_managed_cluster(environ):
    logger.info("managed cluster detected: jax.distributed.initialize() with auto-detection")
    jax.distributed.initialize()
    return True
  return False
