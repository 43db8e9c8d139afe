"""Baselines, fitted on the training split and scored by the same metrics as flowmap.

A figure means something only next to what simple alternatives score on the same rows. The
ladder, each rung fitted on the same training rows (those the linear map was fitted on):

  mean        the mean training target at each position: no use of the source at all
  ridge       the closed-form linear map of ``flowmap.linear`` (the source resampled onto the
              target's token layout, with the pooled source beside it): the map a user
              would otherwise fit, and the base flowmap predicts relative to
  procrustes  an orthogonal map between standardised features, where the dimensions match
  mlp         a small per-position MLP over a 3 x 3 window of resampled source tokens and the
              pooled source (``flowmap.mlp``), fitted in seconds to minutes on a CPU; the
              run's own when ``model.prior`` fitted one (the same rows, the same fit)

All of them are point estimates of E[target | source]: compare them with flowmap's mean mode
on pointwise figures, and read their distribution figures (variance ratio, Frechet distance)
as what a regressor gives up. Fitting needs a pass over the training rows, so the figures
are computed once per run and cached in ``<workdir>/baseline.json``, refitted only when the
dataset, the features, the linear map or the rows change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional, Sequence

import jax
import numpy as np

from flowmap import data as data_lib
from flowmap import linear as linear_lib
from flowmap import mlp as mlp_lib
from flowmap.fileio import read_json, write_json_atomic
from flowmap.metrics import score

CACHE_FILE = "baseline.json"


# ----------------------------------------------------------------------------- the rungs

LADDER = ("mean", "ridge", "procrustes", "mlp")


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
  for part in mlp_lib.stat_chunks(len(source), target.shape[1]):
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


@dataclasses.dataclass
class Ladder:
  """Every rung fitted on the same training rows: the mean target (per position), the
  closed-form linear map (``flowmap.linear``), orthogonal Procrustes (None where the
  dimensions differ) and the MLP (None when left out)."""
  mean_target: np.ndarray            # [target tokens, target dim]
  ridge: linear_lib.LinearMap
  procrustes: Optional[Procrustes]
  mlp: Optional[mlp_lib.MLPRegressor]

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
               seed: int = 0, rungs: Sequence[str] = LADDER, mlp_steps: int = mlp_lib.STEPS,
               mlp: Optional[mlp_lib.MLPRegressor] = None) -> Ladder:
  """Fits the rungs named in ``rungs`` on raw training rows [rows, tokens, dim] (any float
  dtype) next to an already fitted linear map (and MLP, when ``mlp`` is given)."""
  if "mlp" in rungs and mlp is None:
    mlp = mlp_lib.fit(source, target, seed=seed, steps=mlp_steps)
  return Ladder(target.mean(0, dtype=np.float64), ridge,
                fit_procrustes(source, target) if "procrustes" in rungs else None,
                mlp if "mlp" in rungs else None)


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
          "mlp": [mlp_lib.HIDDEN, mlp_lib.WINDOW, int(config.model.prior_mlp_steps),
                  mlp_lib.BATCH_TOKENS, int(config.seed)]}


def run_baselines(config, data_dir: str, workdir: str, ridge: linear_lib.LinearMap,
                  training_split: str, source_raw: np.ndarray, target_raw: np.ndarray,
                  held_out_split: str, directions: Optional[np.ndarray] = None,
                  mlp: Optional[mlp_lib.MLPRegressor] = None) -> dict:
  """The ``baseline/...`` figures of the held-out rows: the run's linear map ``ridge`` and
  the rungs of ``eval.baselines`` fitted on ``training_split`` (a tfds split string of the
  same rows the linear map was fitted on; ``mlp``: the run's MLP already fitted on them),
  from ``<workdir>/baseline.json`` when it was computed for the same data, map and rows,
  else fitted now and cached."""
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
                        rungs=config.eval.baselines, mlp_steps=config.model.prior_mlp_steps,
                        mlp=mlp)
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
