"""Mapper: a trained run as a function from raw source features to raw target features.

  from flowmap import Mapper, load_features
  feats = load_features("data/feats", split="validation", limit=256)
  m = Mapper.from_workdir("runs/x")                  # newest checkpoint, EMA weights
  y = m.map(feats["eva"], steps=8, solver="heun")    # np.ndarray in the raw target space

A Mapper reads the run's ``config.json`` and ``normalization.json`` and restores only the
weights it uses from the orbax checkpoint; it never imports TensorFlow or PyTorch. The noise
of row i of a call is drawn on the device from (seed, i), so a row maps to the same output
whatever the batch size, the number of rows in the call, or the number of devices.

``flowmap.export`` (``main.py --mode map``) maps a whole features dataset with it.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import ml_collections
import numpy as np

from flowmap import checkpoint as checkpoint_lib
from flowmap import data as data_lib
from flowmap import flow
from flowmap import sampling
from flowmap import sharding
from flowmap import workdir as workdir_lib


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


class Mapper:
  """Maps raw source features [n, tokens, dim] to raw target features with the ODE sampler.

  Attributes users read: ``source``/``target`` (feature names), ``source_shape``,
  ``target_shape``, ``step``, ``ema``, ``config`` (the run's ConfigDict), ``data_dir``,
  ``dtype`` (the compute dtype ``model.dtype`` resolved to here: float32 or bfloat16).
  """

  def __init__(self, graphdef, params, config, spec: workdir_lib.RunSpec, mesh, step: int,
               ema: bool, workdir: str = ""):
    self.graphdef, self.params, self.config, self.spec = graphdef, params, config, spec
    model_cfg = spec.model_cfg
    self.model_cfg, self.normalizers, self.mesh = model_cfg, spec.normalizers, mesh
    self.step, self.ema, self.workdir = step, ema, workdir
    self.source, self.target = config.data.source, config.data.target
    self.source_shape = tuple(model_cfg.source_shape)
    self.target_shape = tuple(model_cfg.target_shape)
    self.dtype = model_cfg.dtype
    self._samplers = {}

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None, ema: bool = True,
                   devices=None, selected: bool = False) -> "Mapper":
    """The run in ``workdir`` at checkpoint ``step`` (default: newest), with its EMA weights
    (``ema=False``: the raw training weights), replicated over ``devices`` (default: this
    process's devices), batches split between them. ``selected=True``: the EMA weights that
    ``train.select_rows`` kept (the best mean on the held-out training rows)."""
    config = workdir_lib.read_config(workdir)
    spec = workdir_lib.read_spec(workdir, config)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}),
                              devices if devices is not None else jax.local_devices())
    graphdef, shapes = sampling.abstract_model(spec.model_cfg, config.get("seed", 0))
    which = "ema" if ema else "params"
    replicated = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
        shapes)
    if selected:
      if step is not None or not ema:
        raise ValueError("selected=True loads the kept EMA weights: leave step and ema alone")
      weights = checkpoint_lib.restore_selected(workdir, replicated)
    else:
      checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
      try:
        weights = checkpointer.restore_weights({which: replicated}, step)
      finally:
        checkpointer.close()
    return cls(graphdef, getattr(weights, which), config, spec, mesh, weights.step, ema,
               workdir)

  @property
  def data_dir(self) -> str:
    """The features dataset the run was trained on (the demo's lives in the workdir)."""
    return self.config.data.dir or os.path.join(self.workdir, "data")

  def __repr__(self) -> str:
    return (f"Mapper({self.source} {self.source_shape} -> {self.target} {self.target_shape}, "
            f"step {self.step}, {'EMA' if self.ema else 'raw'} weights, {self.dtype}, "
            f"{self.mesh.devices.size} device(s))")

  def _sampler(self, solver: str, guidance: float, mode: str = "sample", draw: int = 0):
    key = (solver, guidance, mode, draw)
    if key not in self._samplers:
      self._samplers[key] = sampling.make_row_sampler(
          self.graphdef, self.target_shape, solver, guidance, mode, draw,
          int(self.config.eval.get("mean_draws", 4)),
          self.config.flow.get("objective", "flow"))
    return self._samplers[key]

  def check_guidance(self, guidance: float) -> None:
    if guidance != 1.0 and not self.config.flow.get("cond_dropout", 0.0) > 0:
      raise ValueError(f"guidance {guidance} needs the unconditional velocity, but this run "
                       "was trained with flow.cond_dropout = 0; use guidance=1")

  def map(self, x, steps: Optional[int] = None, solver: Optional[str] = None,
          guidance: Optional[float] = None, seed: int = 0, batch_size: int = 256,
          first_row: int = 0, mode: str = "sample", num_samples: int = 1):
    """Raw target features [n, *target_shape] (float32) for raw source features
    [n, *source_shape] (one [*source_shape] row gives one [*target_shape] row).

    ``mode``: ``sample`` (default), a sample of the target given the source, the ODE solution
    from noise; or ``mean``, an estimate of E[target | source] (``eval.mean_draws`` one-step
    estimates averaged). Pointwise figures (cosine, MSE, retrieval) favour the mean; use
    samples where the spread of real features matters.
    ``steps`` counts model evaluations of a sample, as ``eval.steps`` does (heun: 2 per
    step, so even); ``steps``, ``solver`` and ``guidance`` default to the run's ``eval``
    config. ``num_samples`` = K > 1 returns ``(samples [n, K, *target_shape], spread [n,
    tokens])``: K samples per row and, per token, the RMS over dims of their standard
    deviation, in the raw target space: tokens a downstream model should not trust spread
    most. The noise of row i (and of its k-th sample) depends only on (seed, first_row + i,
    k), so mapping an array in pieces (passing each piece's ``first_row``) equals mapping it
    whole; ``batch_size`` only trades memory for speed. Each batch shape compiles once.
    """
    e = self.config.eval
    solver = solver or e.solver
    evaluations = int(steps or e.steps)
    guidance = float(e.guidance if guidance is None else guidance)
    self.check_guidance(guidance)
    if mode not in ("sample", "mean"):
      raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
    if num_samples < 1 or (mode == "mean" and num_samples != 1):
      raise ValueError(f"num_samples must be >= 1 (and 1 for the mean), got {num_samples}")
    x = np.asarray(x, np.float32)
    single = x.ndim == len(self.source_shape)
    if single:
      x = x[None]
    if x.shape[1:] != self.source_shape:
      raise ValueError(f"expected raw {self.source} features of shape [n, "
                       f"{', '.join(map(str, self.source_shape))}], got {list(x.shape)}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= seed < 2 ** 31:
      raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    if not 0 <= first_row or first_row + len(x) >= 2 ** 31:
      raise ValueError(f"first_row must be in [0, 2**31 - n), got {first_row}")
    draws = [self._map(x, solver, evaluations, guidance, seed, batch_size, first_row, mode,
                       draw) for draw in range(num_samples)]
    if num_samples == 1:
      return draws[0][0] if single else draws[0]
    samples = np.stack(draws, 1)
    spread = np.sqrt(np.mean(np.var(samples, axis=1, ddof=1), axis=-1))
    return (samples[0], spread[0]) if single else (samples, spread)

  def _map(self, x, solver, evaluations, guidance, seed, batch_size, first_row, mode,
           draw) -> np.ndarray:
    n = len(x)
    out = np.empty((n, *self.target_shape), np.float32)
    if n == 0:
      return out
    fn = self._sampler(solver, guidance, mode, draw)
    steps = np.int32(flow.steps_for_evaluations(solver, evaluations))
    rows_per_batch = _round_up(min(batch_size, n), self.mesh.devices.size)
    batch = sharding.batch_sharding(self.mesh)
    pending = None

    def collect(start, real, y):
      out[start:start + real] = np.asarray(y)[:real]

    for start in range(0, n, rows_per_batch):
      raw = x[start:start + rows_per_batch]
      real = len(raw)
      if real < rows_per_batch:   # a padded last batch: one program for every batch
        raw = np.concatenate([raw, np.repeat(raw[-1:], rows_per_batch - real, 0)])
      condition = {k: jax.device_put(v, batch) for k, v in self.spec.condition(raw).items()}
      rows = np.arange(first_row + start, first_row + start + rows_per_batch, dtype=np.int32)
      y = fn(self.params, condition, jax.device_put(rows, batch), np.int32(seed), steps)
      if pending is not None:   # copy the previous batch out while this one runs
        collect(*pending)
      pending = (start, real, y)
    collect(*pending)
    return np.asarray(self.spec.decode_target(out), np.float32)


def load_features(data_dir: str, split: str = "validation", limit: int = 0, names=None):
  """Raw features of the first ``limit`` examples of a split: name -> float32 array
  [n, tokens, dim], plus ``key``. Reading TFRecords needs TensorFlow (imported here only)."""
  return data_lib.load_features(data_dir, split, limit, names)
