"""Evaluation: the held-out rows sampled and scored in the raw target space, next to the
baselines; the periodic evaluation of training and ``--mode eval``.

The noise (and, for the velocity cosine, the time) of evaluated row i is a function of
(seed, i) only, padded rows are dropped before anything is summed, and sums run in float64 on
the host, so a figure does not depend on the batch size or on the number of devices. Train
knows this module by two names only: ``make_evaluator`` and ``Evaluator.run``.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import numpy as np

from flowmap import baselines as baselines_lib
from flowmap import checkpoint as checkpoint_lib
from flowmap import data as data_lib
from flowmap import plots
from flowmap import sampling
from flowmap import sharding
from flowmap import workdir as workdir_lib
from flowmap.config import ConfigError
from flowmap.metrics import score


class Evaluator:
  """Samples the fixed held-out rows with the ODE sampler and scores them in raw space.

  ``source`` is normalised, ``target_raw`` raw; both numpy, identical on every process. Each
  batch is padded to the (device-divisible) batch size, split between processes, sampled on
  the mesh and gathered back, so every process computes the same figures. ``baseline`` (the
  ``baseline/...`` figures of the same rows) is reported next to every evaluation.
  """

  def __init__(self, graphdef, mesh, source: np.ndarray, target_raw: np.ndarray,
               target_normalizer, batch_size: int, seed: int,
               baseline: Optional[dict] = None):
    self.graphdef, self.mesh = graphdef, mesh
    self.source = np.asarray(source, np.float32)
    self.target_raw = np.asarray(target_raw, np.float32)
    self.normalizer = target_normalizer
    n_dev = mesh.devices.size   # batches: a multiple of the devices, no larger than needed
    self.batch_size = -(-min(batch_size, max(len(self.source), 1)) // n_dev) * n_dev
    self.seed = seed
    self.baseline = dict(baseline or {})
    self.target_shape = self.target_raw.shape[1:]
    self._samplers = {}
    self._velocity_cosines = sampling.make_velocity_cosines(graphdef)

  @property
  def num_images(self) -> int:
    return len(self.source)

  def sampler(self, solver: str, evaluations: int, guidance: float):
    key = (solver, evaluations, float(guidance))
    if key not in self._samplers:
      self._samplers[key] = sampling.make_row_sampler(self.graphdef, self.target_shape,
                                                      solver, evaluations, guidance)
    return self._samplers[key]

  def _batches(self, *arrays):
    """(rows, padded arrays..., row indices) per batch; padding repeats the last row."""
    n = len(arrays[0])
    for start in range(0, n, self.batch_size):
      parts = [a[start:start + self.batch_size] for a in arrays]
      rows = len(parts[0])
      pad = self.batch_size - rows
      if pad:
        parts = [np.concatenate([p, np.repeat(p[-1:], pad, 0)]) for p in parts]
      idx = np.arange(start, start + self.batch_size, dtype=np.int32)
      yield rows, parts, idx

  def _shard(self, x: np.ndarray):
    pc, pi = jax.process_count(), jax.process_index()
    per = len(x) // pc
    return sharding.global_batch({"x": x[pi * per:(pi + 1) * per]}, self.mesh)["x"]

  def _gather(self, x) -> np.ndarray:
    if jax.process_count() == 1:
      return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def generate(self, params, solver: str, evaluations: int, guidance: float = 1.0) -> np.ndarray:
    """Raw-space samples for every held-out row."""
    fn = self.sampler(solver, evaluations, guidance)
    seed = np.int32(self.seed)
    out = []
    for rows, (src,), idx in self._batches(self.source):
      gen = self._gather(fn(params, self._shard(src), self._shard(idx), seed))
      out.append(gen[:rows])
    return np.asarray(self.normalizer.decode(np.concatenate(out)), np.float32)

  def evaluate(self, params, solver: str, evaluations: int, guidance: float = 1.0) -> dict:
    return score(self.generate(params, solver, evaluations, guidance), self.target_raw)

  def velocity_cosine(self, params) -> float:
    """Mean over every held-out row, with t and noise of row i fixed by (seed, i)."""
    x1 = np.asarray(self.normalizer.encode(self.target_raw), np.float32)
    seed = np.int32(self.seed + 1)
    total = 0.0
    for rows, (src, tgt), idx in self._batches(self.source, x1):
      cos = self._gather(self._velocity_cosines(params, self._shard(src), self._shard(tgt),
                                                self._shard(idx), seed))
      total += float(np.sum(cos[:rows], dtype=np.float64))
    return total / len(self.source)

  def sweep(self, params, solvers: Sequence[str], evaluations: Sequence[int],
            guidances: Sequence[float] = (1.0,)) -> list[dict]:
    """Every metric per (solver, model evaluations, guidance). Heun spends two evaluations a
    step, so odd counts are Heun-less; a guided evaluation runs the model on a doubled batch
    (``model_passes`` counts that)."""
    rows = []
    for guidance in guidances:
      for solver in solvers:
        for n in evaluations:
          if solver == "heun" and n % 2:
            continue
          m = self.evaluate(params, solver, int(n), guidance)
          rows.append({"solver": solver, "evaluations": int(n), "guidance": float(guidance),
                       "model_passes": int(n) * (1 if guidance == 1.0 else 2), **m})
    return rows


  # -- the periodic evaluation of training

  def run(self, config, workdir: str, weights: dict, step: int) -> dict:
    """EMA and raw weights (``weights``: {"ema", "params"}) with the configured solver, their
    velocity cosines, and the baselines' cosines; writes every figure to eval/<step>.json."""
    c = config.eval
    results = self.weighed(config, weights)
    for name in ("ridge", "mean"):
      for k in ("cosine_token", "cosine_global"):
        key = f"baseline/{name}_{k}"
        if key in self.baseline:
          results[key] = self.baseline[key]
    if jax.process_index() == 0:
      workdir_lib.write_eval(workdir, step, {
          "solver": c.solver, "evaluations": c.steps, "guidance": c.guidance,
          "num_images": self.num_images, **results, **self.baseline})
    return results

  def weighed(self, config, weights: dict) -> dict:
    """The configured solver's figures and the velocity cosine, for EMA and raw weights."""
    c = config.eval
    results = {}
    for label, params in _labelled(weights):
      for k, v in self.evaluate(params, c.solver, c.steps, c.guidance).items():
        results[_prefix(label) + k] = v
      results[_prefix(label) + "velocity_cosine"] = self.velocity_cosine(params)
    return results


def _labelled(weights: dict) -> list[tuple[str, object]]:
  return [("ema", weights["ema"]), ("raw", weights["params"])]


def _prefix(label: str) -> str:
  return "eval/" if label == "ema" else "eval/raw_"


def held_out_raw(config, data_dir: str) -> tuple[np.ndarray, np.ndarray, str]:
  """(raw source, raw target, split) of the evaluated rows: the first eval.num_images of the
  validation split, or the overfitting subset itself."""
  c = config
  if c.data.overfit_size:
    split, limit = "train", c.data.overfit_size
  else:
    split, limit = "validation", c.eval.num_images
  feats = data_lib.load_features(data_dir, split, limit, [c.data.source, c.data.target])
  return feats[c.data.source], feats[c.data.target], split


def make_evaluator(config, workdir: str, data_dir: str, spec, graphdef, mesh) -> Evaluator:
  """The evaluator of a run: its held-out rows, the baselines' figures on them (cached)."""
  source, target, split = held_out_raw(config, data_dir)
  baseline = baselines_lib.run_baselines(config, data_dir, workdir, source, target, split)
  normalised = np.asarray(spec.normalizers["source"].encode(source), np.float32)
  return Evaluator(graphdef, mesh, normalised, target, spec.normalizers["target"],
                   config.eval.batch_size, seed=config.seed + 1_000_003, baseline=baseline)


# ----------------------------------------------------------------------------- --mode eval

def sweep_guidances(config) -> list[float]:
  """1 (no guidance) plus the configured scales; none when the run never learned the
  unconditional velocity (flow.cond_dropout = 0), which guidance needs."""
  scales = [1.0]
  if config.flow.cond_dropout > 0:
    for g in [config.eval.guidance, *config.eval.sweep_guidances]:
      if float(g) not in scales:
        scales.append(float(g))
  return scales


def restore(config, workdir: str, step: Optional[int] = None):
  """(spec, data_dir, graphdef, mesh, weights) of a trained run, for evaluation: the params
  and EMA of checkpoint ``step`` (default: newest) and nothing else; writes nothing."""
  workdir_lib.validate_config(config)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise ConfigError(f"no checkpoints in {workdir}; train first with the same "
                      "--config and --workdir")
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    if checkpointer.latest_step() is None:
      raise ConfigError(f"no complete checkpoint in {ckpt_dir}")
    data_dir, stats = workdir_lib.resolve_data(config, workdir)
    spec = workdir_lib.spec_from_config(config, stats)
    workdir_lib.check_compatible(workdir, spec)
    if workdir_lib.read_spec_json(workdir) is not None:   # the statistics it was trained in
      spec = workdir_lib.read_spec(workdir, config)
    mesh = sharding.make_mesh(config.mesh)
    graphdef, shapes = sampling.abstract_model(spec.model_cfg, config.seed)
    abstract = sharding.placed({"params": shapes, "ema": shapes}, mesh)
    weights = checkpointer.restore_weights(abstract, step)
  finally:
    checkpointer.close()
  return spec, data_dir, graphdef, mesh, weights


def evaluate_workdir(config, workdir: str, step: Optional[int] = None) -> dict:
  """--mode eval: the newest checkpoint, EMA and raw weights, the configured solver and the
  full solver/evaluations(/guidance) sweep, next to the baselines. Writes eval/<step>.json,
  plots/sweep_<step>.png (and sweep.png), refreshes plots/training.png, prints a table."""
  spec, data_dir, graphdef, mesh, weights = restore(config, workdir, step)
  step = weights.step
  state = {"params": weights.params, "ema": weights.ema}
  c = config.eval
  evaluator = make_evaluator(config, workdir, data_dir, spec, graphdef, mesh)
  results = evaluator.weighed(config, state)
  sweep = []
  guidances = sweep_guidances(config)
  for label, params in _labelled(state):
    for row in evaluator.sweep(params, list(c.sweep_solvers),
                               [int(n) for n in c.sweep_evaluations], guidances):
      sweep.append({"weights": label, **row})
  record = {"solver": c.solver, "evaluations": c.steps, "guidance": c.guidance,
            "num_images": evaluator.num_images, **results, **evaluator.baseline,
            "sweep": sweep}
  try:
    base = baselines_lib.read_baseline(workdir)
    record.update(ridge_kind=base["ridge_kind"], ridge_alpha=base["ridge_alpha"],
                  baseline_train_rows=base["train_rows"])
  except (OSError, ValueError, KeyError):
    pass
  if jax.process_index() == 0:
    path = workdir_lib.write_eval(workdir, step, record)
    plot = plots.plot_sweep(workdir, step, sweep, evaluator.baseline)
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      plots.plot_training(workdir)
    print(plots.format_table(step, record))
    print(f"wrote {path} and {plot}")
  return {**results, **{f"baseline/{name}_cosine_token":
                        evaluator.baseline[f"baseline/{name}_cosine_token"]
                        for name in ("ridge", "mean")}}
