"""A model -> jitted samplers and velocity functions, with noise drawn per row.

Everything that turns a Next-DiT into something that generates: the velocity function the
train step and the samplers share, the ODE samplers of ``flow`` wrapped around it (with
classifier-free guidance), and per-row noise. The noise of row i is a function of (seed, i)
only, drawn on the device inside the jitted call, so a row maps to the same output whatever
the batch it travels in, the number of rows in the call or the number of devices (threefry is
partitionable: the values do not depend on the sharding either).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flowmap import flow
from flowmap import model as model_lib


def noise_for_rows(seed, rows: jax.Array, shape) -> jax.Array:
  """Standard normal noise [len(rows), *shape]; each row depends only on (seed, its index).

  Works inside jit with a traced seed and sharded indices."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), tuple(shape)))(rows)


def abstract_model(model_cfg: model_lib.ModelConfig, seed: int = 0):
  """(graphdef, parameter shapes) of the model, allocating nothing."""
  return nnx.split(nnx.eval_shape(lambda: model_lib.NextDiT(model_cfg,
                                                             rngs=nnx.Rngs(params=seed))))


def make_velocity(graphdef) -> Callable:
  """(params, x, t, source, drop) -> predicted velocity, float32."""
  def velocity(params, x, t, source, drop=None):
    return nnx.merge(graphdef, params)(x, t, source, drop)
  return velocity


def _generator(graphdef, solver: str, evaluations: int, guidance: float) -> Callable:
  """(params, source, noise) -> generated target in the normalised space (not jitted)."""
  steps = flow.steps_for_evaluations(solver, evaluations)
  velocity = make_velocity(graphdef)

  def generate(params, source, noise):
    def v(x, t, drop):
      src = jnp.concatenate([source, source]) if x.shape[0] != source.shape[0] else source
      return velocity(params, x, t, src, drop)
    return flow.sample(flow.guided(v, guidance), noise, steps, solver)
  return generate


def make_sampler(graphdef, solver: str, evaluations: int, guidance: float = 1.0) -> Callable:
  """A jitted (params, source, noise) -> generated target (normalised space)."""
  return jax.jit(_generator(graphdef, solver, evaluations, guidance))


def make_row_sampler(graphdef, target_shape, solver: str, evaluations: int,
                     guidance: float = 1.0) -> Callable:
  """A jitted (params, source, rows, seed) -> generated target (normalised space) whose
  noise for row ``rows[i]`` is drawn on the device from (seed, rows[i])."""
  generate = _generator(graphdef, solver, evaluations, guidance)

  @jax.jit
  def sample_rows(params, source, rows, seed):
    return generate(params, source, noise_for_rows(seed, rows, target_shape))
  return sample_rows


def make_velocity_cosines(graphdef) -> Callable:
  """A jitted (params, source, x1, rows, seed) -> cosine per row between the predicted and
  the true velocity at a random t (normalised space); t and noise of row i come from
  (seed, i)."""
  velocity = make_velocity(graphdef)

  @jax.jit
  def cosines(params, source, x1, rows, seed):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(rows)
    t = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), ()))(keys)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x1.shape[1:]))(keys)
    pred = velocity(params, flow.interpolate(noise, x1, t), t, source)
    true = flow.target_velocity(noise, x1)
    pred, true = pred.reshape(len(pred), -1), true.reshape(len(true), -1)
    num = jnp.sum(pred * true, -1)
    den = jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(true, axis=-1)
    return num / jnp.maximum(den, 1e-12)
  return cosines
