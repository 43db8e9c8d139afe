"""The baseline ladder: Procrustes and the MLP against maps they must recover, and the
ladder's figures (the linear map has its own tests, test_linear.py)."""

import numpy as np
import pytest
from scipy import stats

from flowmap import baselines, linear, metrics, mlp, synthetic

# ----------------------------------------------------------------------------- Procrustes

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

def _ridge(source, target):
  return linear.fit([(source, target)], source.shape[1:], target.shape[1:])


def _nonlinear(n, seed):
  rng = np.random.default_rng(seed)
  weights = np.random.default_rng(100).normal(size=(6, 4))
  source = rng.normal(size=(n, 1, 6))
  return source, np.tanh(2 * source @ weights) + 0.01 * rng.normal(size=(n, 1, 4))


def test_mlp_recovers_a_nonlinear_map_better_than_ridge_and_is_deterministic():
  source, target = _nonlinear(1000, 0)
  test_source, test_target = _nonlinear(256, 1)
  ridge = _ridge(source, target)
  fitted = mlp.fit(source, target, seed=3, steps=300, batch_tokens=128)
  closed_form = metrics.r2(ridge(test_source), test_target)
  learned = metrics.r2(fitted.predict(test_source), test_target)
  assert learned > 0.9 and learned > closed_form + 0.2, (learned, closed_form)
  again = mlp.fit(source, target, seed=3, steps=300, batch_tokens=128)
  np.testing.assert_array_equal(again.predict(test_source), fitted.predict(test_source))
  assert 0 < fitted.steps <= 300


def test_mlp_reports_its_held_out_error_and_maps_alike_in_numpy_jax_and_after_loading(
    tmp_path):
  """What the prior needs of the MLP: the error and per-dimension residual spread on the
  rows it was stopped on (every 10th), a jax path (inside jit) that agrees with numpy, and
  an npz round trip."""
  import jax
  source, target = _nonlinear(500, 2)
  fitted = mlp.fit(source, target, seed=0, steps=200, batch_tokens=128)
  held = np.arange(500) % mlp.HOLDOUT_EVERY == mlp.HOLDOUT_EVERY - 1
  residual = fitted.predict(source[held]) - target[held]
  assert fitted.held_out_mse == pytest.approx(np.mean(residual ** 2), rel=1e-6)
  np.testing.assert_allclose(fitted.residual_std, np.sqrt(np.mean(residual ** 2, (0, 1))),
                             rtol=1e-6)
  on_device = np.asarray(jax.jit(lambda s: fitted(s))(source[:7].astype(np.float32)))
  np.testing.assert_allclose(on_device, fitted(source[:7]), atol=1e-5)
  fitted.save(str(tmp_path / "m.npz"))
  loaded = mlp.MLPRegressor.load(str(tmp_path / "m.npz"))
  np.testing.assert_array_equal(loaded(source[:7]), fitted(source[:7]))
  assert (loaded.steps, loaded.held_out_mse) == (fitted.steps, fitted.held_out_mse)


# ----------------------------------------------------------------------------- the ladder

def test_ladder_figures_on_a_spread_task():
  """Every rung scored by the same figures; regressors keep ~none of the spread along the
  task's directions."""
  task = synthetic.make_task("spread_shared")
  train, held_out = task.rows(400, seed=0), task.rows(128, seed=1)
  ladder = baselines.fit_ladder(train[synthetic.SOURCE], train[synthetic.TARGET],
                                _ridge(train[synthetic.SOURCE], train[synthetic.TARGET]),
                                mlp_steps=200)
  figures = baselines.ladder_metrics(ladder, held_out[synthetic.SOURCE],
                                     held_out[synthetic.TARGET], task.directions)
  for rung in baselines.LADDER:
    for figure in ("cosine_token", "mse", "r2", "recall_at_1", "fd_pooled",
                   "variance_ratio_along"):
      assert np.isfinite(figures[f"baseline/{rung}_{figure}"]), (rung, figure)
    assert figures[f"baseline/{rung}_variance_ratio_along"] < 0.1
  assert figures["baseline/mlp_r2"] > figures["baseline/mean_r2"] + 0.3
  assert figures["baseline/mean_r2"] == pytest.approx(0, abs=0.05)


def test_ladder_without_procrustes_where_dimensions_differ():
  rng = np.random.default_rng(4)
  source, target = rng.normal(size=(50, 4, 3)), rng.normal(size=(50, 1, 2))
  ladder = baselines.fit_ladder(source, target, _ridge(source, target), mlp_steps=100)
  assert ladder.procrustes is None
  assert set(ladder.predictions(source[:3])) == set(baselines.LADDER) - {"procrustes"}
