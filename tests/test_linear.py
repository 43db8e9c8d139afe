"""Closed-form linear maps between token layouts: resampling operators and the ridge fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowmap import linear


def test_a_finer_source_grid_is_area_averaged_onto_the_target_grid():
  r = linear.resampling_matrix(16, 4)    # 4 x 4 -> 2 x 2
  grid = np.arange(16.0).reshape(4, 4)
  expected = grid.reshape(2, 2, 2, 2).mean((1, 3)).ravel()
  np.testing.assert_allclose(r @ grid.ravel(), expected)
  r = linear.resampling_matrix(64, 16)   # 8 x 8 -> 4 x 4 (EVA 448 px vs 224 px)
  np.testing.assert_allclose(r.sum(1), 1.0)
  assert (r > 0).sum(1).tolist() == [4] * 16


def test_a_non_integer_ratio_averages_by_overlap():
  r = linear._interval_weights(3, 2)     # cells [0, 1.5) and [1.5, 3) over three cells
  np.testing.assert_allclose(r, [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])


def test_a_coarser_source_is_interpolated_and_keeps_a_linear_ramp():
  r = linear.resampling_matrix(4, 16)    # 2 x 2 -> 4 x 4
  np.testing.assert_allclose(r.sum(1), 1.0)
  one = linear._interval_weights(4, 8)   # 1-D: a ramp stays a ramp inside the hull
  ramp = np.arange(4.0)
  inside = one @ ramp
  np.testing.assert_allclose(inside[1:-1], (np.arange(8)[1:-1] + 0.5) / 2 - 0.5)


def test_pooled_layouts():
  np.testing.assert_allclose(linear.resampling_matrix(9, 1), np.full((1, 9), 1 / 9))
  np.testing.assert_allclose(linear.resampling_matrix(1, 9), np.ones((9, 1)))
  np.testing.assert_allclose(linear.resampling_matrix(5, 5), np.eye(5))
  assert linear.resampling_matrix(7, 5).shape == (5, 7)   # 1-D sequences


def _batches(source, target, size=50):
  for i in range(0, len(source), size):
    yield source[i:i + size], target[i:i + size]


@pytest.mark.parametrize("source_shape,target_shape", [((16, 6), (4, 5)), ((4, 6), (16, 5)),
                                                       ((16, 6), (16, 5)), ((9, 6), (1, 5)),
                                                       ((1, 6), (1, 5))])
def test_fit_recovers_a_map_of_its_form_exactly(source_shape, target_shape):
  rng = np.random.default_rng(0)
  (ns, ds), (nt, dt) = source_shape, target_shape
  pooled = ns > 1 and nt > 1
  weight = rng.normal(size=(ds * (2 if pooled else 1), dt))
  bias = rng.normal(size=(nt, dt))
  source = rng.normal(size=(400, ns, ds))
  truth = linear.LinearMap(linear.resampling_matrix(ns, nt), pooled, weight, bias,
                           np.ones(dt), 0.0, 0)
  fitted = linear.fit(_batches(source, truth(source)), source_shape, target_shape,
                      alphas=(1e-9,))
  np.testing.assert_allclose(fitted.weight, weight, atol=1e-5)
  np.testing.assert_allclose(fitted.bias, bias, atol=1e-5)
  assert fitted.rows == 400 and fitted.kind == ("resampled+pooled" if pooled else "resampled")


def test_the_float32_statistics_hold_for_features_far_from_zero():
  # Raw encoder features can carry a large common offset; the fit's float32 products are
  # taken after a shift, so centring does not cancel the signal away.
  rng = np.random.default_rng(3)
  source = rng.normal(size=(300, 16, 6)) * 0.01 + 300.0
  weight = rng.normal(size=(12, 5))
  truth = linear.LinearMap(linear.resampling_matrix(16, 4), True, weight,
                           rng.normal(size=(4, 5)) - 50.0, np.ones(5), 0.0, 0)
  fitted = linear.fit(_batches(source, truth(source)), (16, 6), (4, 5), alphas=(1e-9,))
  residual = truth(source) - fitted(source)
  assert np.abs(residual).max() < 1e-3 * truth(source).std()


def test_residual_std_and_penalty_choice_from_the_statistics():
  rng = np.random.default_rng(1)
  source = rng.normal(size=(600, 16, 6))
  noise_std = np.array([0.1, 0.5, 1.0])
  on_target = np.einsum("ts,nsd->ntd", linear.resampling_matrix(16, 4), source)
  target = on_target[..., :3] * 2.0 + rng.normal(size=(600, 4, 3)) * noise_std
  fitted = linear.fit(_batches(source, target), (16, 6), (4, 3))
  residual = target - fitted(source)
  np.testing.assert_allclose(fitted.residual_std, residual.reshape(-1, 3).std(0), rtol=1e-4)
  np.testing.assert_allclose(fitted.residual_std, noise_std, rtol=0.1)
  # Pure noise to fit: the held-out rows choose a strong penalty, a clean signal a weak one.
  pure = linear.fit(_batches(source[:200], rng.normal(size=(200, 4, 3))), (16, 6), (4, 3))
  assert pure.alpha >= 1.0 and fitted.alpha <= 1e-2


def test_the_jax_path_equals_numpy_and_the_file_round_trips(tmp_path):
  rng = np.random.default_rng(2)
  source = rng.normal(size=(100, 16, 6))
  fitted = linear.fit(_batches(source, rng.normal(size=(100, 4, 5))), (16, 6), (4, 5))
  on_device = jax.jit(fitted.__call__)(jnp.asarray(source, jnp.float32))
  np.testing.assert_allclose(on_device, fitted(source), atol=1e-4)
  fitted.save(str(tmp_path / "map.npz"))
  again = linear.LinearMap.load(str(tmp_path / "map.npz"))
  np.testing.assert_array_equal(again(source), fitted(source))
  assert (again.alpha, again.rows, again.pooled) == (fitted.alpha, fitted.rows, fitted.pooled)
