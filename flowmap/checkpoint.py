"""Orbax CheckpointManager wrapper: the train state as one pytree, restored onto any mesh.

Every process calls save (orbax coordinates the hosts and writes each shard once). Restore
takes the abstract state with the shardings of the current mesh, so a checkpoint saved on 8
devices restores on 1 and the reverse. A save in progress lives under a temporary name that
orbax ignores, so a run killed mid-save resumes from the previous checkpoint.

A restore that fails is judged before anything is touched. Only damage that is positively
identified (files of that step missing or truncated: the storage layer's NOT_FOUND,
OUT_OF_RANGE and DATA_LOSS errors on a file under the step's directory) moves the checkpoint
aside to ``checkpoints/corrupt/`` and tries the previous one; nothing is deleted. Any other
error (a transient filesystem error, memory, a state tree that changed with a library
upgrade) stops the run and moves nothing. Once a workdir held checkpoints, training never
starts afresh by itself. With several processes, every host reports its outcome and all take
the worst one, so no host is left waiting in a barrier the others never reach.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from flowmap.config import ConfigError

# Outcomes of one restore attempt, ordered: every host acts on the largest any host saw.
RESTORED, DAMAGED, FAILED = 0, 1, 2
# Storage-layer status codes that mean "a file is not there, or shorter than it should be".
DAMAGE_CODES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS")
REQUIRED_FILES = ("_CHECKPOINT_METADATA", os.path.join("default", "_METADATA"))
SELECTED_DIR = "selected"   # train.select_rows: the kept EMA weights, one step


@dataclasses.dataclass
class Weights:
  """The weights of one checkpoint that evaluation and mapping need; either may be None
  when it was not asked for."""
  step: int
  params: Any = None
  ema: Any = None


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False,
               subdir: str = "checkpoints", asynchronous: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, subdir))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           read_only=read_only,
                                           enable_async_checkpointing=asynchronous
                                           and not read_only)
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
    """The newest checkpoint that restores, or (None, None) when the workdir never held one.

    Raises ConfigError, moving nothing, when a restore fails for any reason but identified
    damage, and when every checkpoint turned out damaged."""
    warned = False
    while True:
      step = self.latest_step()
      if step is None:
        if self.quarantined():
          raise ConfigError(
              f"every checkpoint in {self.directory} is damaged (moved to "
              f"{os.path.join(self.directory, 'corrupt')}); flowmap does not start a run over "
              "by itself: to start over on purpose, move that checkpoints/ folder away or use "
              "a new --workdir")
        return None, None
      outcome, state, error = self._attempt(abstract_state, step)
      outcome = agree(outcome)
      if outcome == RESTORED:
        return step, state
      if outcome == FAILED:
        reason = _first_line(error) if error is not None else "failed on another process"
        raise ConfigError(
            f"cannot restore checkpoint {step} in {self.directory}: {reason}; nothing was "
            "moved or deleted (if the cause is transient, run the same command again)")
      moved = self.quarantine(step)
      if jax.process_index() == 0:
        logging.warning("checkpoint %d in %s is damaged (%s); moved it to %s", step,
                        self.directory, _first_line(error) if error else "", moved)
        if not warned:
          print(f"flowmap: warning: checkpoint {step} is damaged "
                f"({_first_line(error)[:160] if error else 'on another process'}); moved to "
                f"{moved}, resuming from an earlier one", flush=True)
        warned = True
      del state

  def _attempt(self, abstract_state: Any, step: int):
    """(outcome, state or None, exception or None) of restoring ``step`` on this process."""
    step_dir = os.path.join(self.directory, str(step))
    missing = [f for f in REQUIRED_FILES if not os.path.exists(os.path.join(step_dir, f))]
    if missing:
      return DAMAGED, None, FileNotFoundError(f"{missing[0]} is missing")
    try:
      return RESTORED, self.restore(abstract_state, step)[1], None
    except Exception as e:  # judged below: only identified damage is treated as damage
      return (DAMAGED if is_damage(e, step_dir) else FAILED), None, e

  def quarantined(self) -> list[str]:
    corrupt = os.path.join(self.directory, "corrupt")
    return sorted(os.listdir(corrupt)) if os.path.isdir(corrupt) else []

  def quarantine(self, step: int) -> str:
    """Moves a damaged checkpoint out of orbax's sight (process 0), keeping its files."""
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


def is_damage(error: BaseException, step_dir: str) -> bool:
  """True when ``error`` says that a file under ``step_dir`` is missing or truncated."""
  text = str(error)
  names_step = os.path.abspath(step_dir) in text
  if isinstance(error, FileNotFoundError):
    return names_step or (error.filename is not None and
                          os.path.abspath(str(error.filename)).startswith(
                              os.path.abspath(step_dir)))
  return names_step and any(code in text for code in DAMAGE_CODES)


def agree(outcome: int) -> int:
  """The worst outcome over every process (this one's alone with one process)."""
  if jax.process_count() == 1:
    return outcome
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.asarray(outcome, np.int32))))


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def restore_selected(workdir: str, abstract_ema) -> Weights:
  """The EMA weights ``train.select_rows`` kept (``abstract_ema``: their shapes, placed)."""
  if not os.path.isdir(os.path.join(workdir, SELECTED_DIR)):
    raise ConfigError(f"{workdir} has no selected weights: train with train.select_rows > 0")
  loader = Checkpointer(workdir, read_only=True, subdir=SELECTED_DIR)
  try:
    if loader.latest_step() is None:
      raise ConfigError(f"{workdir} has no selected weights: train with train.select_rows > 0")
    return loader.restore_weights({"ema": abstract_ema})
  finally:
    loader.close()
