"""flowmap.metrics against independent computations and closed forms on Gaussian cases, the
accumulator against the one-shot functions, and figures that do not depend on batching."""

import math

import numpy as np
import pytest
import scipy.linalg
from scipy import special, stats

from flowmap import metrics
from flowmap.metrics import (Metrics, density_coverage, energy_score, frechet_distance, r2,
                             random_projection, score, spread_skill, variance_ratio)


def _correlated(rng, n, d, scale=1.0):
  mixing = rng.normal(size=(d, d)) * scale
  return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_equals_scipy_sqrtm():
  rng = np.random.default_rng(0)
  a, b = _correlated(rng, 300, 12), _correlated(rng, 250, 12, scale=0.7)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(s1 @ s2)
  reference = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(root).real)
  assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)
  assert frechet_distance(b, a) == pytest.approx(reference, rel=1e-6)


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(1)
  true = _correlated(rng, 200, 6)
  cov = np.cov(true, rowvar=False)
  assert frechet_distance(true, true) < 1e-9 * np.trace(cov)
  shift = rng.normal(size=6)
  assert frechet_distance(true + shift, true) == pytest.approx(shift @ shift, rel=1e-7)
  # A collapsed set (zero covariance, the singular case): offset plus the truth's trace.
  centre = rng.normal(size=6)
  collapsed = np.broadcast_to(centre, true.shape)
  expected = np.sum((centre - true.mean(0)) ** 2) + np.trace(cov)
  assert frechet_distance(collapsed, true) == pytest.approx(expected, rel=1e-12)
  assert math.isnan(frechet_distance(true[:1], true))
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    frechet_distance(true, true[:, :5])


@pytest.mark.parametrize("dim", [40, 300])
def test_fd_figures_use_one_fixed_projection_above_their_sizes(dim):
  """fd_pooled: one FD of the pooled vectors; fd_tokens: the mean of the per-position FDs;
  each in a fixed orthonormal random view once dim exceeds its size (256 and 64)."""
  rng = np.random.default_rng(2)
  true = rng.normal(size=(300, 2, dim)) + rng.normal(size=(2, dim))
  gen = 0.8 * true + 0.5 * rng.normal(size=true.shape)
  figures = score(gen, true)

  def view(x, size):
    if dim <= size:
      return x
    p = random_projection(dim, size)
    np.testing.assert_allclose(p.T @ p, np.eye(size), atol=1e-12)
    return x @ p

  pooled = frechet_distance(view(gen.mean(1), 256), view(true.mean(1), 256))
  tokens = np.mean([frechet_distance(view(gen[:, t], 64), view(true[:, t], 64))
                    for t in range(2)])
  assert figures["fd_pooled"] == pytest.approx(pooled, rel=1e-9)
  assert figures["fd_tokens"] == pytest.approx(tokens, rel=1e-9)
  assert figures["fd_pooled"] > 0.1
  if dim > 64:   # seeded: a fresh computation gives the cached matrix
    np.testing.assert_array_equal(random_projection(dim, 64),
                                  random_projection.__wrapped__(dim, 64))


def test_fd_tokens_sees_what_pooling_hides():
  """Tokens swapped between positions keep every pooled vector: fd_pooled stays 0, fd_tokens
  does not."""
  rng = np.random.default_rng(3)
  true = rng.normal(size=(200, 2, 5)) + np.array([[0.0] * 5, [3.0] * 5])
  figures = score(true[:, ::-1], true)
  assert figures["fd_pooled"] < 1e-9
  assert figures["fd_tokens"] > 10


# ----------------------------------------------------------------------------- variance ratio

def test_variance_ratio_on_known_scalings():
  rng = np.random.default_rng(4)
  true = rng.normal(size=(50, 3, 4)) * rng.uniform(0.5, 2, size=(3, 4)) + 7.0
  true[:, 2, 3] = 1.5                                        # a coordinate that never varies
  scale = np.where(np.arange(4) < 2, 0.5, 1.0)               # halved spread in half the dims
  gen = true.mean(0) + scale * (true - true.mean(0))
  ratios = variance_ratio(gen, true)
  expected = np.broadcast_to(scale ** 2, (3, 4)).copy()
  expected[2, 3] = np.nan
  np.testing.assert_allclose(ratios, expected, rtol=1e-12)
  figures = score(gen, true)
  assert figures["variance_ratio"] == pytest.approx((6 * 0.25 + 5 * 1.0) / 11, rel=1e-12)
  assert figures["variance_ratio_below_half"] == pytest.approx(6 / 11)
  assert score(np.broadcast_to(true[0], true.shape), true)["variance_ratio"] < 1e-12


def test_variance_ratio_along_given_directions():
  """Spread kept in every direction but one, which keeps 30% of its standard deviation: the
  ratio along it is 0.09, along an orthogonal direction 1; in the [k, tokens, dim] form (a
  direction of the whole feature array) and the [k, dim] form (one direction per token)."""
  rng = np.random.default_rng(5)
  true = rng.normal(size=(80, 3, 4)) + 2.0
  centred = true - true.mean(0)
  u = rng.normal(size=(3, 4))
  u /= np.linalg.norm(u)
  v = rng.normal(size=(3, 4))
  v -= (v * u).sum() * u
  gen = true - 0.7 * np.einsum("n,td->ntd", np.einsum("ntd,td->n", centred, u), u)
  np.testing.assert_allclose(variance_ratio(gen, true, np.stack([u, v])), [0.09, 1.0],
                             rtol=1e-10)
  m = Metrics(directions=np.stack([u, v]))
  m.add(gen[:30], true[:30])
  m.add(gen[30:], true[30:])
  assert m.result()["variance_ratio_along"] == pytest.approx((0.09 + 1.0) / 2, rel=1e-10)

  w = rng.normal(size=4)
  w /= np.linalg.norm(w)
  per_token = true - 0.7 * np.einsum("nt,d->ntd", centred @ w, w)
  np.testing.assert_allclose(variance_ratio(per_token, true, w[None]), np.full((3, 1), 0.09),
                             rtol=1e-10)
  assert score(per_token, true, directions=w[None])["variance_ratio_along"] == pytest.approx(
      0.09, rel=1e-10)
  with pytest.raises(ValueError, match="directions"):
    score(gen, true, directions=np.ones((2, 5)))


# ----------------------------------------------------------------------------- r2

def test_r2_is_not_inflated_by_a_common_offset():
  rng = np.random.default_rng(6)
  true = rng.normal(size=(60, 4, 8)) + 20.0
  assert score(true, true)["r2"] == pytest.approx(1.0)
  mean = score(np.broadcast_to(true.mean(0), true.shape), true)
  assert mean["cosine_global"] > 0.99 and abs(mean["r2"]) < 1e-12
  gen = true + 0.5 * rng.normal(size=true.shape)
  direct = 1 - np.sum((gen - true) ** 2) / np.sum((true - true.mean(0)) ** 2)
  assert r2(gen, true) == pytest.approx(direct, rel=1e-12)
  m = Metrics()
  for i in range(0, 60, 7):
    m.add(gen[i:i + 7], true[i:i + 7])
  assert m.result()["r2"] == pytest.approx(direct, rel=1e-10)
  assert 0.7 < direct < 0.8                                # 1 - 0.25 / 1


# ----------------------------------------------------------------------------- energy score

def _crps_gaussian(y, mu, sigma):
  z = (y - mu) / sigma
  return sigma * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))


@pytest.mark.parametrize("k", [2, 8])
def test_energy_score_converges_to_the_1d_closed_form(k):
  """In one dimension the energy score is the CRPS; the unbiased estimate converges to it at
  any K, the smallest included."""
  rng = np.random.default_rng(7)
  rows = 100_000
  samples = 0.3 + 1.2 * rng.normal(size=(rows, k, 1, 1))
  true = np.full((rows, 1, 1), 1.5)
  assert energy_score(samples, true) == pytest.approx(_crps_gaussian(1.5, 0.3, 1.2), rel=0.01)


def test_energy_score_rewards_the_true_spread_on_isotropic_gaussians():
  """y ~ N(0, tau^2 I_d), samples ~ N(0, sigma^2 I_d): the expected score is
  c (sqrt(2 (sigma^2 + tau^2)) - sigma), c = sqrt(2) Gamma((d + 1) / 2) / Gamma(d / 2)
  (E||N(0, I_d)||), minimal at sigma = tau, so the true spread beats both a collapsed and an
  over-dispersed sampler."""
  rng = np.random.default_rng(8)
  rows, k, d, tau = 20_000, 4, 3, 1.0
  c = np.sqrt(2) * np.exp(special.gammaln((d + 1) / 2) - special.gammaln(d / 2))
  true = tau * rng.normal(size=(rows, 1, d))
  noise = rng.normal(size=(rows, k, 1, d))
  scores = {}
  for sigma in (0.0, tau, 2 * tau):
    scores[sigma] = energy_score(sigma * noise, true)
    closed = c * (np.sqrt(2 * (sigma ** 2 + tau ** 2)) - sigma) / np.sqrt(2)
    assert scores[sigma] == pytest.approx(closed, rel=0.02), sigma
  assert scores[tau] < scores[2 * tau] < scores[0.0]
  assert scores[0.0] == pytest.approx(np.linalg.norm(true, axis=(1, 2)).mean(), rel=1e-12)


def test_energy_score_is_exact_under_a_large_offset():
  """Distances come from Gram matrices: against direct differences, on features with an offset
  1000 times their spread."""
  rng = np.random.default_rng(9)
  samples = 1000.0 + rng.normal(size=(5, 3, 4, 6))
  true = 1000.0 + rng.normal(size=(5, 4, 6))
  direct = np.mean([
      np.mean([np.linalg.norm(s - y) for s in row])
      - np.sum([np.linalg.norm(a - b) for a in row for b in row]) / (2 * 3 * 2)
      for row, y in zip(samples, true)])
  assert energy_score(samples, true) == pytest.approx(direct, rel=1e-8)
  with pytest.raises(ValueError, match="K >= 2"):
    energy_score(samples[:, :1], true)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_spread_skill_closed_form(sigma):
  """Samples N(m, sigma^2) of a truth N(m, tau^2): the ratio is
  sqrt((K + 1) / K * sigma^2 / (tau^2 + sigma^2 / K)), 1 exactly when sigma = tau."""
  rng = np.random.default_rng(10)
  rows, k, tau = 4000, 4, 1.0
  centre = rng.normal(size=(rows, 2, 8)) * 3
  true = centre + tau * rng.normal(size=centre.shape)
  samples = centre[:, None] + sigma * rng.normal(size=(rows, k, 2, 8))
  expected = np.sqrt((k + 1) / k * sigma ** 2 / (tau ** 2 + sigma ** 2 / k))
  assert spread_skill(samples, true) == pytest.approx(expected, rel=0.02)
  assert spread_skill(np.repeat(centre[:, None], k, 1), true) == 0.0


# ----------------------------------------------------------------------------- density, coverage

def test_density_and_coverage_by_hand():
  """1-D, k = 1. Radii: 0 -> 1, 1 -> 1, 3 -> 2, 7 -> 4. 0.5 lies in the balls of 0 and 1,
  5 in those of 3 (on its boundary: balls are closed) and 7, 20 in none."""
  true = np.array([[0.0], [1.0], [3.0], [7.0]])
  gen = np.array([[0.5], [5.0], [20.0]])
  assert density_coverage(gen, true, nearest_k=1) == pytest.approx((4 / 3, 1.0))
  assert density_coverage(gen[2:], true, nearest_k=1) == (0.0, 0.0)
  assert all(map(math.isnan, density_coverage(gen, true, nearest_k=4)))


@pytest.mark.parametrize("n_true,n_gen", [(400, 200), (300, 300)])
def test_density_and_coverage_of_one_distribution(n_true, n_gen):
  """Two samples of one Gaussian: E[density] = 1 (a generated vector lies in a true vector's
  ball with probability k / N), E[coverage] = 1 - prod_{j=1..k} (N - j) / (N + M - j) (no
  generated vector in a ball means its k nearest of the N - 1 + M others are all true), which
  tends to 1 - 2^-k only when M = N grows. Averaged over 20 draws."""
  k = metrics.NEAREST_K
  draws = [density_coverage(rng.normal(size=(n_gen, 8)), rng.normal(size=(n_true, 8)))
           for rng in map(np.random.default_rng, range(20))]
  density, coverage = np.mean(draws, 0)
  expected = 1 - np.prod([(n_true - j) / (n_true + n_gen - j) for j in range(1, k + 1)])
  assert density == pytest.approx(1.0, abs=0.04)
  assert coverage == pytest.approx(expected, abs=0.012)


def test_density_and_coverage_of_disjoint_distributions():
  rng = np.random.default_rng(11)
  true = rng.normal(size=(200, 8))
  far = rng.normal(size=(200, 8)) + 50.0
  assert density_coverage(far, true) == (0.0, 0.0)
  pooled = score(far[:, None], true[:, None])
  assert pooled["density"] == 0.0 and pooled["coverage"] == 0.0


# ----------------------------------------------------------------------------- together

def test_pointwise_figures_reward_the_mean_distribution_figures_the_sampler():
  """Target = centre(source) + independent spread as large as the centre's: the conditional
  mean wins every pointwise figure, a faithful sampler every distribution-level one."""
  rng = np.random.default_rng(12)
  rows, k = 400, 4
  centre = rng.normal(size=(rows, 2, 16))
  true = centre + rng.normal(size=centre.shape)
  samples = centre[:, None] + rng.normal(size=(rows, k, 2, 16))
  mean = score(np.repeat(centre[:, None], k, 1), true)
  sampler = score(samples, true)
  assert mean["mse"] < sampler["mse"] and mean["r2"] > sampler["r2"]
  assert mean["cosine_token"] > sampler["cosine_token"]
  assert mean["mse"] == pytest.approx(sampler["mse"] / 2, rel=0.1)
  assert mean["variance_ratio"] == pytest.approx(0.5, abs=0.05)
  assert sampler["variance_ratio"] == pytest.approx(1.0, abs=0.05)
  assert mean["variance_ratio_below_half"] > 0.3 and sampler["variance_ratio_below_half"] == 0
  for key in ("fd_pooled", "fd_tokens"):
    assert sampler[key] < 0.6 * mean[key], key
  assert sampler["energy_score"] < 0.8 * mean["energy_score"]   # 1 / sqrt(2) in expectation
  assert mean["spread_skill"] == 0 and sampler["spread_skill"] == pytest.approx(1.0, abs=0.05)
  assert mean["density"] > 2 * sampler["density"]           # crowded: collapse, not fidelity
  assert mean["coverage"] >= sampler["coverage"]            # coverage does not see it (docs)


def test_keys_and_shapes():
  rng = np.random.default_rng(13)
  true = rng.normal(size=(12, 3, 4))
  assert tuple(score(true, true)) == metrics.METRICS
  assert tuple(score(true[:, None], true)) == metrics.METRICS        # K = 1: no sample figures
  samples = rng.normal(size=(12, 2, 3, 4))
  assert tuple(score(samples, true)) == metrics.METRICS + metrics.SAMPLE_METRICS
  # With K samples every other figure scores the first sample.
  first = score(samples[:, 0], true)
  assert {k: score(samples, true)[k] for k in first} == first
  m = Metrics()
  m.add(samples[:6], true[:6])
  with pytest.raises(ValueError, match="same samples per row"):
    m.add(samples[6:, 0], true[6:])
  with pytest.raises(ValueError, match="does not fit"):
    Metrics().add(true[:, :2], true)


def test_accumulator_equals_the_one_shot_functions():
  rng = np.random.default_rng(14)
  true = rng.normal(size=(40, 3, 5)) + 1.0
  samples = true[:, None] + rng.normal(size=(40, 3, 3, 5))
  m = Metrics()
  for i in range(0, 40, 9):
    m.add(samples[i:i + 9], true[i:i + 9])
  got = m.result()
  first = samples[:, 0]
  assert got["r2"] == pytest.approx(r2(first, true), rel=1e-10)
  assert got["variance_ratio"] == pytest.approx(np.mean(variance_ratio(first, true)), rel=1e-10)
  assert got["energy_score"] == pytest.approx(energy_score(samples, true), rel=1e-10)
  assert got["spread_skill"] == pytest.approx(spread_skill(samples, true), rel=1e-10)
  dc = density_coverage(first.mean(1), true.mean(1))
  assert (got["density"], got["coverage"]) == pytest.approx(dc, rel=1e-12)


def _state_bytes(m):
  """Bytes of every array the accumulator keeps, however nested."""
  def size(x):
    if isinstance(x, np.ndarray):
      return x.nbytes
    if isinstance(x, (list, tuple)):
      return sum(map(size, x))
    if isinstance(x, dict):
      return sum(map(size, x.values()))
    if hasattr(x, "__dict__"):
      return sum(map(size, vars(x).values()))
    return 0
  return size(m)


def test_figures_do_not_depend_on_batching_and_rows_are_not_kept():
  """K samples, directions and a projected token dimension: one batch and uneven batches give
  the same figures; the state grows only by the pooled vectors (2 x dim floats per row)."""
  rng = np.random.default_rng(15)
  rows, k, tokens, dim = 90, 3, 3, 80
  true = rng.normal(size=(rows, tokens, dim)) * rng.uniform(0.5, 2, size=dim) + 3.0
  samples = 0.7 * true[:, None] + 0.6 * rng.normal(size=(rows, k, tokens, dim))
  directions = rng.normal(size=(2, tokens, dim))
  whole = score(samples, true, directions=directions)
  m = Metrics(directions=directions)
  sizes = []
  for i, j in ((0, 7), (7, 8), (8, 45), (45, 90)):
    m.add(samples[i:j], true[i:j])
    sizes.append(_state_bytes(m))
  split = m.result()
  assert set(split) == set(whole) and "variance_ratio_along" in whole
  for key, value in whole.items():
    assert split[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key
  assert sizes[-1] - sizes[0] == 2 * (90 - 7) * dim * 8
