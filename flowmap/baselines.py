"""Baselines, fitted on the training split and scored by the same metrics as flowmap.

A figure means something only next to what a simple alternative scores on the same rows: a
closed-form ridge regression from source to target fitted on (a bounded part of) the training
split, and the trivial predictor that outputs the mean training target. They need one pass
over the training split, so they are computed once per run and cached in
``<workdir>/baseline.json``; they are refitted only when the dataset, the features or the
number of rows change.

The ladder (``fit_ladder``, ``ladder_metrics``) adds the rungs between those two and a learned
model, on in-memory training rows: a ridge on the source resampled onto the target's token
layout with the pooled source beside it, orthogonal Procrustes where the dimensions match, and
a small per-position MLP fitted in seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flowmap import data as data_lib
from flowmap.fileio import read_json, write_json_atomic
from flowmap.metrics import score

RIDGE_ALPHAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HOLDOUT_EVERY = 10   # every 10th fitted training row chooses the ridge penalty
CACHE_FILE = "baseline.json"



class RidgeStats:
  """Sufficient statistics of a least-squares fit y ~ x, accumulated in float64."""

  def __init__(self, din: int, dout: int):
    self.n = 0
    self.xx = np.zeros((din, din))
    self.xy = np.zeros((din, dout))
    self.x_sum = np.zeros(din)
    self.y_sum = np.zeros(dout)
    self.yy = 0.0

  def add(self, x: np.ndarray, y: np.ndarray) -> None:
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    self.n += len(x)
    self.xx += x.T @ x
    self.xy += x.T @ y
    self.x_sum += x.sum(0)
    self.y_sum += y.sum(0)
    self.yy += float(np.sum(y * y))

  def merged(self, other: "RidgeStats") -> "RidgeStats":
    out = RidgeStats(*self.xy.shape)
    out.n = self.n + other.n
    for name in ("xx", "xy", "x_sum", "y_sum", "yy"):
      setattr(out, name, getattr(self, name) + getattr(other, name))
    return out

  def solve(self, alpha: float) -> np.ndarray:
    """[din + 1, dout] weights (last row the intercept) of the ridge fit; the penalty,
    alpha times the mean input variance, leaves the intercept alone."""
    mx, my = self.x_sum / self.n, self.y_sum / self.n
    cxx = self.xx - self.n * np.outer(mx, mx)
    cxy = self.xy - self.n * np.outer(mx, my)
    lam = alpha * max(np.trace(cxx) / len(cxx), 1e-12)
    w = np.linalg.solve(cxx + lam * np.eye(len(cxx)), cxy)
    return np.concatenate([w, (my - mx @ w)[None]])

  def sse(self, coef: np.ndarray) -> float:
    """Sum of squared errors of ``coef`` on the rows these statistics hold."""
    w, b = coef[:-1], coef[-1]
    xx_b = self.x_sum @ w
    quad = (np.sum(w * (self.xx @ w)) + 2 * np.sum(xx_b * b) + self.n * np.sum(b * b))
    return float(self.yy - 2 * (np.sum(w * self.xy) + np.sum(b * self.y_sum)) + quad)


@dataclasses.dataclass
class Baselines:
  """The fitted ridge map (``kind`` per_token or pooled) and the mean training target."""
  kind: str
  coef: np.ndarray            # [source dim + 1, target dim]
  offsets: np.ndarray         # [target tokens, target dim]: added per position (pooled kind)
  mean_target: np.ndarray     # [target tokens, target dim]
  alpha: float
  rows: int

  def ridge(self, source: np.ndarray) -> np.ndarray:
    source = np.asarray(source, np.float64)
    if self.kind == "per_token":
      return source @ self.coef[:-1] + self.coef[-1]
    pooled = source.mean(1) @ self.coef[:-1] + self.coef[-1]
    return pooled[:, None, :] + self.offsets[None]

  def mean(self, rows: int) -> np.ndarray:
    return np.broadcast_to(self.mean_target, (rows, *self.mean_target.shape))


def ridge_kind(source_shape, target_shape) -> str:
  """per_token when every target token has a source token at the same index (equal token
  counts: aligned grids, or two pooled embeddings), pooled otherwise."""
  return "per_token" if source_shape[0] == target_shape[0] else "pooled"


def fit_baselines(batches: Iterable[tuple[np.ndarray, np.ndarray]], source_shape,
                  target_shape, alphas: Sequence[float] = RIDGE_ALPHAS) -> Baselines:
  """Closed-form baselines from raw (source, target) batches of the training split.

  per_token: one linear map (with intercept) shared by every token position, the natural
  linear answer when grids align. pooled: the mean-pooled source predicts the mean-pooled
  target linearly, and each position adds its mean offset from the pooled mean. The penalty
  is chosen on every 10th row, then the map is refitted on all rows.
  """
  kind = ridge_kind(source_shape, target_shape)
  ds, dt = source_shape[1], target_shape[1]
  fit, held = RidgeStats(ds, dt), RidgeStats(ds, dt)
  target_sum = np.zeros(tuple(target_shape))
  seen = 0
  for source, target in batches:
    source = np.asarray(source, np.float64)
    target = np.asarray(target, np.float64)
    target_sum += target.sum(0)
    index = np.arange(seen, seen + len(source))
    seen += len(source)
    for stats, pick in ((fit, index % HOLDOUT_EVERY != HOLDOUT_EVERY - 1),
                        (held, index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1)):
      if not pick.any():
        continue
      s, t = source[pick], target[pick]
      if kind == "per_token":
        stats.add(s.reshape(-1, ds), t.reshape(-1, dt))
      else:
        stats.add(s.mean(1), t.mean(1))
  if seen == 0:
    raise ValueError("no training rows to fit the baselines on")
  mean_target = target_sum / seen
  alpha = 1e-3
  if held.n and fit.n:
    errors = {a: held.sse(fit.solve(a)) for a in alphas}
    alpha = min(errors, key=errors.get)
  coef = fit.merged(held).solve(alpha)
  offsets = mean_target - mean_target.mean(0, keepdims=True)
  if kind == "per_token":
    offsets = np.zeros_like(mean_target)
  return Baselines(kind, coef, offsets, mean_target, alpha, seen)


def baseline_metrics(baselines: Baselines, source_raw: np.ndarray,
                     target_raw: np.ndarray) -> dict:
  out = {}
  for name, pred in (("ridge", baselines.ridge(source_raw)),
                     ("mean", baselines.mean(len(target_raw)))):
    for k, v in score(pred, target_raw).items():
      out[f"baseline/{name}_{k}"] = v
  return out


def _cache_key(config, data_dir: str, held_out_split: str, held_out_rows: int,
               rows: int) -> dict:
  with open(os.path.join(data_dir, "stats.json"), "rb") as f:
    stats_hash = hashlib.sha1(f.read()).hexdigest()
  return {"data_dir": os.path.abspath(data_dir), "stats_sha1": stats_hash,
          "source": config.data.source, "target": config.data.target, "train_rows": rows,
          "held_out_split": held_out_split, "held_out_rows": held_out_rows}


def _training_batches(config, data_dir: str, rows: int, batch_size: int = 64):
  names = [config.data.source, config.data.target]
  ds = data_lib.make_dataset(data_dir, "train", names, batch_size, shuffle=False,
                             repeat=False, limit=rows, drop_remainder=False)
  for batch in data_lib.iterate_numpy(ds):
    yield batch[config.data.source], batch[config.data.target]


def run_baselines(config, data_dir: str, workdir: str, source_raw: np.ndarray,
                  target_raw: np.ndarray, held_out_split: str) -> dict:
  """The ``baseline/...`` figures of the held-out rows, from ``<workdir>/baseline.json``
  when it was computed for the same data and rows, else fitted now (one bounded pass over
  the training split) and cached."""
  available = data_lib.split_size(data_dir, "train")
  if config.data.overfit_size:
    available = min(available, config.data.overfit_size)
  rows = int(config.eval.baseline_rows)
  rows = available if rows <= 0 else min(rows, available)
  key = _cache_key(config, data_dir, held_out_split, len(source_raw), rows)
  path = os.path.join(workdir, CACHE_FILE)
  try:
    cached = read_json(path)
    if cached.get("key") == key:
      return cached["metrics"]
  except (OSError, ValueError, KeyError):
    pass
  source_shape, target_shape = source_raw.shape[1:], target_raw.shape[1:]
  fitted = fit_baselines(_training_batches(config, data_dir, rows), source_shape, target_shape)
  metrics = baseline_metrics(fitted, source_raw, target_raw)
  if jax.process_index() == 0:
    write_json_atomic(path, {"key": key, "ridge_kind": fitted.kind,
                             "ridge_alpha": fitted.alpha, "train_rows": fitted.rows,
                             "metrics": metrics})
  return metrics


def read_baseline(workdir: str) -> dict:
  """The cached baseline record ({key, ridge_kind, ridge_alpha, train_rows, metrics})."""
  return read_json(os.path.join(workdir, CACHE_FILE))


# ----------------------------------------------------------------------------- the ladder
#
# Rungs above the mean target and today's ridge, fitted on the same training rows and scored
# by the same metrics: a ridge on the source carried onto the target grid (the strongest
# linear map considered), orthogonal Procrustes where the dimensions match, and a small MLP.
# Every rung reads, at each target position, the source resampled onto the target's token
# layout, so one design covers equal grids, finer and coarser source grids and pooled ends.

FIT_CHUNK_ROWS = 256       # rows cast to float64 at a time while accumulating statistics
MLP_HIDDEN = 128
MLP_WINDOW = 3             # the MLP reads a 3 x 3 neighbourhood of resampled source tokens
MLP_STEPS = 2000
MLP_BATCH_TOKENS = 512     # target tokens per step: rows per batch = this / target tokens
MLP_LEARNING_RATE = 3e-3
MLP_EVAL_EVERY = 100       # steps between held-out checks (early stopping keeps the best)
MLP_HELD_TOKENS = 16384    # target tokens of held-out rows per check: checks cost ~1/10
LADDER = ("mean", "ridge", "ridge_resampled", "procrustes", "mlp")


def _axis_weights(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights along one axis: area overlap when shrinking (each output
  cell averages the input cells it covers, by covered length), linear interpolation between
  cell centres when growing (edges clamped), the identity when equal."""
  if size_out == size_in:
    return np.eye(size_in)
  w = np.zeros((size_out, size_in))
  if size_out < size_in:
    step = size_in / size_out
    for j in range(size_out):
      lo, hi = j * step, (j + 1) * step
      for i in range(int(np.floor(lo)), int(np.ceil(hi))):
        w[j, i] = (min(hi, i + 1) - max(lo, i)) / step
    return w
  for j in range(size_out):
    x = min(max((j + 0.5) * size_in / size_out - 0.5, 0.0), size_in - 1.0)
    i = int(np.floor(x))
    frac = x - i
    w[j, i] += 1.0 - frac
    if frac > 0:
      w[j, i + 1] += frac
  return w


def resampling_matrix(source_tokens: int, target_tokens: int) -> np.ndarray:
  """[target tokens, source tokens]: the source token layout carried onto the target's.

  Square grids (a pooled embedding is the 1 x 1 grid) are resampled separably by row and
  column, so a finer source is area pooled, a coarser one interpolated, a pooled target gets
  the mean token and a pooled source is broadcast; other token counts are treated as 1-D
  sequences.
  """
  side_in, side_out = math.isqrt(source_tokens), math.isqrt(target_tokens)
  if side_in ** 2 == source_tokens and side_out ** 2 == target_tokens:
    axis = _axis_weights(side_in, side_out)
    return np.kron(axis, axis)
  return _axis_weights(source_tokens, target_tokens)


def _position_inputs(source: np.ndarray, resample: np.ndarray) -> np.ndarray:
  """What every rung reads at each target position: the resampled source token and, where it
  adds anything (neither end pooled), the pooled source. [rows, target tokens, features]."""
  source = np.asarray(source, np.float64)
  local = np.einsum("ts,nsd->ntd", resample, source)
  if resample.shape[0] == 1 or resample.shape[1] == 1:
    return local
  pooled = np.broadcast_to(source.mean(1, keepdims=True), local.shape)
  return np.concatenate([local, pooled], -1)


def _chunks(rows: int, size: int = FIT_CHUNK_ROWS):
  for start in range(0, rows, size):
    yield slice(start, min(start + size, rows))


@dataclasses.dataclass
class ResampledRidge:
  """Ridge from [resampled source token, pooled source] to the target token, one map shared
  by every position plus a mean offset per position (inputs and targets centred per
  position): the strongest linear map the ladder considers."""
  resample: np.ndarray          # [target tokens, source tokens]
  input_offsets: np.ndarray     # [target tokens, features]
  target_offsets: np.ndarray    # [target tokens, target dim]
  coef: np.ndarray              # [features + 1, target dim]
  alpha: float

  def predict(self, source: np.ndarray) -> np.ndarray:
    x = _position_inputs(source, self.resample) - self.input_offsets
    return x @ self.coef[:-1] + self.coef[-1] + self.target_offsets


def fit_resampled_ridge(source: np.ndarray, target: np.ndarray,
                        alphas: Sequence[float] = RIDGE_ALPHAS) -> ResampledRidge:
  """The penalty is chosen on every ``HOLDOUT_EVERY``-th row, then the map is refitted on
  all rows, as for today's ridge."""
  resample = resampling_matrix(source.shape[1], target.shape[1])
  n = len(source)
  input_sum, target_sum = 0.0, 0.0
  for part in _chunks(n):
    input_sum = input_sum + _position_inputs(source[part], resample).sum(0)
    target_sum = target_sum + np.asarray(target[part], np.float64).sum(0)
  input_offsets, target_offsets = input_sum / n, target_sum / n
  features, dim = input_offsets.shape[-1], target_offsets.shape[-1]
  fit, held = RidgeStats(features, dim), RidgeStats(features, dim)
  for part in _chunks(n):
    x = _position_inputs(source[part], resample) - input_offsets
    y = np.asarray(target[part], np.float64) - target_offsets
    is_held = np.arange(part.start, part.stop) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    for stats, pick in ((fit, ~is_held), (held, is_held)):
      if pick.any():
        stats.add(x[pick].reshape(-1, features), y[pick].reshape(-1, dim))
  alpha = 1e-3
  if held.n and fit.n:
    errors = {a: held.sse(fit.solve(a)) for a in alphas}
    alpha = min(errors, key=errors.get)
  return ResampledRidge(resample, input_offsets, target_offsets,
                        fit.merged(held).solve(alpha), alpha)


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
  resample = resampling_matrix(source.shape[1], target.shape[1])
  sums = {"source": np.zeros(dim), "target": np.zeros(dim)}
  squares = {"source": np.zeros(dim), "target": np.zeros(dim)}
  cross, count = np.zeros((dim, dim)), 0
  for part in _chunks(len(source)):
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
  input std)."""
  resample, input_mean, input_std = inputs
  x = (_mlp_inputs(source, resample, window) - input_mean) / input_std
  return jnp.mean((_mlp_apply(params, x) - target) ** 2)


_mlp_held_error = jax.jit(_mlp_error, static_argnames="window")


def _mlp_optimizer(steps: int, learning_rate: float):
  return optax.adam(optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(1, steps // 20), steps))


@functools.partial(jax.jit, static_argnames=("window", "steps", "learning_rate"))
def _mlp_train(params, opt_state, inputs, source, target, order, window, steps, learning_rate):
  """The steps of one chunk of ``order`` [chunk steps, batch rows] (row indices), scanned."""
  optimizer = _mlp_optimizer(steps, learning_rate)

  def step(carry, rows):
    params, opt_state = carry
    grads = jax.grad(_mlp_error)(params, inputs, source[rows], target[rows], window)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  return jax.lax.scan(step, (params, opt_state), order)[0]


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

  def predict(self, source: np.ndarray, batch_rows: int = FIT_CHUNK_ROWS) -> np.ndarray:
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
  resample = resampling_matrix(source.shape[1], tokens).astype(np.float32)
  is_held = np.arange(n) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
  fit_rows, held_rows = np.flatnonzero(~is_held), np.flatnonzero(is_held)
  if not len(held_rows):
    raise ValueError(f"the MLP baseline needs at least {HOLDOUT_EVERY} training rows")
  total, squares = 0.0, 0.0
  for part in _chunks(len(fit_rows)):
    sums = _mlp_input_sums(np.asarray(source[fit_rows[part]], np.float32), resample, window)
    total = total + np.asarray(sums[0], np.float64)
    squares = squares + np.asarray(sums[1], np.float64)
  count = len(fit_rows) * tokens
  input_mean = total / count
  input_std = np.sqrt(np.maximum(squares / count - input_mean ** 2, 1e-12))
  inputs = (resample, input_mean.astype(np.float32), input_std.astype(np.float32))
  target = np.asarray(target, np.float64)
  target_mean = target[fit_rows].mean(0)
  target_std = np.maximum((target[fit_rows] - target_mean).reshape(-1, dim).std(0), 1e-12)
  source_device = jnp.asarray(source, jnp.float32)
  target_device = jnp.asarray(((target - target_mean) / target_std).astype(np.float32))
  params = _mlp_init(jax.random.PRNGKey(seed), len(input_mean), tokens, hidden, dim)
  opt_state = _mlp_optimizer(steps, learning_rate).init(params)
  batch_rows = max(1, batch_tokens // tokens)
  rng = np.random.default_rng(seed)
  epochs = -(-steps * batch_rows // len(fit_rows))
  order = np.concatenate([rng.permutation(fit_rows) for _ in range(epochs)])
  order = order[:steps * batch_rows].reshape(steps, batch_rows)
  held_rows = held_rows[:max(1, MLP_HELD_TOKENS // tokens)]
  held = (source_device[held_rows], target_device[held_rows])
  best, best_params, best_step = np.inf, params, 0
  for start in range(0, steps, MLP_EVAL_EVERY):
    chunk = order[start:start + MLP_EVAL_EVERY]
    params, opt_state = _mlp_train(params, opt_state, inputs, source_device, target_device,
                                   chunk, window, steps, learning_rate)
    error = float(_mlp_held_error(params, inputs, *held, window))
    if error < best:
      best, best_params, best_step = error, params, start + len(chunk)
  return MLPRegressor(resample, *inputs[1:], target_mean, target_std,
                      jax.tree.map(np.asarray, best_params), window, best_step)


@dataclasses.dataclass
class Ladder:
  """Every rung fitted on the same training rows: today's ``Baselines`` (the mean target and
  the per_token or pooled ridge), the resampled ridge, Procrustes (None where the dimensions
  differ) and the MLP."""
  baselines: Baselines
  ridge_resampled: ResampledRidge
  procrustes: Procrustes | None
  mlp: MLPRegressor

  def predictions(self, source: np.ndarray) -> dict:
    """Rung name (``LADDER``) -> its prediction of the raw target for these source rows."""
    out = {"mean": self.baselines.mean(len(source)), "ridge": self.baselines.ridge(source),
           "ridge_resampled": self.ridge_resampled.predict(source)}
    if self.procrustes is not None:
      out["procrustes"] = self.procrustes.predict(source)
    out["mlp"] = self.mlp.predict(source)
    return out


def fit_ladder(source: np.ndarray, target: np.ndarray, seed: int = 0,
               mlp_steps: int = MLP_STEPS) -> Ladder:
  """Fits every rung on raw training rows [rows, tokens, dim] (any float dtype)."""
  batches = ((source[part], target[part]) for part in _chunks(len(source)))
  return Ladder(fit_baselines(batches, source.shape[1:], target.shape[1:]),
                fit_resampled_ridge(source, target), fit_procrustes(source, target),
                fit_mlp(source, target, seed=seed, steps=mlp_steps))


def ladder_metrics(ladder: Ladder, source_raw: np.ndarray, target_raw: np.ndarray,
                   directions: np.ndarray | None = None) -> dict:
  """``baseline/<rung>_<figure>`` for the held-out rows, every figure of ``metrics.score``
  (with ``variance_ratio_along`` when ``directions`` are given)."""
  out = {}
  for name, pred in ladder.predictions(source_raw).items():
    for k, v in score(pred, target_raw, directions=directions).items():
      out[f"baseline/{name}_{k}"] = v
  return out
