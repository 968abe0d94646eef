"""Data parallelism over a 1-D `data` mesh of all devices (all hosts).

Steps are `jax.jit` programs over global arrays: the batch is sharded along `data`, the
state is replicated, and XLA's partitioner inserts the cross-device reductions (gradient
means, batch-norm statistics, loss means). This is the `jit`-with-shardings form of data
parallelism that JAX recommends in place of `pmap`; each step is written once, as if for one
device, so the math is visibly independent of the device count. Multi-host runs use the same
code: every process feeds its share of each global batch.
"""
import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MAX_DEFAULT_CPU_DEVICES = 8


def use_cpu_cores() -> None:
  """Gives XLA one CPU device per usable core (a power of two, at most 8, so that the usual
  batch sizes divide), unless the count is set already (XLA_FLAGS'
  --xla_force_host_platform_device_count or JAX_NUM_CPU_DEVICES).

  XLA:CPU makes a single device by default, which uses several cores poorly; on this
  project's 2-core CPU, 2 devices run the teacher step 1.18x and the stage-1 iteration 1.49x
  faster (experiments/benchmarks/benchmarks.jsonl). Only the CPU backend is affected. Call it before
  JAX initializes its backends, and only in single-process runs: the processes of a
  multi-process run must agree on their device counts.
  """
  if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
      or jax.config.jax_num_cpu_devices >= 0):
    return
  cores = min(len(os.sched_getaffinity(0)), MAX_DEFAULT_CPU_DEVICES)
  jax.config.update("jax_num_cpu_devices", 1 << (cores.bit_length() - 1))


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_slice(global_batch: int) -> slice:
  """The rows of a global batch that this process feeds."""
  per_process = global_batch // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def global_batch(mesh, local_arrays):
  """Assembles global batch-sharded arrays from this process's rows (a pytree)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_arrays)


def replicate(mesh, tree):
  """Places a pytree (identical on every process) replicated on every device."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)
