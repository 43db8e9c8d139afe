"""Rectified flow: the handful of pure functions that fix flowmap's conventions.

t = 0 is pure noise and t = 1 is data: ``x_t = (1 - t) * noise + t * x1`` and the target
velocity is ``x1 - noise``. Samplers integrate from t = 0 to t = 1, the same direction as
training (the earlier PyTorch attempts ran it backwards and got near-zero cosine).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from flowmap.config import OBJECTIVES, SOLVERS, TIME_SAMPLINGS


def sample_time(key, n: int, kind: str = "logit_normal", mean: float = 0.0,
                std: float = 1.0, shift: float = 1.0, mean_fraction: float = 0.0) -> jax.Array:
  """Training times in [0, 1).

  logit_normal (SD3): t = sigmoid(mean + std * N(0, 1)), concentrating training where the
  velocity is hardest to predict. shifted: uniform t pushed towards the noise end by
  ``shift`` (shift > 1 spends more training near t = 0). ``mean_fraction``: the share of
  examples trained at exactly t = 0, where x_t is the noise alone and the ideal velocity is
  E[x1 | source] - x: the one-step estimate of the conditional mean (the mean mode), which
  logit-normal times almost never reach.
  """
  if kind == "uniform":
    t = jax.random.uniform(key, (n,))
  elif kind == "logit_normal":
    t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,)))
  elif kind == "shifted":
    t = shift_time(jax.random.uniform(key, (n,)), shift)
  else:
    raise ValueError(f"unknown time sampling {kind!r}; expected one of {TIME_SAMPLINGS}")
  if mean_fraction > 0:
    t = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 1), mean_fraction, (n,)), 0.0,
                  t)
  return t


def sample_interval(key, t: jax.Array, fraction: float, kind: str = "logit_normal",
                    mean: float = 0.0, std: float = 1.0, shift: float = 1.0):
  """MeanFlow's training intervals: (start, end) per example with start <= end, both from the
  time distribution; a ``fraction`` of the examples get a real interval (the two times
  sorted), the rest start = end = t, where the average velocity is the instantaneous one and
  the objective is plain flow matching."""
  other = sample_time(key, t.shape[0], kind, mean, std, shift)
  real = jax.random.bernoulli(jax.random.fold_in(key, 2), fraction, t.shape)
  start = jnp.where(real, jnp.minimum(t, other), t)
  end = jnp.where(real, jnp.maximum(t, other), t)
  return start, end


def meanflow_target(average_velocity: Callable, noise: jax.Array, x1: jax.Array,
                    start: jax.Array, end: jax.Array):
  """(prediction, regression target) of the MeanFlow identity (Geng et al. 2025) in flowmap's
  convention (t = 0 noise, t = 1 data): the average velocity u(x_t, t, s) = (x_s - x_t) /
  (s - t) satisfies (s - t) u = the integral of v from t to s, whose derivative in t gives
  u = v + (s - t) d/dt u along the path; on the straight path the velocity is v = x1 -
  noise, so the target is v + (s - t) (du/dx v + du/dt), with the total derivative from one
  ``jax.jvp`` and no gradient through the target.
  ``average_velocity(x, t, s)`` is the model; start = end gives flow matching's target v."""
  v = target_velocity(noise, x1)
  x = interpolate(noise, x1, start)
  u, du_dt = jax.jvp(lambda x, t: average_velocity(x, t, end), (x, start),
                     (v, jnp.ones_like(start)))
  target = v + _bcast(end - start, v) * du_dt
  return u, jax.lax.stop_gradient(target)


def adaptive_weights(per_example: jax.Array, power: float, eps: float = 1e-3) -> jax.Array:
  """MeanFlow's adaptive loss weight 1 / (error + eps)^power per example, no gradient:
  power 1 makes the loss close to a per-example relative (roughly L1-like) error, which the
  paper found the most stable; power 0 is the plain squared error."""
  return jax.lax.stop_gradient(1.0 / jnp.power(per_example + eps, power))


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  """Maps t so that the noise level s = 1 - t becomes shift * s / (1 + (shift - 1) * s)."""
  s = 1.0 - t
  return 1.0 - shift * s / (1.0 + (shift - 1.0) * s)


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(noise: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
  """The point on the straight path from noise (t = 0) to data (t = 1)."""
  t = _bcast(t, x1)
  return (1.0 - t) * noise + t * x1


def target_velocity(noise: jax.Array, x1: jax.Array) -> jax.Array:
  return x1 - noise


def training_pair(objective: str, noise: jax.Array, x1: jax.Array, t: jax.Array):
  """(model input, model time, regression target) of a batch for an objective.

  flow: the point x_t on the straight path at t and the velocity x1 - noise. regression:
  the same network asked for x1 itself from x = 0 at t = 0, so that its prediction is a
  one-step Euler move from zero, and every sampler reads it the same way (the equal-capacity
  answer to "do I need a flow at all": a regressor of the mean, with no spread)."""
  if objective in ("flow", "meanflow"):   # meanflow: its instantaneous (s = t) part
    return interpolate(noise, x1, t), t, target_velocity(noise, x1)
  if objective == "regression":
    return jnp.zeros_like(x1), jnp.zeros_like(t), x1
  raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def per_example_loss(predicted: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error of each example [batch], in float32 whatever the compute dtype."""
  diff = predicted.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def loss(predicted: jax.Array, target: jax.Array, scale: float = 1.0) -> jax.Array:
  """The training objective: mean squared error over every element (examples have equal
  size, so the mean of the per-example means), times ``scale``."""
  return scale * jnp.mean(per_example_loss(predicted, target))


def condition_dropout(key, batch: int, rate: float) -> jax.Array:
  """Per-example booleans: True drops the source so the model also learns the unconditional
  velocity that classifier-free guidance needs."""
  if rate <= 0.0:
    return jnp.zeros((batch,), bool)
  return jax.random.bernoulli(key, rate, (batch,))


def guided(velocity: Callable, guidance: float) -> Callable:
  """Classifier-free guidance: v_uncond + g * (v_cond - v_uncond); g = 1 is one evaluation.

  ``velocity(x, t, drop)`` takes a boolean per row that drops the source condition.
  """
  def fn(x, t):
    keep = jnp.zeros((x.shape[0],), bool)
    if guidance == 1.0:
      return velocity(x, t, keep)
    both = velocity(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    jnp.concatenate([keep, ~keep]))
    cond, uncond = jnp.split(both, 2)
    return uncond + guidance * (cond - uncond)
  return fn


def steps_for_evaluations(solver: str, evaluations: int) -> int:
  """Heun spends two model evaluations a step, Euler one; compare solvers by evaluations."""
  if solver == "euler":
    return evaluations
  if solver == "heun":
    if evaluations % 2:
      raise ValueError(f"heun needs an even number of evaluations, got {evaluations}")
    return evaluations // 2
  raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")


def sample(velocity: Callable, noise: jax.Array, steps, solver: str = "euler",
           average: bool = False) -> jax.Array:
  """Integrates dx/dt = velocity(x, t) from t = 0 (noise) to t = 1 in one lax loop of
  ``steps`` (an int, or a traced integer: one compiled program for every step count).

  ``velocity(x, t)`` gets t as a vector of per-row times. Heun's second evaluation is at the
  end of every step, the last one included, so n steps cost exactly 2n evaluations.
  ``average``: ``velocity(x, t, s)`` is an average velocity over [t, s] (MeanFlow) and each
  Euler step goes x + (s - t) u(x, t, s): exact for a perfect model, one evaluation a step.
  """
  if solver not in SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
  if average and solver != "euler":
    raise ValueError("average-velocity sampling (meanflow) takes Euler steps only")
  if isinstance(steps, int) and steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  rows = noise.shape[0]
  n = jnp.asarray(steps, jnp.float32)

  def step(i, x):   # steps + 1 evenly spaced times from 0 to 1
    t0, t1 = i / n, (i + 1) / n
    h = (t1 - t0).astype(x.dtype)
    if average:
      return x + h * velocity(x, jnp.full((rows,), t0), jnp.full((rows,), t1))
    v0 = velocity(x, jnp.full((rows,), t0))
    if solver == "euler":
      return x + h * v0
    v1 = velocity(x + h * v0, jnp.full((rows,), t1))
    return x + 0.5 * h * (v0 + v1)

  return jax.lax.fori_loop(0, steps, step, noise)
