"""Orbax CheckpointManager wrapper: the train state as one pytree, restored onto any mesh.

Every process calls save (orbax coordinates the hosts and writes each shard once). Restore
takes the abstract state with the shardings of the current mesh, so a checkpoint saved on 8
devices restores on 1 and the reverse. A save in progress lives under a temporary name that
orbax ignores, so a run killed mid-save resumes from the previous checkpoint; a finalised
checkpoint that cannot be read (truncated or missing files) is moved aside to
``checkpoints/corrupt/`` with a warning naming it, and the previous one is used. Nothing is
deleted.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging


@dataclasses.dataclass
class Weights:
  """The weights of one checkpoint that evaluation and mapping need; either may be None
  when it was not asked for."""
  step: int
  params: Any = None
  ema: Any = None


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

  def restore_latest_valid(self, abstract_state: Any) -> tuple[Optional[int], Any]:
    """The newest checkpoint that restores, or (None, None) when there is none."""
    while True:
      step = self.latest_step()
      if step is None:
        return None, None
      try:
        return self.restore(abstract_state, step)
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        moved = self.quarantine(step)
        logging.warning("checkpoint %d in %s cannot be restored (%s: %s); moved it to %s "
                        "and trying the previous one", step, self.directory,
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "",
                        moved)
        print(f"flowmap: warning: checkpoint {step} is damaged ({type(e).__name__}); "
              f"moved to {moved}, resuming from an earlier one", flush=True)

  def quarantine(self, step: int) -> str:
    """Moves a damaged checkpoint out of orbax's sight (process 0), keeping its files."""
    import jax
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, "corrupt", f"{step}.{int(time.time())}")
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      os.replace(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"quarantine-{step}")
    self.manager.reload()
    return dst

  def restore_weights(self, abstract: dict, step: Optional[int] = None) -> "Weights":
    """Only the named entries of the train state (``{"ema": shapes}``, or params and ema),
    each placed with the sharding its ShapeDtypeStruct carries, at ``step`` (default:
    newest); the optimizer state stays on disk. What evaluation and the Mapper use."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"it has {self.all_steps()}")
    restored = self.manager.restore(step, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
    return Weights(int(step), restored.get("params"), restored.get("ema"))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
