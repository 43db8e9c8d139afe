"""Orbax CheckpointManager wrapper: the train state as one pytree, restored onto any mesh.

Every process calls save (orbax coordinates the hosts and writes each shard once). Restore
takes the abstract state with the shardings of the current mesh, so a checkpoint saved on 8
devices restores on 1 and the reverse.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           read_only=read_only,
                                           enable_async_checkpointing=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[int, Any]:
    """Restores ``step`` (default: newest) with the shardings of ``abstract_state``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
    state = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    logging.info("restored checkpoint %d from %s", step, self.directory)
    return step, state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
