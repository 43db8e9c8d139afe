"""Closed-form linear maps between token layouts: the resampling operator and the ridge fit.

Source and target features may have different layouts: equal square grids, a finer or a
coarser source grid (EVA at 448 px against CLIP at 336 px), patch tokens against a pooled
embedding, or 1-D token sequences. ``resampling_matrix`` is the fixed linear operator [target
tokens, source tokens] that puts the source onto the target's positions (identity for equal
layouts, area averaging when the source is finer, linear interpolation when it is coarser, the
mean for a pooled target, a copy for a pooled source). The model uses it for its per-position
source path, and ``LinearMap`` for the strongest closed-form map flowmap compares with:

  target[p] ~ W^T [resampled source[p], pooled source] + b[p]

one matrix shared by every position plus a per-position intercept, fitted by ridge regression
from sufficient statistics (float32 products of shifted rows, summed in float64, streaming
over batches), the penalty chosen on every 10th row. The same fitted map is the ridge
baseline and, where it beats the MLP of ``flowmap.mlp`` on held-out training rows (or with
``model.prior=linear``), the model's prior: the untrained model is then the Gaussian linear
model around it, so flowmap starts exactly at the linear map and learns what it misses.
Stored as ``.npz`` (no pickles).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np

ALPHAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
HOLDOUT_EVERY = 10   # every 10th fitted row chooses the ridge penalty


def _grid_side(tokens: int) -> Optional[int]:
  side = math.isqrt(tokens)
  return side if tokens > 1 and side * side == tokens else None


def _interval_weights(n_source: int, n_target: int) -> np.ndarray:
  """[n_target, n_source] weights of a 1-D resampling of cell-centred positions: the overlap
  of each target cell with the source cells when the source is at least as fine (area
  averaging), linear interpolation between source centres when it is coarser."""
  w = np.zeros((n_target, n_source))
  if n_source >= n_target:
    scale = n_source / n_target
    for i in range(n_target):
      lo, hi = i * scale, (i + 1) * scale
      for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_source)):
        w[i, j] = min(hi, j + 1) - max(lo, j)
    return w / w.sum(1, keepdims=True)
  for i in range(n_target):
    pos = (i + 0.5) * n_source / n_target - 0.5
    j0 = int(np.clip(np.floor(pos), 0, n_source - 1))
    j1 = min(j0 + 1, n_source - 1)
    frac = float(np.clip(pos - j0, 0.0, 1.0))
    w[i, j0] += 1.0 - frac
    w[i, j1] += frac
  return w


def resampling_matrix(source_tokens: int, target_tokens: int) -> np.ndarray:
  """The linear operator [target_tokens, source_tokens] (rows sum to 1) that resamples source
  tokens onto the target's positions; square grids are resampled along rows and columns."""
  if source_tokens == target_tokens:
    return np.eye(target_tokens)
  if target_tokens == 1:
    return np.full((1, source_tokens), 1.0 / source_tokens)
  if source_tokens == 1:
    return np.ones((target_tokens, 1))
  gs, gt = _grid_side(source_tokens), _grid_side(target_tokens)
  if gs and gt:
    one = _interval_weights(gs, gt)
    return np.kron(one, one)
  return _interval_weights(source_tokens, target_tokens)


def _features(source: np.ndarray, resample: np.ndarray, pooled: bool) -> np.ndarray:
  """[rows, target tokens, F]: each target position's resampled source token, and the pooled
  source (when both sides have several tokens; otherwise it repeats the first part)."""
  on_target = np.einsum("ts,nsd->ntd", resample, source)
  if not pooled:
    return on_target
  mean = np.broadcast_to(source.mean(1, keepdims=True),
                         (len(source), resample.shape[0], source.shape[-1]))
  return np.concatenate([on_target, mean], -1)


class _Stats:
  """Sufficient statistics of y[p] ~ f[p] W + b[p] over rows, per-position sums kept apart.

  ``add`` takes the two parts of f separately: the resampled source [rows, tokens, ds] and,
  when pooled, the pooled source [rows, ds], which is the same at every position of a row, so
  its blocks of f^T f and f^T y cost a [rows]-long product instead of a [rows * tokens] one
  (a quarter of the work at 256 tokens). The large products run in float32 on rows already
  shifted by a fixed reference (``fit`` subtracts the first batch's means), and are summed
  in float64 across batches."""

  def __init__(self, tokens: int, din: int, dout: int):
    self.n = 0
    self.xx = np.zeros((din, din))
    self.xy = np.zeros((din, dout))
    self.yy = np.zeros(dout)
    self.x_sum = np.zeros((tokens, din))
    self.y_sum = np.zeros((tokens, dout))

  def add(self, on_target: np.ndarray, pooled: Optional[np.ndarray], y: np.ndarray) -> None:
    rows, tokens, ds = on_target.shape
    self.n += rows
    flat_x = on_target.reshape(-1, ds)
    flat_y = y.reshape(-1, y.shape[-1])
    self.xx[:ds, :ds] += flat_x.T @ flat_x
    self.xy[:ds] += flat_x.T @ flat_y
    self.yy += np.einsum("nd,nd->d", flat_y, flat_y, dtype=np.float64)
    x_pos = on_target.sum(0, dtype=np.float64)
    self.x_sum[:, :ds] += x_pos
    self.y_sum += y.sum(0, dtype=np.float64)
    if pooled is not None:
      x_row = on_target.sum(1)                      # [rows, ds]: each row's sum over positions
      cross = x_row.T @ pooled
      self.xx[:ds, ds:] += cross
      self.xx[ds:, :ds] += cross.T
      self.xx[ds:, ds:] += tokens * (pooled.T @ pooled)
      self.xy[ds:] += pooled.T @ y.sum(1)
      self.x_sum[:, ds:] += pooled.sum(0, dtype=np.float64)

  def merged(self, other: "_Stats") -> "_Stats":
    out = _Stats(*self.x_sum.shape, self.yy.shape[0])
    out.n = self.n + other.n
    for name in ("xx", "xy", "yy", "x_sum", "y_sum"):
      setattr(out, name, getattr(self, name) + getattr(other, name))
    return out

  def solve(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(W [din, dout], b [tokens, dout]); the penalty, alpha times the mean centred input
    variance, leaves the per-position intercepts alone."""
    cxx = self.xx - self.x_sum.T @ self.x_sum / self.n
    cxy = self.xy - self.x_sum.T @ self.y_sum / self.n
    lam = alpha * max(np.trace(cxx) / len(cxx), 1e-12)
    w = np.linalg.solve(cxx + lam * np.eye(len(cxx)), cxy)
    return w, (self.y_sum - self.x_sum @ w) / self.n

  def sse(self, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per output dim, the sum of squared errors of (w, b) on the rows held here."""
    return (self.yy - 2 * np.sum(w * self.xy, 0) + np.sum(w * (self.xx @ w), 0)
            - 2 * np.sum(b * self.y_sum, 0) + 2 * np.sum(b * (self.x_sum @ w), 0)
            + self.n * np.sum(b * b, 0))


class LinearMap:
  """target[p] = W^T [resampled source[p], pooled source] + b[p], fitted in closed form."""

  def __init__(self, resample: np.ndarray, pooled: bool, weight: np.ndarray, bias: np.ndarray,
               residual_std: np.ndarray, alpha: float, rows: int,
               held_out_mse: float = float("nan")):
    self.resample, self.pooled = np.asarray(resample, np.float64), bool(pooled)
    self.weight, self.bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    self.residual_std = np.asarray(residual_std, np.float64)
    self.alpha, self.rows = float(alpha), int(rows)
    # The MSE on every 10th fitted row of the map fitted on the other nine (nan with fewer
    # than ten rows): what flowmap.workdir.fit_prior compares the MLP with.
    self.held_out_mse = float(held_out_mse)

  @property
  def kind(self) -> str:
    return "resampled+pooled" if self.pooled else "resampled"

  def __call__(self, source):
    """The map's prediction [rows, target tokens, target dim]; numpy in, float64 out, or a
    jax array in (inside jit too), float32 out."""
    if isinstance(source, np.ndarray):
      return _features(np.asarray(source, np.float64), self.resample, self.pooled) @ \
          self.weight + self.bias
    import jax.numpy as jnp
    source = source.astype(jnp.float32)
    on_target = jnp.einsum("ts,nsd->ntd", jnp.asarray(self.resample, jnp.float32), source)
    w = jnp.asarray(self.weight, jnp.float32)
    d = source.shape[-1]
    out = on_target @ w[:d]
    if self.pooled:
      out = out + (source.mean(1) @ w[d:])[:, None, :]
    return out + jnp.asarray(self.bias, jnp.float32)

  def save(self, path: str) -> None:
    with open(path, "wb") as f:
      np.savez(f, resample=self.resample, pooled=self.pooled, weight=self.weight,
               bias=self.bias, residual_std=self.residual_std, alpha=self.alpha,
               rows=self.rows, held_out_mse=self.held_out_mse)

  @classmethod
  def load(cls, path: str) -> "LinearMap":
    with np.load(path, allow_pickle=False) as z:
      return cls(z["resample"], bool(z["pooled"]), z["weight"], z["bias"], z["residual_std"],
                 float(z["alpha"]), int(z["rows"]),
                 float(z["held_out_mse"]) if "held_out_mse" in z.files else float("nan"))


def fit(batches: Iterable[tuple[np.ndarray, np.ndarray]], source_shape: Sequence[int],
        target_shape: Sequence[int], alphas: Sequence[float] = ALPHAS) -> LinearMap:
  """The ridge map from raw (source, target) batches: the penalty is chosen on every 10th row
  (per-dim held-out error summed), then the map is refitted on every row; the per-dim residual
  standard deviation on the fitted rows comes from the same statistics.

  Rows are shifted by the first batch's per-dim means before the float32 products (raw
  encoder features can sit far from zero, and the centring that follows would cancel what
  float32 kept); the shift only moves the intercepts, which are put back at the end."""
  (ns, ds), (nt, dt) = tuple(source_shape), tuple(target_shape)
  resample = resampling_matrix(ns, nt).astype(np.float32)
  pooled = ns > 1 and nt > 1
  din = ds * (2 if pooled else 1)
  fitted, held = _Stats(nt, din, dt), _Stats(nt, din, dt)
  seen, shift = 0, None
  for source, target in batches:
    source = np.array(source, np.float32)   # copies: the caller's batch is left alone
    target = np.array(target, np.float32)
    if shift is None:
      shift = (source.mean((0, 1)), target.mean((0, 1)))
    source -= shift[0]
    target -= shift[1]
    on_target = source if ns == nt else np.einsum("ts,nsd->ntd", resample, source)
    mean = source.mean(1) if pooled else None
    index = np.arange(seen, seen + len(source))
    seen += len(source)
    for stats, pick in ((fitted, index % HOLDOUT_EVERY != HOLDOUT_EVERY - 1),
                        (held, index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1)):
      if pick.any():
        stats.add(on_target[pick], None if mean is None else mean[pick], target[pick])
  if seen == 0:
    raise ValueError("no training rows to fit the linear map on")
  alpha, held_out_mse = 1e-3, float("nan")
  if held.n and fitted.n:
    errors = {a: float(held.sse(*fitted.solve(a)).sum()) for a in alphas}
    alpha = min(errors, key=errors.get)
    held_out_mse = max(errors[alpha], 0.0) / (held.n * nt * dt)
  every = fitted.merged(held) if held.n else fitted
  weight, bias = every.solve(alpha)
  residual_var = np.maximum(every.sse(weight, bias), 0.0) / (every.n * nt)
  source_shift = np.concatenate([shift[0]] * (2 if pooled else 1)).astype(np.float64)
  bias = bias + shift[1].astype(np.float64) - source_shift @ weight
  return LinearMap(resampling_matrix(ns, nt), pooled, weight, bias, np.sqrt(residual_var),
                   alpha, seen, held_out_mse)
