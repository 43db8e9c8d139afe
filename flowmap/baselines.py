"""Baselines, fitted on the training split and scored by the same metrics as flowmap.

A figure means something only next to what simple alternatives score on the same rows. The
ladder, each rung fitted on the same training rows (those the linear map was fitted on):

  mean        the mean training target at each position: no use of the source at all
  ridge       the closed-form linear map of ``flowmap.linear`` (the source resampled onto the
              target's token layout, with the pooled source beside it): the map a user
              would otherwise fit, and the base flowmap predicts relative to
  procrustes  an orthogonal map between standardised features, where the dimensions match
  mlp         a small per-position MLP over a 3 x 3 window of resampled source tokens and the
              pooled source, fitted in seconds to a minute on a CPU

All of them are point estimates of E[target | source]: compare them with flowmap's mean mode
on pointwise figures, and read their distribution figures (variance ratio, Frechet distance)
as what a regressor gives up. Fitting needs a pass over the training rows, so the figures
are computed once per run and cached in ``<workdir>/baseline.json``, refitted only when the
dataset, the features, the linear map or the rows change.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flowmap import data as data_lib
from flowmap import linear as linear_lib
from flowmap.fileio import read_json, write_json_atomic
from flowmap.metrics import score

HOLDOUT_EVERY = linear_lib.HOLDOUT_EVERY   # every 10th row chooses the penalty / stops early
CACHE_FILE = "baseline.json"


# ----------------------------------------------------------------------------- the rungs

FIT_CHUNK_ROWS = 256       # rows cast to float64 at a time while accumulating statistics,
FIT_CHUNK_TOKENS = 16384   # and no more target tokens than this (64 rows of 256 tokens)
MLP_HIDDEN = 128
MLP_WINDOW = 3             # the MLP reads a 3 x 3 neighbourhood of resampled source tokens
MLP_STEPS = 2000
MLP_BATCH_TOKENS = 512     # target tokens per step: rows per batch = this / target tokens
MLP_LEARNING_RATE = 3e-3
MLP_EVAL_EVERY = 100       # steps between held-out checks (early stopping keeps the best)
MLP_HELD_TOKENS = 16384    # target tokens of held-out rows per check: checks cost ~1/10
MLP_CHUNK_TOKENS = 4096    # target tokens whose inputs are built at once outside training
                           # (256 x 1024 tokens: 9 x 1024 + 1024 inputs each, 170 MB)
LADDER = ("mean", "ridge", "procrustes", "mlp")


def _chunks(rows: int, size: int = FIT_CHUNK_ROWS):
  for start in range(0, rows, size):
    yield slice(start, min(start + size, rows))


def _stat_chunks(rows: int, tokens: int):
  """Chunks of rows for float64 statistics: FIT_CHUNK_ROWS, or fewer at large token counts."""
  return _chunks(rows, max(1, min(FIT_CHUNK_ROWS, FIT_CHUNK_TOKENS // tokens)))


@dataclasses.dataclass
class Procrustes:
  """The orthogonal map (with translation) between the standardised resampled source tokens
  and the standardised target tokens: the answer to "are the two spaces a rotation apart?".
  Scored in the raw target space like every rung."""
  resample: np.ndarray       # [target tokens, source tokens]
  source_mean: np.ndarray    # [dim], over every token of the training rows
  source_std: np.ndarray
  target_mean: np.ndarray
  target_std: np.ndarray
  rotation: np.ndarray       # [dim, dim], orthogonal

  def predict(self, source: np.ndarray) -> np.ndarray:
    x = np.einsum("ts,nsd->ntd", self.resample, np.asarray(source, np.float64))
    return ((x - self.source_mean) / self.source_std) @ self.rotation * self.target_std + \
        self.target_mean


def fit_procrustes(source: np.ndarray, target: np.ndarray) -> Procrustes | None:
  """argmin over orthogonal R of ||standardised source R - standardised target||, from the
  SVD of their cross-covariance; None where the source and target dimensions differ."""
  dim = source.shape[-1]
  if target.shape[-1] != dim:
    return None
  resample = linear_lib.resampling_matrix(source.shape[1], target.shape[1])
  sums = {"source": np.zeros(dim), "target": np.zeros(dim)}
  squares = {"source": np.zeros(dim), "target": np.zeros(dim)}
  cross, count = np.zeros((dim, dim)), 0
  for part in _stat_chunks(len(source), target.shape[1]):
    x = np.einsum("ts,nsd->ntd", resample, np.asarray(source[part], np.float64))
    x = x.reshape(-1, dim)
    y = np.asarray(target[part], np.float64).reshape(-1, dim)
    for side, v in (("source", x), ("target", y)):
      sums[side] += v.sum(0)
      squares[side] += (v * v).sum(0)
    cross += x.T @ y
    count += len(x)
  mean = {side: sums[side] / count for side in sums}
  std = {side: np.sqrt(np.maximum(squares[side] / count - mean[side] ** 2, 1e-12))
         for side in sums}
  covariance = (cross / count - np.outer(mean["source"], mean["target"])) / \
      np.outer(std["source"], std["target"])
  u, _, vt = np.linalg.svd(covariance)
  return Procrustes(resample, mean["source"], std["source"], mean["target"], std["target"],
                    u @ vt)


def _mlp_inputs(source, resample, window: int):
  """The MLP's input at every target position [rows, target tokens, features], in JAX: the
  resampled source tokens of a window x window neighbourhood (zero outside the grid; the
  token alone when the target is not a square grid) and, where neither end is pooled, the
  pooled source."""
  local = jnp.einsum("ts,nsd->ntd", resample, source)
  tokens = resample.shape[0]
  side = math.isqrt(tokens)
  if window > 1 and side > 1 and side * side == tokens:
    n, _, dim = local.shape
    r = window // 2
    grid = jnp.pad(local.reshape(n, side, side, dim), ((0, 0), (r, r), (r, r), (0, 0)))
    local = jnp.concatenate([grid[:, dy:dy + side, dx:dx + side].reshape(n, tokens, dim)
                             for dy in range(window) for dx in range(window)], -1)
  if tokens > 1 and resample.shape[1] > 1:
    pooled = jnp.broadcast_to(source.mean(1, keepdims=True), (*local.shape[:2], source.shape[-1]))
    local = jnp.concatenate([local, pooled], -1)
  return local


def _mlp_init(key, features: int, tokens: int, hidden: int, dim: int) -> dict:
  """Scaled normal hidden layers; a zero output layer, so the MLP starts at the mean target."""
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (features, hidden)) / np.sqrt(features),
          "b1": jnp.zeros(hidden), "position": jnp.zeros((tokens, hidden)),
          "w2": jax.random.normal(k2, (hidden, hidden)) / np.sqrt(hidden),
          "b2": jnp.zeros(hidden), "w3": jnp.zeros((hidden, dim)), "b3": jnp.zeros(dim)}


def _mlp_apply(params: dict, x):
  h = jax.nn.gelu(x @ params["w1"] + params["b1"] + params["position"])
  h = jax.nn.gelu(h @ params["w2"] + params["b2"])
  return h @ params["w3"] + params["b3"]


def _mlp_error(params, inputs, source, target, window):
  """Mean squared error in the standardised target space; ``inputs`` = (resample, input mean,
  input std, target mean, target std); source and target rows raw, in their stored dtype."""
  resample, input_mean, input_std, target_mean, target_std = inputs
  x = (_mlp_inputs(source.astype(jnp.float32), resample, window) - input_mean) / input_std
  y = (target.astype(jnp.float32) - target_mean) / target_std
  return jnp.mean((_mlp_apply(params, x) - y) ** 2)


_mlp_held_error = jax.jit(_mlp_error, static_argnames="window")


def _mlp_optimizer(steps: int, learning_rate: float):
  return optax.adam(optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(1, steps // 20), steps))


@functools.partial(jax.jit, static_argnames=("window", "steps", "learning_rate"))
def _mlp_train(params, opt_state, inputs, source, target, window, steps, learning_rate):
  """The steps of one chunk, scanned: ``source`` and ``target`` [chunk steps, batch rows,
  tokens, dim], each step's rows gathered on the host (the training rows never go to the
  device whole)."""
  optimizer = _mlp_optimizer(steps, learning_rate)

  def step(carry, rows):
    params, opt_state = carry
    grads = jax.grad(_mlp_error)(params, inputs, *rows, window)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  return jax.lax.scan(step, (params, opt_state), (source, target))[0]


@functools.partial(jax.jit, static_argnames="window")
def _mlp_input_sums(source, resample, window):
  """Sum and sum of squares of the MLP's inputs over these rows and positions."""
  x = _mlp_inputs(source, resample, window)
  return x.sum((0, 1)), (x * x).sum((0, 1))


@functools.partial(jax.jit, static_argnames="window")
def _mlp_predict(params, inputs, source, window):
  resample, input_mean, input_std = inputs
  return _mlp_apply(params, (_mlp_inputs(source, resample, window) - input_mean) / input_std)


@dataclasses.dataclass
class MLPRegressor:
  """A per-position MLP: at each target position, the resampled source tokens of its 3 x 3
  neighbourhood, the pooled source and a learned embedding of the position go through two
  GELU layers to a standardised correction of the position's mean target.

  It answers "is a small nonlinear regressor enough?" at the cost of seconds: it sees local
  and global context, not the whole source grid the way attention does.
  """
  resample: np.ndarray        # [target tokens, source tokens]
  input_mean: np.ndarray      # [features], float32
  input_std: np.ndarray
  target_mean: np.ndarray     # [target tokens, target dim]
  target_std: np.ndarray      # [target dim]
  params: dict                # numpy arrays
  window: int
  steps: int                  # the training step whose held-out error was lowest (kept)

  def predict(self, source: np.ndarray, batch_rows: int = 0) -> np.ndarray:
    batch_rows = batch_rows or max(1, MLP_CHUNK_TOKENS // self.resample.shape[0])
    inputs = (self.resample.astype(np.float32), self.input_mean, self.input_std)
    out = [np.asarray(_mlp_predict(self.params, inputs,
                                   np.asarray(source[part], np.float32), self.window))
           for part in _chunks(len(source), batch_rows)]
    return np.concatenate(out).astype(np.float64) * self.target_std + self.target_mean


def fit_mlp(source: np.ndarray, target: np.ndarray, seed: int = 0, hidden: int = MLP_HIDDEN,
            window: int = MLP_WINDOW, steps: int = MLP_STEPS,
            batch_tokens: int = MLP_BATCH_TOKENS,
            learning_rate: float = MLP_LEARNING_RATE) -> MLPRegressor:
  """Adam with warm-up and cosine decay on nine rows in ten; every ``MLP_EVAL_EVERY`` steps
  the error on every ``HOLDOUT_EVERY``-th row (never trained on; the first
  ``MLP_HELD_TOKENS`` target tokens' worth of them) is measured and the best parameters are
  kept (early stopping). Deterministic given ``seed`` (initialisation and row
  order). A step sees ``batch_tokens`` target tokens whatever the layout, so the cost is
  about steps x batch_tokens x (features + hidden + dim) x hidden x 6 FLOPs."""
  n, tokens, dim = target.shape
  resample = linear_lib.resampling_matrix(source.shape[1], tokens).astype(np.float32)
  is_held = np.arange(n) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
  fit_rows, held_rows = np.flatnonzero(~is_held), np.flatnonzero(is_held)
  if not len(held_rows):
    raise ValueError(f"the MLP baseline needs at least {HOLDOUT_EVERY} training rows")
  total, squares = 0.0, 0.0
  chunk_rows = max(1, MLP_CHUNK_TOKENS // tokens)
  for part in _chunks(len(fit_rows), chunk_rows):
    sums = _mlp_input_sums(np.asarray(source[fit_rows[part]], np.float32), resample, window)
    total = total + np.asarray(sums[0], np.float64)
    squares = squares + np.asarray(sums[1], np.float64)
  count = len(fit_rows) * tokens
  input_mean = total / count
  input_std = np.sqrt(np.maximum(squares / count - input_mean ** 2, 1e-12))
  # The target's statistics in chunks, and the rows in their stored dtype (normalised inside
  # the step): no float32 or float64 copy of the training rows.
  target_mean = sum(target[fit_rows[part]].sum(0, dtype=np.float64)
                    for part in _stat_chunks(len(fit_rows), tokens)) / len(fit_rows)
  spread = sum(np.square(target[fit_rows[part]] - target_mean).sum((0, 1))
               for part in _stat_chunks(len(fit_rows), tokens)) / count
  target_std = np.maximum(np.sqrt(spread), 1e-12)
  inputs = (resample, input_mean.astype(np.float32), input_std.astype(np.float32),
            target_mean.astype(np.float32), target_std.astype(np.float32))
  params = _mlp_init(jax.random.PRNGKey(seed), len(input_mean), tokens, hidden, dim)
  opt_state = _mlp_optimizer(steps, learning_rate).init(params)
  batch_rows = max(1, batch_tokens // tokens)
  rng = np.random.default_rng(seed)
  epochs = -(-steps * batch_rows // len(fit_rows))
  order = np.concatenate([rng.permutation(fit_rows) for _ in range(epochs)])
  order = order[:steps * batch_rows].reshape(steps, batch_rows)
  held_rows = held_rows[:max(1, MLP_HELD_TOKENS // tokens)]
  held = [(jnp.asarray(source[held_rows[part]]), jnp.asarray(target[held_rows[part]]))
          for part in _chunks(len(held_rows), chunk_rows)]
  best, best_params, best_step = np.inf, params, 0
  for start in range(0, steps, MLP_EVAL_EVERY):
    chunk = order[start:start + MLP_EVAL_EVERY]
    params, opt_state = _mlp_train(params, opt_state, inputs, source[chunk], target[chunk],
                                   window, steps, learning_rate)
    error = sum(float(_mlp_held_error(params, inputs, *rows, window)) * len(rows[0])
                for rows in held) / len(held_rows)
    if error < best:
      best, best_params, best_step = error, params, start + len(chunk)
  return MLPRegressor(resample, *inputs[1:3], target_mean, target_std,
                      jax.tree.map(np.asarray, best_params), window, best_step)


@dataclasses.dataclass
class Ladder:
  """Every rung fitted on the same training rows: the mean target (per position), the
  closed-form linear map (``flowmap.linear``), orthogonal Procrustes (None where the
  dimensions differ) and the MLP (None when left out)."""
  mean_target: np.ndarray            # [target tokens, target dim]
  ridge: linear_lib.LinearMap
  procrustes: Optional[Procrustes]
  mlp: Optional[MLPRegressor]

  def predictions(self, source: np.ndarray) -> dict:
    """Rung name -> its prediction of the raw target for these source rows."""
    out = {"mean": np.broadcast_to(self.mean_target, (len(source), *self.mean_target.shape)),
           "ridge": self.ridge(np.asarray(source, np.float64))}
    if self.procrustes is not None:
      out["procrustes"] = self.procrustes.predict(source)
    if self.mlp is not None:
      out["mlp"] = self.mlp.predict(source)
    return out


def fit_ladder(source: np.ndarray, target: np.ndarray, ridge: linear_lib.LinearMap,
               seed: int = 0, rungs: Sequence[str] = LADDER,
               mlp_steps: int = MLP_STEPS) -> Ladder:
  """Fits the rungs named in ``rungs`` on raw training rows [rows, tokens, dim] (any float
  dtype) next to an already fitted linear map."""
  return Ladder(target.mean(0, dtype=np.float64), ridge,
                fit_procrustes(source, target) if "procrustes" in rungs else None,
                fit_mlp(source, target, seed=seed, steps=mlp_steps) if "mlp" in rungs
                else None)


def ladder_metrics(ladder: Ladder, source_raw: np.ndarray, target_raw: np.ndarray,
                   directions: Optional[np.ndarray] = None) -> dict:
  """``baseline/<rung>_<figure>`` for the held-out rows, every figure of ``metrics.score``
  (with ``variance_ratio_along`` when ``directions`` are given)."""
  out = {}
  for name, pred in ladder.predictions(source_raw).items():
    for k, v in score(pred, target_raw, directions=directions).items():
      out[f"baseline/{name}_{k}"] = v
  return out


# ----------------------------------------------------------------------------- in a run

def _cache_key(config, data_dir: str, ridge: linear_lib.LinearMap, held_out_split: str,
               held_out_rows: int, rows: int) -> dict:
  with open(os.path.join(data_dir, "stats.json"), "rb") as f:
    stats_hash = hashlib.sha1(f.read()).hexdigest()
  ridge_hash = hashlib.sha1(np.ascontiguousarray(ridge.weight).tobytes()).hexdigest()
  return {"data_dir": os.path.abspath(data_dir), "stats_sha1": stats_hash,
          "source": config.data.source, "target": config.data.target, "train_rows": rows,
          "held_out_split": held_out_split, "held_out_rows": held_out_rows,
          "rungs": list(config.eval.baselines), "ridge_sha1": ridge_hash,
          "mlp": [MLP_HIDDEN, MLP_WINDOW, MLP_STEPS, MLP_BATCH_TOKENS, int(config.seed)]}


def run_baselines(config, data_dir: str, workdir: str, ridge: linear_lib.LinearMap,
                  training_split: str, source_raw: np.ndarray, target_raw: np.ndarray,
                  held_out_split: str, directions: Optional[np.ndarray] = None) -> dict:
  """The ``baseline/...`` figures of the held-out rows: the run's linear map ``ridge`` and
  the rungs of ``eval.baselines`` fitted on ``training_split`` (a tfds split string of the
  same rows the linear map was fitted on), from ``<workdir>/baseline.json`` when it was
  computed for the same data, map and rows, else fitted now and cached."""
  rows = data_lib.split_info(data_dir, training_split).num_examples
  key = _cache_key(config, data_dir, ridge, held_out_split, len(source_raw), rows)
  path = os.path.join(workdir, CACHE_FILE)
  try:
    cached = read_json(path)
    if cached.get("key") == key:
      return cached["metrics"]
  except (OSError, ValueError, KeyError):
    pass
  names = [config.data.source, config.data.target]
  if set(config.eval.baselines) & {"procrustes", "mlp"}:
    rows_read = data_lib.read_rows(data_dir, training_split, names)
    ladder = fit_ladder(rows_read[names[0]], rows_read[names[1]], ridge, seed=config.seed,
                        rungs=config.eval.baselines)
    del rows_read
  else:   # the mean target alone: one streamed pass
    total = sum(b[names[1]].sum(0, dtype=np.float64)
                for b in data_lib.iterate_split(data_dir, training_split, names[1:]))
    ladder = Ladder(total / rows, ridge, None, None)
  metrics = ladder_metrics(ladder, source_raw, target_raw, directions)
  if jax.process_index() == 0:
    write_json_atomic(path, {"key": key, "ridge_kind": ridge.kind, "ridge_alpha": ridge.alpha,
                             "train_rows": rows, "metrics": metrics})
  return metrics


def read_baseline(workdir: str) -> dict:
  """The cached baseline record ({key, ridge_kind, ridge_alpha, train_rows, metrics})."""
  return read_json(os.path.join(workdir, CACHE_FILE))
