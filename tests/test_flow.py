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
