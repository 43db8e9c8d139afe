"""The flow conventions: t=0 noise, t=1 data, samplers integrate forwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowmap import flow


@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.93])
def test_one_euler_step_with_exact_velocity_recovers_data(t):
  k1, k2 = jax.random.split(jax.random.key(0))
  x1 = jax.random.normal(k1, (4, 3, 5))
  noise = jax.random.normal(k2, (4, 3, 5))
  tt = jnp.full((4,), t)
  xt = flow.interpolate(noise, x1, tt)
  v = flow.target_velocity(noise, x1)
  np.testing.assert_allclose(xt + (1.0 - t) * v, x1, atol=1e-5)


def test_interpolation_endpoints_are_noise_and_data():
  noise, x1 = jnp.zeros((2, 3)), jnp.ones((2, 3))
  np.testing.assert_allclose(flow.interpolate(noise, x1, jnp.zeros(2)), noise)
  np.testing.assert_allclose(flow.interpolate(noise, x1, jnp.ones(2)), x1)


def test_samplers_integrate_forwards_from_noise_to_data():
  """With the exact straight-line velocity towards x1, any solver lands on x1; a sampler
  running time backwards (the bug of the earlier attempts) would not."""
  x1 = jax.random.normal(jax.random.key(1), (3, 4))
  noise = jax.random.normal(jax.random.key(2), (3, 4))

  def velocity(x, t):   # the velocity field of the straight path from noise to x1
    return jnp.broadcast_to(x1 - noise, x.shape)

  for solver in flow.SOLVERS:
    for steps in (1, 3, 8):
      out = flow.sample(velocity, noise, steps, solver)
      np.testing.assert_allclose(out, x1, atol=1e-4)


def test_euler_and_heun_agree_with_closed_form_on_time_linear_field():
  """v(t) = a + b t: the solution is x0 + a + b/2. Heun (trapezoid) is exact at any step
  count; Euler is exact only in the limit, with error b / (2 n)."""
  a, b = 0.7, -1.3
  x0 = jnp.zeros((2, 1))
  velocity = lambda x, t: jnp.broadcast_to(a + b * t[:, None], x.shape)
  exact = a + b / 2
  for steps in (1, 2, 5):
    np.testing.assert_allclose(flow.sample(velocity, x0, steps, "heun"), exact, atol=1e-6)
    euler = flow.sample(velocity, x0, steps, "euler")
    np.testing.assert_allclose(euler, exact - b / (2 * steps), atol=1e-6)
  # A constant field: both solvers exact with one step.
  const = lambda x, t: jnp.full_like(x, a)
  for solver in flow.SOLVERS:
    np.testing.assert_allclose(flow.sample(const, x0, 1, solver), a, atol=1e-6)


def test_heun_is_second_order_and_beats_euler_on_curved_field():
  """dx/dt = -2 x t: x(1) = x0 exp(-1). Heun's error shrinks ~4x per doubling of steps
  (a Heun that silently degrades to Euler shrinks ~2x and fails this)."""
  x0 = jnp.ones((1, 1)) * 1.5
  velocity = lambda x, t: -2.0 * x * t[:, None]
  exact = 1.5 * np.exp(-1.0)
  err = {s: {n: abs(float(flow.sample(velocity, x0, n, s)[0, 0]) - exact) for n in (4, 8, 16)}
         for s in flow.SOLVERS}
  for n in (4, 8, 16):
    assert err["heun"][n] < err["euler"][n] / 5
  assert err["heun"][8] / err["heun"][16] > 3.5
  assert err["euler"][8] / err["euler"][16] < 2.5


def test_heun_counts_two_evaluations_a_step():
  calls = []

  def velocity(x, t):
    calls.append(1)
    return jnp.zeros_like(x)
  jax.make_jaxpr(lambda x: flow.sample(velocity, x, 4, "heun"))(jnp.zeros((1, 2)))
  assert len(calls) == 2   # traced once per body: two evaluations inside the loop body
  assert flow.steps_for_evaluations("heun", 8) == 4
  assert flow.steps_for_evaluations("euler", 8) == 8
  with pytest.raises(ValueError):
    flow.steps_for_evaluations("heun", 3)


@pytest.mark.parametrize("kind", flow.TIME_SAMPLINGS)
def test_time_sampling_in_unit_interval(kind):
  t = flow.sample_time(jax.random.key(0), 4096, kind, shift=3.0)
  assert t.shape == (4096,)
  assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
  if kind == "shifted":   # shift > 1 spends more time near the noise end
    assert float(jnp.mean(t)) < 0.4


def test_logit_normal_median_follows_mean():
  t = flow.sample_time(jax.random.key(0), 20000, "logit_normal", mean=1.0, std=1.0)
  assert abs(float(jnp.median(t)) - float(jax.nn.sigmoid(1.0))) < 0.02


def test_loss_is_mse_with_scale():
  p, t = jnp.ones((2, 3, 4)), jnp.zeros((2, 3, 4))
  assert float(flow.loss(p, t)) == pytest.approx(1.0)
  assert float(flow.loss(p, t, scale=2.5)) == pytest.approx(2.5)


def test_condition_dropout_rate():
  drop = flow.condition_dropout(jax.random.key(0), 10000, 0.2)
  assert abs(float(drop.mean()) - 0.2) < 0.02
  assert not bool(flow.condition_dropout(jax.random.key(0), 10, 0.0).any())


def test_guidance_combines_conditional_and_unconditional():
  def velocity(x, t, drop):
    return jnp.where(drop[:, None], 1.0, 3.0) * jnp.ones_like(x)
  x, t = jnp.zeros((2, 4)), jnp.zeros(2)
  np.testing.assert_allclose(flow.guided(velocity, 1.0)(x, t), 3.0)
  np.testing.assert_allclose(flow.guided(velocity, 2.0)(x, t), 1.0 + 2.0 * (3.0 - 1.0))


def test_regression_pair_asks_for_the_target_from_zero_at_time_zero():
  noise, x1 = jnp.ones((2, 3, 4)), jnp.full((2, 3, 4), 5.0)
  x, t, target = flow.training_pair("regression", noise, x1, jnp.array([0.3, 0.7]))
  assert float(jnp.abs(x).max()) == 0 and float(jnp.abs(t).max()) == 0
  np.testing.assert_array_equal(target, x1)
  x, t, target = flow.training_pair("flow", noise, x1, jnp.array([0.25, 1.0]))
  np.testing.assert_allclose(x[0], 0.75 * 1 + 0.25 * 5)
  np.testing.assert_array_equal(target, x1 - noise)


# --------------------------------------------------------------------------- MeanFlow

def _straight_coupling(n=256, d=6, seed=0):
  """x1 = a * noise + b: a coupling whose straight paths x_t = c_t noise + t b (c_t = 1 - t +
  t a > 0) never cross, so the conditional velocity x1 - noise is the marginal one and the
  exact average velocity is (x_s - x_t) / (s - t) with x_s = c_s / c_t (x_t - t b) + s b."""
  k = jax.random.split(jax.random.key(seed), 2)
  noise = jax.random.normal(k[0], (n, 1, d))
  a = jnp.linspace(0.3, 1.8, d)[None, None]
  b = jnp.linspace(-1.0, 2.0, d)[None, None]

  def exact(x, t, s):
    t, s = t[:, None, None], s[:, None, None]
    c = lambda u: 1 - u + u * a
    h = s - t
    short = jnp.abs(h) < 1e-4
    x_s = c(s) / c(t) * (x - t * b) + s * b
    instantaneous = (a - 1) * (x - t * b) / c(t) + b
    return jnp.where(short, instantaneous, (x_s - x) / jnp.where(short, 1.0, h))
  return noise, a * noise + b, exact


def test_meanflow_target_equals_the_exact_average_velocity_and_one_step_samples_exactly():
  """With the exact average velocity, the MeanFlow identity's target (one jax.jvp) is that
  velocity itself, for real intervals and for s = t (where it is flow matching's v); and an
  average-velocity Euler step over [0, 1] lands on the data in one evaluation."""
  noise, x1, exact = _straight_coupling()
  k = jax.random.split(jax.random.key(3), 2)
  t = jax.random.uniform(k[0], (noise.shape[0],)) * 0.9
  start, end = flow.sample_interval(k[1], t, 0.5, "uniform")
  assert np.all(np.asarray(end) >= np.asarray(start))
  real = np.asarray(end > start)
  assert 0.3 < real.mean() < 0.7
  pred, target = flow.meanflow_target(exact, noise, x1, start, end)
  np.testing.assert_allclose(np.asarray(pred), np.asarray(target), atol=2e-4)
  np.testing.assert_allclose(np.asarray(target)[~real], np.asarray(x1 - noise)[~real],
                             atol=2e-4)
  one_step = flow.sample(exact, noise, 1, "euler", average=True)
  np.testing.assert_allclose(np.asarray(one_step), np.asarray(x1), atol=1e-4)
  with pytest.raises(ValueError, match="Euler"):
    flow.sample(exact, noise, 2, "heun", average=True)


def test_gaussian_average_velocity_integrates_the_instantaneous_one():
  """model.gaussian_velocity with s is the average of the instantaneous Gaussian velocity
  along its own ODE: x_t + (s - t) u(x_t, t, s) equals a fine Heun solve from t to s, and one
  average step from noise to t = 1 is the Gaussian's quantile map, mean + std * noise."""
  from flowmap import model as M
  k = jax.random.split(jax.random.key(0), 2)
  x0 = jax.random.normal(k[0], (4096, 1, 5))
  mean = jnp.linspace(-1.0, 1.0, 5)[None, None]
  std = jnp.linspace(0.3, 1.5, 5)[None, None]
  n = x0.shape[0]
  t, s = jnp.full((n,), 0.1), jnp.full((n,), 0.8)
  x_t = flow.sample(lambda x, u: M.gaussian_velocity(x, u * 0.1, mean, std) * 0.1, x0, 64,
                    "heun")
  fine = flow.sample(lambda x, u: M.gaussian_velocity(x, 0.1 + 0.7 * u, mean, std) * 0.7, x_t,
                     256, "heun")
  jump = x_t + 0.7 * M.gaussian_velocity(x_t, t, mean, std, s)
  np.testing.assert_allclose(np.asarray(jump), np.asarray(fine), atol=1e-4)
  one = x0 + M.gaussian_velocity(x0, jnp.zeros(n), mean, std, jnp.ones(n))
  np.testing.assert_allclose(np.asarray(one), np.asarray(mean + std * x0), atol=1e-5)


def test_meanflow_target_of_a_wrong_model_differs_and_its_gradient_is_stopped():
  """The target is not the prediction for a model that is off, and no gradient flows
  through it (only through the prediction)."""
  noise, x1, exact = _straight_coupling(n=32)
  start = jnp.full((32,), 0.2)
  end = jnp.full((32,), 0.7)

  def loss(scale):
    u = lambda x, t, s: scale * exact(x, t, s)
    pred, target = flow.meanflow_target(u, noise, x1, start, end)
    return jnp.mean((pred - target) ** 2), (pred, target)
  (value, (pred, target)), grad = jax.value_and_grad(loss, has_aux=True)(1.3)
  assert float(value) > 1e-3
  # d/dscale of mean((scale * u0 - sg(target))^2) = mean(2 (pred - target) u0), u0 = pred/scale
  expected = jnp.mean(2 * (pred - target) * pred / 1.3)
  np.testing.assert_allclose(float(grad), float(expected), rtol=1e-4)


def test_adaptive_weights_have_no_gradient_and_power_zero_is_plain():
  err = jnp.array([0.0, 0.5, 2.0])
  np.testing.assert_allclose(flow.adaptive_weights(err, 0.0), 1.0)
  np.testing.assert_allclose(flow.adaptive_weights(err, 1.0), 1.0 / (err + 1e-3), rtol=1e-6)
  g = jax.grad(lambda e: jnp.sum(flow.adaptive_weights(e, 1.0)))(err)
  np.testing.assert_array_equal(np.asarray(g), 0.0)
