"""The baseline ladder: the resampling between token layouts, the resampled ridge, Procrustes
and the MLP against maps they must recover, and the ladder's figures."""

import numpy as np
import pytest
from scipy import stats

from flowmap import baselines, metrics, synthetic

# ----------------------------------------------------------------------------- resampling


def test_resampling_between_layouts():
  down = baselines.resampling_matrix(64, 16)            # 8 x 8 -> 4 x 4: 2 x 2 area means
  grid = np.arange(64.0).reshape(8, 8)
  np.testing.assert_allclose(down @ grid.ravel(), grid.reshape(4, 2, 4, 2).mean((1, 3)).ravel())
  up = baselines.resampling_matrix(16, 64)              # 4 x 4 -> 8 x 8: bilinear
  ramp = np.add.outer(np.arange(4.0), 2 * np.arange(4.0)).ravel()
  fine = (up @ ramp).reshape(8, 8)
  centres = (np.arange(8) + 0.5) / 2 - 0.5               # fine cell centres in coarse units
  expected = np.add.outer(np.clip(centres, 0, 3), 2 * np.clip(centres, 0, 3))
  np.testing.assert_allclose(fine, expected)
  np.testing.assert_allclose(baselines.resampling_matrix(64, 1), np.full((1, 64), 1 / 64))
  np.testing.assert_allclose(baselines.resampling_matrix(1, 16), np.ones((16, 1)))
  np.testing.assert_allclose(baselines.resampling_matrix(16, 16), np.eye(16))
  sequence = baselines.resampling_matrix(6, 4)           # not square grids: 1-D overlap
  np.testing.assert_allclose(sequence[1], [0, 1 / 3, 2 / 3, 0, 0, 0])
  for m in (down, up, sequence, baselines.resampling_matrix(32 * 32, 24 * 24)):
    np.testing.assert_allclose(m.sum(1), 1)


# ----------------------------------------------------------------------------- linear rungs

def test_resampled_ridge_recovers_a_map_of_resampled_and_pooled_source():
  rng = np.random.default_rng(0)
  source = rng.normal(size=(300, 16, 5)) + 1.0
  local, pooled = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  offsets = rng.normal(size=(64, 3))
  resampled = np.einsum("ts,nsd->ntd", baselines.resampling_matrix(16, 64), source)
  target = resampled @ local + (source.mean(1) @ pooled)[:, None] + offsets
  ridge = baselines.fit_resampled_ridge(source, target)
  new = rng.normal(size=(7, 16, 5))
  expected = (np.einsum("ts,nsd->ntd", ridge.resample, new) @ local
              + (new.mean(1) @ pooled)[:, None] + offsets)
  np.testing.assert_allclose(ridge.predict(new), expected, atol=1e-3)


def test_procrustes_recovers_an_orthogonal_map_exactly():
  """Whitened source rows (so standardising is one common scale on both sides) and a target
  that is a rotation plus a translation of them: the fit is the map itself."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(400, 6))
  x -= x.mean(0)
  x = x @ np.linalg.inv(np.linalg.cholesky(x.T @ x / len(x))).T
  source = (2.0 * x + rng.normal(size=6)).reshape(100, 4, 6)
  rotation = stats.ortho_group.rvs(6, random_state=2)
  shift = rng.normal(size=6)
  fitted = baselines.fit_procrustes(source, source @ rotation + shift)
  np.testing.assert_allclose(fitted.rotation, rotation, atol=1e-9)
  new = rng.normal(size=(5, 4, 6))
  np.testing.assert_allclose(fitted.predict(new), new @ rotation + shift, atol=1e-9)
  assert baselines.fit_procrustes(source, source[..., :4]) is None


# ----------------------------------------------------------------------------- MLP

def _nonlinear(n, seed):
  rng = np.random.default_rng(seed)
  weights = np.random.default_rng(100).normal(size=(6, 4))
  source = rng.normal(size=(n, 1, 6))
  return source, np.tanh(2 * source @ weights) + 0.01 * rng.normal(size=(n, 1, 4))


def test_mlp_recovers_a_nonlinear_map_better_than_ridge_and_is_deterministic():
  source, target = _nonlinear(1000, 0)
  test_source, test_target = _nonlinear(256, 1)
  ridge = baselines.fit_resampled_ridge(source, target)
  mlp = baselines.fit_mlp(source, target, seed=3, steps=300, batch_tokens=128)
  linear = metrics.r2(ridge.predict(test_source), test_target)
  learned = metrics.r2(mlp.predict(test_source), test_target)
  assert learned > 0.9 and learned > linear + 0.2, (learned, linear)
  again = baselines.fit_mlp(source, target, seed=3, steps=300, batch_tokens=128)
  np.testing.assert_array_equal(again.predict(test_source), mlp.predict(test_source))
  assert 0 < mlp.steps <= 300


# ----------------------------------------------------------------------------- the ladder

def test_ladder_figures_on_a_spread_task():
  """Every rung scored by the same figures; regressors keep ~none of the spread along the
  task's directions."""
  task = synthetic.make_task("spread_shared")
  train, held_out = task.rows(400, seed=0), task.rows(128, seed=1)
  ladder = baselines.fit_ladder(train[synthetic.SOURCE], train[synthetic.TARGET],
                                mlp_steps=200)
  figures = baselines.ladder_metrics(ladder, held_out[synthetic.SOURCE],
                                     held_out[synthetic.TARGET], task.directions)
  for rung in baselines.LADDER:
    for figure in ("cosine_token", "mse", "r2", "recall_at_1", "fd_pooled",
                   "variance_ratio_along"):
      assert np.isfinite(figures[f"baseline/{rung}_{figure}"]), (rung, figure)
    assert figures[f"baseline/{rung}_variance_ratio_along"] < 0.1
  assert figures["baseline/ridge_resampled_r2"] > figures["baseline/ridge_r2"]
  assert figures["baseline/mlp_r2"] > figures["baseline/mean_r2"] + 0.3
  assert figures["baseline/mean_r2"] == pytest.approx(0, abs=0.05)


def test_ladder_without_procrustes_where_dimensions_differ():
  rng = np.random.default_rng(4)
  source, target = rng.normal(size=(50, 4, 3)), rng.normal(size=(50, 1, 2))
  ladder = baselines.fit_ladder(source, target, mlp_steps=100)
  assert ladder.procrustes is None
  assert set(ladder.predictions(source[:3])) == set(baselines.LADDER) - {"procrustes"}
