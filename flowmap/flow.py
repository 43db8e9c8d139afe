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
  if objective == "flow":
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


def sample(velocity: Callable, noise: jax.Array, steps, solver: str = "euler") -> jax.Array:
  """Integrates dx/dt = velocity(x, t) from t = 0 (noise) to t = 1 in one lax loop of
  ``steps`` (an int, or a traced integer: one compiled program for every step count).

  ``velocity(x, t)`` gets t as a vector of per-row times. Heun's second evaluation is at the
  end of every step, the last one included, so n steps cost exactly 2n evaluations.
  """
  if solver not in SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
  if isinstance(steps, int) and steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  rows = noise.shape[0]
  n = jnp.asarray(steps, jnp.float32)

  def step(i, x):   # steps + 1 evenly spaced times from 0 to 1
    t0, t1 = i / n, (i + 1) / n
    h = (t1 - t0).astype(x.dtype)
    v0 = velocity(x, jnp.full((rows,), t0))
    if solver == "euler":
      return x + h * v0
    v1 = velocity(x + h * v0, jnp.full((rows,), t1))
    return x + 0.5 * h * (v0 + v1)

  return jax.lax.fori_loop(0, steps, step, noise)
