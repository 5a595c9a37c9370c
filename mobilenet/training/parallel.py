"""Devices, hosts and shardings: data parallelism over a one-axis mesh.

Every device holds a full replica of the state and a slice of the global
batch; `jax.jit` with these shardings lets XLA insert the gradient and
BatchNorm all-reduces, on one CPU, many GPUs, or a multi-host TPU slice.
"""
import functools

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mobilenet.errors import UserError

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins a multi-host run through JAX's own distributed runtime.

  With no arguments JAX detects the cluster (Cloud TPU, SLURM, Open MPI ...);
  on CPU the cross-process collectives go through gloo (JAX's default).
  """
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info('process %d of %d; %d local and %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def create_mesh(devices=None) -> Mesh:
  """A mesh over `devices` (default: every device of every host), along the data axis."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, field: str) -> None:
  """The global batch must split evenly over hosts and devices."""
  devices, hosts = jax.device_count(), jax.process_count()
  if batch_size % devices or batch_size % hosts:
    raise UserError(
        f'config.{field}={batch_size} does not divide over {devices} devices on {hosts} hosts; '
        f'pass --config.{field}=<a multiple of {devices}>')


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each host's slice of the batch into one global, sharded array per key."""
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local_batch.items()}


def on_mesh(mesh: Mesh, fun):
  """`fun` traced with `mesh` as the context mesh, for `jax.jit` with shardings on `mesh`.

  The custom kernels (ops/cpu/calls.py) read the context mesh to run on each
  device's shard of the batch instead of the gathered global batch; setting it
  inside the traced function (not with `jax.set_mesh` around the call, which is
  per thread) holds wherever the step is traced.
  """
  @functools.wraps(fun)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fun(*args, **kwargs)
  return traced
