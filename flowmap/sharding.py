"""Mesh, shardings and multi-host start-up. Strategy is data in the config (``config.mesh``).

The mesh has axes ('data', 'fsdp'). The batch is split over both axes; every parameter,
optimizer moment and EMA copy is split over 'fsdp' along its largest dimension that the axis
divides (small arrays stay replicated). With fsdp = 1 everything is replicated and the mesh
is plain data parallelism.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2 ** 14   # arrays with fewer elements are replicated: sharding them saves
                          # nothing and adds a collective


def initialize_distributed(coordinator: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Starts JAX's multi-controller runtime when more than one process is configured.

  Under SLURM (several tasks) ``jax.distributed.initialize()`` finds everything itself;
  other launchers pass the coordinator address, process count and id explicitly.
  """
  if jax.distributed.is_initialized():
    return
  if coordinator or num_processes > 1:
    jax.distributed.initialize(coordinator_address=coordinator or None,
                               num_processes=num_processes or None,
                               process_id=None if process_id < 0 else process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ:
    jax.distributed.initialize()


def mesh_shape(mesh_cfg, device_count: int) -> tuple[int, int]:
  data, fsdp = int(mesh_cfg.data), int(mesh_cfg.fsdp)
  if fsdp == -1 and data == -1:
    raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
  if fsdp == -1:
    fsdp = device_count // data
  if data == -1:
    data = device_count // fsdp
  if data < 1 or fsdp < 1 or data * fsdp != device_count:
    raise ValueError(f"mesh data={mesh_cfg.data} x fsdp={mesh_cfg.fsdp} does not cover the "
                     f"{device_count} devices")
  return data, fsdp


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  devices = list(devices if devices is not None else jax.devices())
  data, fsdp = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp: int) -> P:
  """Shard the largest dimension divisible by the fsdp axis size; replicate the rest."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), abstract_state)


def global_batch(local: dict, mesh) -> dict:
  """Builds globally sharded arrays from this process's share of the batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
