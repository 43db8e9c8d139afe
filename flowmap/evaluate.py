"""Evaluation: the held-out rows sampled and scored in the raw target space, next to the
baselines; the periodic evaluation of training and ``--mode eval``.

The noise (and, for the velocity cosine, the time) of evaluated row i is a function of
(seed, i) only, padded rows are dropped before anything is summed, and sums run in float64 on
the host, so a figure does not depend on the batch size or on the number of devices. Train
knows this module by two names only: ``make_evaluator`` and ``Evaluator.run``.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Sequence, Union

import jax
import numpy as np

from flowmap import baselines as baselines_lib
from flowmap import checkpoint as checkpoint_lib
from flowmap import data as data_lib
from flowmap import flow
from flowmap import plots
from flowmap import sampling
from flowmap import sharding
from flowmap import workdir as workdir_lib
from flowmap.config import ConfigError
from flowmap.fileio import write_json_atomic
from flowmap.metrics import Metrics


class Evaluator:
  """Samples the fixed held-out rows and scores them in the raw target space.

  ``source_raw`` and ``target_raw`` are numpy, identical on every process; ``spec`` maps
  them into the model's space and its outputs back. Each batch is padded to the
  (device-divisible) batch size, split between processes, sampled on the mesh and gathered
  back, so every process computes the same figures. ``baseline`` (the ``baseline/...``
  figures of the same rows, or a function that computes them, called at the first
  evaluation, so that fitting the ladder does not hold back the first training step) is
  reported next to every evaluation.
  """

  def __init__(self, graphdef, mesh, spec, source_raw: np.ndarray, target_raw: np.ndarray,
               batch_size: int, seed: int,
               baseline: Optional[Union[dict, Callable[[], dict]]] = None,
               mean_draws: int = 4, objective: str = "flow", directions=None):
    self.graphdef, self.mesh, self.spec = graphdef, mesh, spec
    self.directions = directions
    self.source_raw = np.asarray(source_raw, np.float32)
    self.condition = spec.condition(self.source_raw)   # the model's inputs, numpy
    self.target_raw = np.asarray(target_raw, np.float32)
    n_dev = mesh.devices.size   # batches: a multiple of the devices, no larger than needed
    self.batch_size = -(-min(batch_size, max(len(self.source_raw), 1)) // n_dev) * n_dev
    self.seed = seed
    self.mean_draws = mean_draws
    self.objective = objective
    self._baseline = baseline if callable(baseline) else dict(baseline or {})
    self.target_shape = self.target_raw.shape[1:]
    self._samplers = {}
    self._velocity_cosines = sampling.make_velocity_cosines(graphdef, objective)

  @property
  def baseline(self) -> dict:
    if callable(self._baseline):
      self._baseline = dict(self._baseline())
    return self._baseline

  @property
  def num_images(self) -> int:
    return len(self.source_raw)

  def sampler(self, solver: str, guidance: float, mode: str = "sample", draw: int = 0):
    """One compiled program per (solver, guidance, mode, draw): the step count is traced."""
    key = (solver, float(guidance), mode, draw)
    if key not in self._samplers:
      self._samplers[key] = sampling.make_row_sampler(
          self.graphdef, self.target_shape, solver, guidance, mode, draw, self.mean_draws,
          self.objective)
    return self._samplers[key]

  def use_sampler(self, solver: str, guidance: float, mode: str, fn, draw: int = 0):
    """Replaces the compiled program of (solver, guidance, mode, draw) with ``fn`` (the
    signature of ``sampling.make_row_sampler``'s): for samplers flowmap does not build, such
    as the ablation's reversed one."""
    self._samplers[(solver, float(guidance), mode, draw)] = fn

  def _batches(self, arrays: dict):
    """(start, real rows, padded arrays (sharded), row indices (sharded)) per batch; the
    padding repeats the last row."""
    for start in range(0, self.num_images, self.batch_size):
      parts = {k: a[start:start + self.batch_size] for k, a in arrays.items()}
      rows = len(next(iter(parts.values())))
      pad = self.batch_size - rows
      if pad:
        parts = {k: np.concatenate([p, np.repeat(p[-1:], pad, 0)]) for k, p in parts.items()}
      idx = np.arange(start, start + self.batch_size, dtype=np.int32)
      yield start, rows, {k: self._shard(p) for k, p in parts.items()}, self._shard(idx)

  def _shard(self, x: np.ndarray):
    pc, pi = jax.process_count(), jax.process_index()
    per = len(x) // pc
    return sharding.global_batch({"x": x[pi * per:(pi + 1) * per]}, self.mesh)["x"]

  def _gather(self, x) -> np.ndarray:
    if jax.process_count() == 1:
      return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def generate(self, params, solver: str, evaluations: int, guidance: float = 1.0,
               mode: str = "sample", samples: int = 1):
    """(rows, raw generated [rows, *target] or [rows, samples, *target]) batch by batch."""
    fns = [self.sampler(solver, guidance, mode, draw) for draw in range(samples)]
    seed = np.int32(self.seed)
    steps = np.int32(flow.steps_for_evaluations(solver, evaluations))
    for start, rows, condition, idx in self._batches(self.condition):
      draws = [np.asarray(self.spec.decode_target(
          self._gather(fn(params, condition, idx, seed, steps))[:rows]), np.float32)
               for fn in fns]
      yield start, draws[0] if samples == 1 else np.stack(draws, 1)

  def evaluate(self, params, solver: str, evaluations: int, guidance: float = 1.0,
               mode: str = "sample", samples: int = 1) -> dict:
    """Every metric of the held-out rows, accumulated batch by batch (one batch in float64
    at a time). ``samples`` > 1 draws that many samples per row, for the energy score."""
    m = Metrics(self.directions)
    for start, gen in self.generate(params, solver, evaluations, guidance, mode, samples):
      m.add(gen, self.target_raw[start:start + len(gen)])
    return m.result()

  def velocity_cosine(self, params) -> float:
    """Mean over every held-out row, with t and noise of row i fixed by (seed, i)."""
    x1 = np.asarray(self.spec.encode_target(self.target_raw), np.float32)
    seed = np.int32(self.seed + 1)
    total = 0.0
    for _, rows, parts, idx in self._batches({**self.condition, "x1": x1}):
      x1_part = parts.pop("x1")
      cos = self._gather(self._velocity_cosines(params, parts, x1_part, idx, seed))
      total += float(np.sum(cos[:rows], dtype=np.float64))
    return total / self.num_images

  def sweep(self, params, solvers: Sequence[str], evaluations: Sequence[int],
            guidances: Sequence[float] = (1.0,)) -> list[dict]:
    """Every metric per (solver, model evaluations, guidance), samples, and the mean mode
    (``mean_draws`` one-step estimates averaged) per guidance. Heun spends two evaluations
    a step, so odd counts are Heun-less; a guided evaluation runs the model on a doubled
    batch (``model_passes``)."""
    rows = []
    for guidance in guidances:
      passes = 1 if guidance == 1.0 else 2
      rows.append({"mode": "mean", "solver": "euler", "evaluations": self.mean_draws,
                   "guidance": float(guidance), "model_passes": self.mean_draws * passes,
                   **self.evaluate(params, "euler", 1, guidance, "mean")})
      for solver in solvers:
        for n in evaluations:
          if solver == "heun" and n % 2:
            continue
          m = self.evaluate(params, solver, int(n), guidance)
          rows.append({"mode": "sample", "solver": solver, "evaluations": int(n),
                       "guidance": float(guidance), "model_passes": int(n) * passes, **m})
    return rows

  # -- the periodic evaluation of training

  def run(self, config, workdir: str, weights: dict, step: int) -> dict:
    """The periodic evaluation: EMA and raw weights in the configured output mode
    (``eval.mode``: ``eval/*``, ``eval/raw_*``), the EMA weights in both modes
    (``eval/sample/*``, ``eval/mean/*``), their velocity cosines, and the baselines; writes
    every figure to eval/<step>.json."""
    c = config.eval
    results = self.weighed(config, weights)
    for label, params in _labelled(weights)[:1]:
      for mode in sampling.MODES:
        figures = (self.evaluate(params, c.solver, c.steps, c.guidance, mode)
                   if mode != c.mode else
                   {k[len("eval/"):]: v for k, v in results.items()
                    if k.startswith("eval/") and not k.startswith("eval/raw_")})
        for k, v in figures.items():
          if k != "velocity_cosine":
            results[f"eval/{mode}/{k}"] = v
    results.update(self.baseline)
    if jax.process_index() == 0:
      workdir_lib.write_eval(workdir, step, {
          "mode": c.mode, "solver": c.solver, "evaluations": c.steps, "guidance": c.guidance,
          "num_images": self.num_images, **results})
    return results

  def weighed(self, config, weights: dict) -> dict:
    """The configured mode and solver's figures and the velocity cosine (in the model's
    normalised space), for EMA (``eval/*``) and raw weights (``eval/raw_*``)."""
    c = config.eval
    results = {}
    for label, params in _labelled(weights):
      for k, v in self.evaluate(params, c.solver, c.steps, c.guidance, c.mode).items():
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
  """The evaluator of a run: its held-out rows and the baseline ladder's figures on them
  (cached). The ridge rung is the run's own linear map (fitted now for a run without one),
  the MLP rung the run's own MLP where its prior fitted one, and a synthetic task's known
  spread directions give ``variance_ratio_along``."""
  source, target, split = held_out_raw(config, data_dir)
  ridge = spec.linear
  if ridge is None:
    ridge = workdir_lib.fit_linear_map(config, data_dir, workdir)
  directions = _spread_directions(data_dir)
  baseline = functools.partial(
      baselines_lib.run_baselines, config, data_dir, workdir, ridge,
      workdir_lib.linear_split(config, data_dir), source, target, split,
      directions=directions, mlp=spec.mlp)
  return Evaluator(graphdef, mesh, spec, source, target, config.eval.batch_size,
                   seed=config.seed + 1_000_003, baseline=baseline,
                   mean_draws=config.eval.mean_draws, objective=config.flow.objective,
                   directions=directions)


class Selector:
  """``train.select_rows``: the mean mode's MSE (raw target space) on the training rows held
  out of training, at step 0, where the untrained model is its prior (``model.prior``: the
  linear map or the MLP, fitted on other rows), and at every evaluation; the EMA weights of
  the lowest so far are kept in ``<workdir>/selected/`` and the scores in
  ``selection.json``. The selected model is therefore never worse than its prior on those
  rows."""

  def __init__(self, config, workdir: str, data_dir: str, spec, graphdef, mesh,
               select_split: str):
    names = [config.data.source, config.data.target]
    rows = data_lib.read_rows(data_dir, select_split, names)
    self.evaluator = Evaluator(graphdef, mesh, spec, rows[names[0]], rows[names[1]],
                               config.eval.batch_size, seed=config.seed + 2_000_003,
                               mean_draws=config.eval.mean_draws,
                               objective=config.flow.objective)
    self.workdir = workdir
    self.record = workdir_lib.read_selection(workdir) or {
        "rows": self.evaluator.num_images, "history": [], "step": None, "mse": None}

  def update(self, step: int, weights: dict) -> dict:
    """Scores ``weights`` at ``step`` (once: a resumed run keeps the scores it has), keeps
    them if they are the best so far; the ``select/*`` figures."""
    scored = {int(s): m for s, m in self.record["history"]}
    if step not in scored:
      mse = self.evaluator.evaluate(weights["ema"], "euler", 1, 1.0, "mean")["mse"]
      self.record["history"].append([int(step), float(mse)])
      if self.record["mse"] is None or mse < self.record["mse"]:
        saver = checkpoint_lib.Checkpointer(self.workdir, keep=1,
                                            subdir=checkpoint_lib.SELECTED_DIR,
                                            asynchronous=False)
        try:
          saver.save(int(step), {"ema": weights["ema"]}, force=True)
        finally:
          saver.close()
        self.record["step"], self.record["mse"] = int(step), float(mse)
      if jax.process_index() == 0:
        write_json_atomic(os.path.join(self.workdir, workdir_lib.SELECTION_FILE),
                          self.record)
      scored[step] = mse
    return {"select/mean_mse": float(scored[step]), "select/step": int(self.record["step"])}

  def selected(self, abstract_ema) -> checkpoint_lib.Weights:
    return checkpoint_lib.restore_selected(self.workdir, abstract_ema)

  def report(self, config, evaluator: "Evaluator", abstract_ema) -> dict:
    """The selected weights on the evaluation rows, in both modes: ``eval/selected/*``."""
    weights = self.selected(abstract_ema)
    c = config.eval
    out = {"select/step": weights.step}
    for mode in sampling.MODES:
      for k, v in evaluator.evaluate(weights.ema, c.solver, c.steps, c.guidance,
                                     mode).items():
        out[f"eval/selected/{mode}/{k}"] = v
    return out


def _spread_directions(data_dir: str):
  from flowmap import synthetic
  try:
    return synthetic.spread_directions(synthetic.read_task(data_dir))
  except (OSError, ValueError):
    return None


# ----------------------------------------------------------------------------- --mode eval

def sweep_guidances(config) -> list[float]:
  """1 (no guidance) plus the configured scales; none when the run never learned the
  unconditional velocity (flow.cond_dropout = 0), which guidance needs."""
  scales = [1.0]
  if config.flow.cond_dropout > 0 and config.flow.objective != "meanflow":
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
  # Both output modes of the EMA weights, the samples with several draws per row for the
  # energy score and the spread-skill ratio.
  for mode in sampling.MODES:
    figures = evaluator.evaluate(state["ema"], c.solver, c.steps, c.guidance, mode,
                                 samples=c.num_samples if mode == "sample" else 1)
    results.update({f"eval/{mode}/{k}": v for k, v in figures.items()})
  sweep = []
  guidances = sweep_guidances(config)
  for label, params in _labelled(state):
    solvers = ["euler"] if config.flow.objective == "meanflow" else list(c.sweep_solvers)
    for row in evaluator.sweep(params, solvers,
                               [int(n) for n in c.sweep_evaluations], guidances):
      sweep.append({"weights": label, **row})
  record = {"mode": c.mode, "solver": c.solver, "evaluations": c.steps,
            "guidance": c.guidance, "num_images": evaluator.num_images, **results,
            **evaluator.baseline, "sweep": sweep}
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
  return {**results, **evaluator.baseline}
