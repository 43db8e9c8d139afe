"""Mesh, shardings and multi-host start-up. Strategy is data in the config (``config.mesh``).

The mesh has axes ('data', 'fsdp'). The batch is split over both axes; every parameter,
optimizer moment and EMA copy is split over 'fsdp' along its largest dimension that the axis
divides (small arrays stay replicated). With fsdp = 1 everything is replicated and the mesh
is plain data parallelism. 'fsdp' is the inner axis of the mesh, so its devices are
neighbours (one host, or one NVLink island): the parameter all-gathers that FSDP adds run
over the fastest links, and only the gradient all-reduce over 'data' crosses hosts.

Each process's devices form one contiguous block of the mesh, in process order, so process p
holds the p-th contiguous block of rows of every global batch; the input pipeline
(``data.train_batches``) and the evaluator rely on that.
"""

from __future__ import annotations

import glob
import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from flowmap.config import ConfigError

BATCH_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2 ** 14   # arrays with fewer elements are replicated: sharding them saves
                          # nothing and adds a collective
SCANNED = "blocks"        # parameters under this name are stacked over the layers and
                          # scanned; their leading axis is never sharded (a scan step must
                          # not need a slice that lives on other devices)


def initialize_distributed(coordinator: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Starts JAX's multi-controller runtime when more than one process is configured.

  Under SLURM, inside an ``srun`` step of several tasks, ``jax.distributed.initialize()``
  reads the coordinator, process count and id from the environment (it needs the step's
  variables: a bare batch script is one process and starts nothing). Other launchers pass
  the three explicitly. Must run before JAX touches a device.
  """
  if jax.distributed.is_initialized():
    return
  if coordinator or num_processes > 1:
    if not coordinator or num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(
          "multi-process start needs all of --coordinator_address=HOST:PORT, "
          f"--num_processes=N and --process_id in [0, N); got {coordinator!r}, "
          f"{num_processes}, {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in os.environ:
    jax.distributed.initialize(local_device_ids=_slurm_node_gpus())


def _slurm_node_gpus() -> Optional[list[int]]:
  """Every GPU of the node when the SLURM step runs one task per node, else None.

  Left alone, jax.distributed gives a SLURM task only the GPU numbered by its SLURM_LOCALID
  (one process per GPU); with one task per node, the layout flowmap documents, all but one
  GPU of every node would sit idle. With several tasks per node JAX's choice is right.
  """
  if os.environ.get("SLURM_NTASKS") != os.environ.get("SLURM_STEP_NUM_NODES"):
    return None
  visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
  count = (int(os.environ.get("SLURM_GPUS_ON_NODE") or 0)
           or len([d for d in visible.split(",") if d.strip()])
           or len(glob.glob("/dev/nvidia[0-9]*")))
  return list(range(count)) or None


def mesh_shape(mesh_cfg, device_count: int) -> tuple[int, int]:
  data, fsdp = int(mesh_cfg.data), int(mesh_cfg.fsdp)
  if fsdp == -1 and data == -1:
    raise ConfigError("mesh.data and mesh.fsdp cannot both be -1")
  if fsdp == -1:
    fsdp = device_count // data if data > 0 else 0
  if data == -1:
    data = device_count // fsdp if fsdp > 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != device_count:
    raise ConfigError(f"mesh.data={mesh_cfg.data} x mesh.fsdp={mesh_cfg.fsdp} does not cover "
                      f"the {device_count} devices: their product must equal the device count "
                      "(-1 takes what the other axis leaves)")
  return data, fsdp


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The ('data', 'fsdp') mesh over ``devices`` (default: every device of every process).

  Axes are Auto (GSPMD): the compiler inserts the FSDP all-gathers and reduce-scatters.
  Explicit axes, the default of ``jax.make_mesh``, would reject a matmul whose operands are
  both split over 'fsdp' (the batch and a parameter) instead of gathering the parameter.
  """
  devices = list(devices if devices is not None else jax.devices())
  data, fsdp = mesh_shape(mesh_cfg, len(devices))
  mesh = jax.make_mesh((data, fsdp), BATCH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  owners = [d.process_index for d in mesh.devices.flat]
  if owners != sorted(owners):
    raise ConfigError(f"the mesh does not give each process a contiguous block of devices "
                      f"(process of each mesh position: {owners})")
  return mesh


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp: int, skip_axes=()) -> P:
  """Shard the largest dimension divisible by the fsdp axis size (never one in
  ``skip_axes``); replicate the rest, and small arrays altogether."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if axis not in skip_axes and shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def _is_scanned(path) -> bool:
  return any(getattr(k, "key", getattr(k, "name", None)) == SCANNED for k in path)


def state_shardings(abstract_state, mesh):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs): optimizer moments and EMA
  get exactly their parameter's sharding, since they have its shape and path suffix."""
  fsdp = mesh.shape["fsdp"]

  def spec(path, x):
    skip = (0,) if _is_scanned(path) else ()
    return NamedSharding(mesh, fsdp_spec(x.shape, fsdp, skip))
  return jax.tree_util.tree_map_with_path(spec, abstract_state)


def placed(abstract_tree, mesh):
  """ShapeDtypeStructs carrying the shardings of ``state_shardings``: what a restore fills
  in place, so nothing is held twice or gathered."""
  shardings = state_shardings(abstract_tree, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def global_batch(local: dict, mesh) -> dict:
  """Builds globally sharded arrays from this process's block of rows of the batch; with one
  process, ``local`` is the whole batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
