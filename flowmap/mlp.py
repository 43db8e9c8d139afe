"""A small per-position MLP regressor of the target on the source: the baseline ladder's MLP
rung and, where it beats the closed-form linear map on held-out training rows, the model's
prior (``model.prior``, see ``flowmap.workdir.fit_prior``).

At each target position it reads the resampled source tokens of a 3 x 3 neighbourhood (the
token alone when the target is not a square grid), the pooled source and a learned embedding
of the position, through two GELU layers, and predicts the standardised target. Fitted with
Adam from a zero output layer (the mean target) on nine rows in ten and early-stopped on the
tenth.

It learns the target itself, not the linear map's residual: measured on the pooled synthetic
pair at 2,000 rows, the same MLP fitted to the residual of the linear map (or with a linear
path trained beside it) only overfits (held-out error rising from the linear map's own),
while from scratch it ends 38% below the linear map. The nonlinear part of these targets lies
along directions that also carry their linear part; a network that must fit the linear part
through its hidden units finds those directions, one handed the residual does not.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flowmap import linear as linear_lib

HOLDOUT_EVERY = linear_lib.HOLDOUT_EVERY   # every 10th row stops the training early
HIDDEN = 128
WINDOW = 3             # a 3 x 3 neighbourhood of resampled source tokens
STEPS = 8000           # at 2,000 pooled rows the held-out error still falls at 4,000 steps
BATCH_TOKENS = 512     # target tokens per step: rows per batch = this / target tokens
LEARNING_RATE = 3e-3
EVAL_EVERY = 100       # steps between held-out checks (early stopping keeps the best)
HELD_TOKENS = 16384    # target tokens of held-out rows per check: checks cost ~1/10
CHUNK_TOKENS = 4096    # target tokens whose inputs are built at once outside training
                       # (256 x 1024 tokens: 9 x 1024 + 1024 inputs each, 170 MB)
STAT_CHUNK_ROWS = 256  # rows cast to float64 at a time for statistics,
STAT_CHUNK_TOKENS = 16384   # and no more target tokens than this


def chunks(rows: int, size: int):
  for start in range(0, rows, size):
    yield slice(start, min(start + size, rows))


def stat_chunks(rows: int, tokens: int):
  """Chunks of rows for float64 statistics: bounded in rows and in target tokens."""
  return chunks(rows, max(1, min(STAT_CHUNK_ROWS, STAT_CHUNK_TOKENS // tokens)))


def _inputs(source, resample, window: int):
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


def _init(key, features: int, tokens: int, hidden: int, dim: int) -> dict:
  """Scaled normal hidden layers; a zero output layer, so the MLP starts at the mean target."""
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (features, hidden)) / np.sqrt(features),
          "b1": jnp.zeros(hidden), "position": jnp.zeros((tokens, hidden)),
          "w2": jax.random.normal(k2, (hidden, hidden)) / np.sqrt(hidden),
          "b2": jnp.zeros(hidden), "w3": jnp.zeros((hidden, dim)), "b3": jnp.zeros(dim)}


def _apply(params: dict, x):
  h = jax.nn.gelu(x @ params["w1"] + params["b1"] + params["position"])
  h = jax.nn.gelu(h @ params["w2"] + params["b2"])
  return h @ params["w3"] + params["b3"]


def _error(params, inputs, source, target, window):
  """Mean squared error in the standardised target space; ``inputs`` = (resample, input mean,
  input std, target mean, target std); source and target rows raw, in their stored dtype."""
  resample, input_mean, input_std, target_mean, target_std = inputs
  x = (_inputs(source.astype(jnp.float32), resample, window) - input_mean) / input_std
  y = (target.astype(jnp.float32) - target_mean) / target_std
  return jnp.mean((_apply(params, x) - y) ** 2)


_held_error = jax.jit(_error, static_argnames="window")


def _optimizer(steps: int, learning_rate: float):
  return optax.adam(optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(1, steps // 20), steps))


@functools.partial(jax.jit, static_argnames=("window", "steps", "learning_rate"))
def _train(params, opt_state, inputs, source, target, window, steps, learning_rate):
  """The steps of one chunk, scanned: ``source`` and ``target`` [chunk steps, batch rows,
  tokens, dim], each step's rows gathered on the host (the training rows never go to the
  device whole)."""
  optimizer = _optimizer(steps, learning_rate)

  def step(carry, rows):
    params, opt_state = carry
    grads = jax.grad(_error)(params, inputs, *rows, window)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  return jax.lax.scan(step, (params, opt_state), (source, target))[0]


@functools.partial(jax.jit, static_argnames="window")
def _input_sums(source, resample, window):
  """Sum and sum of squares of the MLP's inputs over these rows and positions."""
  x = _inputs(source, resample, window)
  return x.sum((0, 1)), (x * x).sum((0, 1))


def _standardised_prediction(params, resample, input_mean, input_std, source, window):
  return _apply(params, (_inputs(source, resample, window) - input_mean) / input_std)


_predict = jax.jit(_standardised_prediction, static_argnames="window")


@dataclasses.dataclass
class MLPRegressor:
  """The fitted MLP. Called like ``flowmap.linear.LinearMap``: numpy source rows in, float64
  predictions out; a jax array in (inside jit too), float32 out."""
  resample: np.ndarray        # [target tokens, source tokens]
  input_mean: np.ndarray      # [features], float32
  input_std: np.ndarray
  target_mean: np.ndarray     # [target tokens, target dim]
  target_std: np.ndarray      # [target dim]
  params: dict                # numpy arrays
  window: int
  steps: int                  # the training step whose held-out error was lowest (kept)
  held_out_mse: float         # raw-space MSE on the held-out rows, at that step
  residual_std: np.ndarray    # [target dim]: the raw residual's RMS on those rows

  def _args(self, xp):
    return (xp.asarray(self.resample, np.float32), xp.asarray(self.input_mean, np.float32),
            xp.asarray(self.input_std, np.float32))

  def __call__(self, source):
    if isinstance(source, np.ndarray):
      return self.predict(source)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), self.params)
    out = _standardised_prediction(params, *self._args(jnp), source.astype(jnp.float32),
                                   self.window)
    return (out * jnp.asarray(self.target_std, jnp.float32)
            + jnp.asarray(self.target_mean, jnp.float32))

  def predict(self, source: np.ndarray, batch_rows: int = 0) -> np.ndarray:
    batch_rows = batch_rows or max(1, CHUNK_TOKENS // self.resample.shape[0])
    out = [np.asarray(_predict(self.params, *self._args(np),
                               np.asarray(source[part], np.float32), self.window))
           for part in chunks(len(source), batch_rows)]
    return np.concatenate(out).astype(np.float64) * self.target_std + self.target_mean

  def save(self, path: str) -> None:
    with open(path, "wb") as f:
      np.savez(f, resample=self.resample, input_mean=self.input_mean,
               input_std=self.input_std, target_mean=self.target_mean,
               target_std=self.target_std, window=self.window, steps=self.steps,
               held_out_mse=self.held_out_mse, residual_std=self.residual_std,
               **{f"params/{k}": v for k, v in self.params.items()})

  @classmethod
  def load(cls, path: str) -> "MLPRegressor":
    with np.load(path, allow_pickle=False) as z:
      params = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("params/")}
      return cls(z["resample"], z["input_mean"], z["input_std"], z["target_mean"],
                 z["target_std"], params, int(z["window"]), int(z["steps"]),
                 float(z["held_out_mse"]), z["residual_std"])


def fit(source: np.ndarray, target: np.ndarray, seed: int = 0, hidden: int = HIDDEN,
        window: int = WINDOW, steps: int = STEPS, batch_tokens: int = BATCH_TOKENS,
        learning_rate: float = LEARNING_RATE) -> MLPRegressor:
  """Adam with warm-up and cosine decay on nine rows in ten; every ``EVAL_EVERY`` steps the
  error on every ``HOLDOUT_EVERY``-th row (never trained on; the first ``HELD_TOKENS``
  target tokens' worth of them) is measured and the best parameters are kept (early
  stopping). Deterministic given ``seed`` (initialisation and row order). A step sees
  ``batch_tokens`` target tokens whatever the layout, so the cost is about steps x
  batch_tokens x (features + hidden + dim) x hidden x 6 FLOPs."""
  n, tokens, dim = target.shape
  resample = linear_lib.resampling_matrix(source.shape[1], tokens).astype(np.float32)
  is_held = np.arange(n) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
  fit_rows, held_rows = np.flatnonzero(~is_held), np.flatnonzero(is_held)
  if not len(held_rows):
    raise ValueError(f"the MLP needs at least {HOLDOUT_EVERY} training rows")
  total, squares = 0.0, 0.0
  chunk_rows = max(1, CHUNK_TOKENS // tokens)
  for part in chunks(len(fit_rows), chunk_rows):
    sums = _input_sums(np.asarray(source[fit_rows[part]], np.float32), resample, window)
    total = total + np.asarray(sums[0], np.float64)
    squares = squares + np.asarray(sums[1], np.float64)
  count = len(fit_rows) * tokens
  input_mean = total / count
  input_std = np.sqrt(np.maximum(squares / count - input_mean ** 2, 1e-12))
  # The target's statistics in chunks, and the rows in their stored dtype (normalised inside
  # the step): no float32 or float64 copy of the training rows.
  target_mean = sum(target[fit_rows[part]].sum(0, dtype=np.float64)
                    for part in stat_chunks(len(fit_rows), tokens)) / len(fit_rows)
  spread = sum(np.square(target[fit_rows[part]] - target_mean).sum((0, 1))
               for part in stat_chunks(len(fit_rows), tokens)) / count
  target_std = np.maximum(np.sqrt(spread), 1e-12)
  inputs = (resample, input_mean.astype(np.float32), input_std.astype(np.float32),
            target_mean.astype(np.float32), target_std.astype(np.float32))
  params = _init(jax.random.PRNGKey(seed), len(input_mean), tokens, hidden, dim)
  opt_state = _optimizer(steps, learning_rate).init(params)
  batch_rows = max(1, batch_tokens // tokens)
  rng = np.random.default_rng(seed)
  epochs = -(-steps * batch_rows // len(fit_rows))
  order = np.concatenate([rng.permutation(fit_rows) for _ in range(epochs)])
  order = order[:steps * batch_rows].reshape(steps, batch_rows)
  held_rows = held_rows[:max(1, HELD_TOKENS // tokens)]
  held = [(jnp.asarray(source[held_rows[part]]), jnp.asarray(target[held_rows[part]]))
          for part in chunks(len(held_rows), chunk_rows)]
  best, best_params, best_step = np.inf, params, 0
  for start in range(0, steps, EVAL_EVERY):
    chunk = order[start:start + EVAL_EVERY]
    params, opt_state = _train(params, opt_state, inputs, source[chunk], target[chunk],
                               window, steps, learning_rate)
    error = sum(float(_held_error(params, inputs, *rows, window)) * len(rows[0])
                for rows in held) / len(held_rows)
    if error < best:
      best, best_params, best_step = error, params, start + len(chunk)
  fitted = MLPRegressor(resample, *inputs[1:3], target_mean, target_std,
                        jax.tree.map(np.asarray, best_params), window, best_step, 0.0,
                        np.zeros(dim))
  squared = np.zeros(dim)
  for part in chunks(len(held_rows), chunk_rows):
    rows = held_rows[part]
    squared += np.square(fitted.predict(source[rows]) - np.asarray(target[rows], np.float64)
                         ).sum((0, 1))
  fitted.residual_std = np.sqrt(squared / (len(held_rows) * tokens))
  fitted.held_out_mse = float(squared.sum() / (len(held_rows) * tokens * dim))
  return fitted
