"""Baselines, fitted on the training split and scored by the same metrics as flowmap.

A figure means something only next to what a simple alternative scores on the same rows: a
closed-form ridge regression from source to target fitted on (a bounded part of) the training
split, and the trivial predictor that outputs the mean training target. They need one pass
over the training split, so they are computed once per run and cached in
``<workdir>/baseline.json``; they are refitted only when the dataset, the features or the
number of rows change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterable, Sequence

import jax
import numpy as np

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
