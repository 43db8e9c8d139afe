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
from flowmap.config import MODES


def noise_for_rows(seed, rows: jax.Array, shape, draw: int = 0) -> jax.Array:
  """Standard normal noise [len(rows), *shape]; each row depends only on (seed, its index)
  and, for the further samples of a row, on ``draw`` (draw 0 is a row's first sample).

  Works inside jit with a traced seed and sharded indices."""
  base = jax.random.key(seed)

  def one(i):
    key = jax.random.fold_in(base, i)
    return jax.random.normal(key if draw == 0 else jax.random.fold_in(key, draw), tuple(shape))
  return jax.vmap(one)(rows)


def abstract_model(model_cfg: model_lib.ModelConfig, seed: int = 0):
  """(graphdef, parameter shapes) of the model, allocating nothing."""
  return nnx.split(nnx.eval_shape(lambda: model_lib.NextDiT(model_cfg,
                                                             rngs=nnx.Rngs(params=seed))))


def model_inputs(condition):
  """(source, prior, prior_std) from a condition: {"source", "prior", "prior_std"}
  (RunSpec.condition) or a bare source array."""
  if isinstance(condition, dict):
    return condition["source"], condition.get("prior"), condition.get("prior_std")
  return condition, None, None


def make_velocity(graphdef) -> Callable:
  """(params, x, t, condition, drop) -> predicted velocity, float32. ``condition`` is
  ``RunSpec.condition(raw source)`` or, for a model without the linear prior, the
  normalised source itself."""
  def velocity(params, x, t, condition, drop=None):
    source, prior, prior_std = model_inputs(condition)
    return nnx.merge(graphdef, params)(x, t, source, drop, prior, prior_std)
  return velocity


def _generator(graphdef, solver: str, guidance: float, average: bool = False) -> Callable:
  """(params, condition, noise, steps) -> generated target in the normalised space (not
  jitted). The time-independent source side (projections, every block's source keys and
  values) is computed once per call, not at every evaluation; ``steps`` may be traced.
  ``average``: a MeanFlow model's average-velocity Euler steps (no guidance)."""
  def generate(params, condition, noise, steps):
    model = nnx.merge(graphdef, params)
    source, prior, prior_std = model_inputs(condition)
    rows = noise.shape[0]
    if guidance == 1.0:
      context = model.source_context(source, None, prior, prior_std)
    else:   # the conditional and the unconditional rows side by side, as flow.guided asks
      twice = lambda a: None if a is None else jnp.concatenate([a, a])
      keep = jnp.zeros((rows,), bool)
      context = model.source_context(twice(source), jnp.concatenate([keep, ~keep]),
                                     twice(prior), twice(prior_std))

    if average:
      if guidance != 1.0:
        raise ValueError("a meanflow model samples without guidance")
      return flow.sample(lambda x, t, s: model.velocity(x, t, context, s), noise, steps,
                         solver, average=True)

    def velocity(x, t, drop):
      del drop   # the context already holds the rows' drop pattern
      return model.velocity(x, t, context)
    return flow.sample(flow.guided(velocity, guidance), noise, steps, solver)
  return generate


def make_sampler(graphdef, solver: str, evaluations: int, guidance: float = 1.0) -> Callable:
  """A jitted (params, condition, noise) -> generated target (normalised space)."""
  generate = _generator(graphdef, solver, guidance)
  steps = flow.steps_for_evaluations(solver, evaluations)
  return jax.jit(lambda params, condition, noise: generate(params, condition, noise, steps))


def make_row_sampler(graphdef, target_shape, solver: str, guidance: float = 1.0,
                     mode: str = "sample", draw: int = 0, mean_draws: int = 4,
                     objective: str = "flow") -> Callable:
  """A jitted (params, condition, rows, seed, steps) -> generated target (normalised space).

  mode ``sample``: the ODE solution in ``steps`` solver steps (a traced argument: one
  program serves every step count) from noise drawn on the device from (seed, rows[i]) (and
  ``draw``, for a row's further samples). mode ``mean``: an estimate of E[target | source],
  the average over ``mean_draws`` noise draws of one Euler step of length 1 from the noise
  (x0 + v(x0, 0), where the ideal velocity is E[x1 | source] - x0 whatever x0 is);
  ``mean_draws`` evaluations, ``steps`` does not apply. A run trained with the regression
  objective has one output in both modes, its prediction (one evaluation); one trained with
  meanflow samples with ``steps`` average-velocity Euler steps (``steps`` evaluations)."""
  if mode not in MODES:
    raise ValueError(f"unknown output mode {mode!r}; expected one of {MODES}")
  if objective == "regression":
    predict = _generator(graphdef, "euler", guidance)

    @jax.jit
    def predict_rows(params, condition, rows, seed, steps):
      del seed, steps
      zeros = jnp.zeros((rows.shape[0], *target_shape), jnp.float32)
      return predict(params, condition, zeros, 1)
    return predict_rows
  if mode == "mean":
    one_step = _generator(graphdef, "euler", guidance)

    @jax.jit
    def mean_rows(params, condition, rows, seed, steps):
      del steps
      total = 0.0
      for k in range(mean_draws):
        total = total + one_step(params, condition,
                                 noise_for_rows(seed, rows, target_shape, k), 1)
      return total / mean_draws
    return mean_rows
  generate = _generator(graphdef, solver, guidance, average=objective == "meanflow")

  @jax.jit
  def sample_rows(params, condition, rows, seed, steps):
    return generate(params, condition, noise_for_rows(seed, rows, target_shape, draw), steps)
  return sample_rows


def make_velocity_cosines(graphdef, objective: str = "flow") -> Callable:
  """A jitted (params, condition, x1, rows, seed) -> cosine per row between the model's output
  and its training target (the velocity at a random t, for the flow objective), in the
  model's normalised space; t and noise of row i come from (seed, i)."""
  velocity = make_velocity(graphdef)

  @jax.jit
  def cosines(params, condition, x1, rows, seed):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(rows)
    t = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), ()))(keys)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x1.shape[1:]))(keys)
    x, time, true = flow.training_pair(objective, noise, x1, t)
    pred = velocity(params, x, time, condition)
    pred, true = pred.reshape(len(pred), -1), true.reshape(len(true), -1)
    num = jnp.sum(pred * true, -1)
    den = jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(true, axis=-1)
    return num / jnp.maximum(den, 1e-12)
  return cosines
