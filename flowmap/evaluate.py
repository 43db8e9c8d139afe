"""Sampling for evaluation and the metrics of DESIGN.md, always in the raw target space.

The noise of evaluated row i is a function of (seed, i) only, and metrics are sums over rows
in float64, so a figure does not depend on the batch size or on the number of devices.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowmap import flow


def row_noise(seed: int, start: int, rows: int, shape) -> jax.Array:
  """Standard normal noise [rows, *shape]; row i depends only on (seed, start + i)."""
  base = jax.random.key(seed)
  idx = jnp.arange(rows) + start
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), tuple(shape)))(idx)


def make_velocity(graphdef) -> Callable:
  """(params, x, t, source, drop) -> predicted velocity, float32."""
  def velocity(params, x, t, source, drop=None):
    return nnx.merge(graphdef, params)(x, t, source, drop)
  return velocity


def make_sampler(graphdef, solver: str, evaluations: int, guidance: float = 1.0,
                 shift: float = 1.0) -> Callable:
  """A jitted (params, source, noise) -> generated target (normalised space)."""
  steps = flow.steps_for_evaluations(solver, evaluations)
  velocity = make_velocity(graphdef)

  @jax.jit
  def generate(params, source, noise):
    def v(x, t, drop):
      src = jnp.concatenate([source, source]) if x.shape[0] != source.shape[0] else source
      return velocity(params, x, t, src, drop)
    return flow.sample(flow.guided(v, guidance), noise, steps, solver, shift)
  return generate


def cosine(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  num = (a * b).sum(axis)
  den = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
  return num / np.maximum(den, 1e-12)


class Metrics:
  """Accumulates generated vs true raw targets batch by batch; ``result()`` gives the figures."""

  def __init__(self):
    self.rows = 0
    self.token_cos_sum = 0.0
    self.tokens = 0
    self.sq_err_sum = 0.0
    self.elements = 0
    self.pooled_generated, self.pooled_true = [], []

  def add(self, generated: np.ndarray, true: np.ndarray) -> None:
    generated = np.asarray(generated, np.float64)
    true = np.asarray(true, np.float64)
    cos = cosine(generated, true)
    self.token_cos_sum += float(cos.sum())
    self.tokens += cos.size
    self.sq_err_sum += float(((generated - true) ** 2).sum())
    self.elements += generated.size
    self.rows += generated.shape[0]
    self.pooled_generated.append(generated.mean(1))
    self.pooled_true.append(true.mean(1))

  def result(self) -> dict:
    g = np.concatenate(self.pooled_generated)
    t = np.concatenate(self.pooled_true)
    gn = g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12)
    tn = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    retrieved = np.argmax(gn @ tn.T, axis=1)
    return {
        "cosine_token": self.token_cos_sum / self.tokens,
        "cosine_global": float(cosine(g, t).mean()),
        "mse": self.sq_err_sum / self.elements,
        "recall_at_1": float(np.mean(retrieved == np.arange(len(g)))),
    }


def velocity_cosine(velocity_fn, params, source, x1, key) -> jax.Array:
  """Mean cosine between predicted and true velocity at random t (one vector per row)."""
  k_t, k_n = jax.random.split(key)
  t = jax.random.uniform(k_t, (x1.shape[0],))
  noise = jax.random.normal(k_n, x1.shape)
  pred = velocity_fn(params, flow.interpolate(noise, x1, t), t, source)
  true = flow.target_velocity(noise, x1)
  pred, true = pred.reshape(len(pred), -1), true.reshape(len(true), -1)
  num = jnp.sum(pred * true, -1)
  den = jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(true, axis=-1)
  return jnp.mean(num / jnp.maximum(den, 1e-12))


class Evaluator:
  """Samples the fixed held-out rows with the ODE sampler and scores them in raw space.

  ``source`` is normalised, ``target_raw`` raw; both numpy, identical on every process. Each
  batch is padded to a multiple of the device count, split between processes, sampled on the
  mesh, and gathered back, so every process computes the same figures.
  """

  def __init__(self, graphdef, mesh, source: np.ndarray, target_raw: np.ndarray,
               target_normalizer, batch_size: int, seed: int):
    self.graphdef, self.mesh = graphdef, mesh
    self.source, self.target_raw = source, target_raw
    self.normalizer = target_normalizer
    n_dev = mesh.devices.size
    self.batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
    self.seed = seed
    self._samplers = {}
    self._velocity_cos = jax.jit(functools.partial(velocity_cosine,
                                                   make_velocity(graphdef)))

  def sampler(self, solver: str, evaluations: int, guidance: float):
    key = (solver, evaluations, guidance)
    if key not in self._samplers:
      self._samplers[key] = make_sampler(self.graphdef, solver, evaluations, guidance)
    return self._samplers[key]

  def _batches(self):
    from flowmap import sharding
    n = len(self.source)
    for start in range(0, n, self.batch_size):
      src = self.source[start:start + self.batch_size]
      rows = len(src)
      pad = self.batch_size - rows
      if pad:
        src = np.concatenate([src, np.repeat(src[-1:], pad, 0)])
      yield start, rows, src

  def _shard(self, x: np.ndarray):
    from flowmap import sharding
    pc, pi = jax.process_count(), jax.process_index()
    per = len(x) // pc
    return sharding.global_batch({"x": x[pi * per:(pi + 1) * per]}, self.mesh)["x"]

  def _gather(self, x) -> np.ndarray:
    from jax.experimental import multihost_utils
    if jax.process_count() == 1:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def generate(self, params, solver: str, evaluations: int, guidance: float = 1.0) -> np.ndarray:
    """Raw-space samples for every held-out row."""
    fn = self.sampler(solver, evaluations, guidance)
    shape = self.target_raw.shape[1:]
    out = []
    for start, rows, src in self._batches():
      noise = np.asarray(row_noise(self.seed, start, len(src), shape))
      gen = self._gather(fn(params, self._shard(src), self._shard(noise)))
      out.append(gen[:rows])
    return np.asarray(self.normalizer.decode(np.concatenate(out)))

  def evaluate(self, params, solver: str, evaluations: int, guidance: float = 1.0) -> dict:
    generated = self.generate(params, solver, evaluations, guidance)
    m = Metrics()
    m.add(generated, self.target_raw)
    return m.result()

  def velocity_cosine(self, params) -> float:
    """On the first batch, with noise and t fixed by the seed."""
    src = self.source[:self.batch_size]
    if len(src) % self.mesh.devices.size:
      return float("nan")
    x1 = np.asarray(self.normalizer.encode(self.target_raw[:self.batch_size]), np.float32)
    key = jax.random.key(self.seed + 1)
    return float(self._velocity_cos(params, self._shard(src), self._shard(x1), key))


# ----------------------------------------------------------------------------- in training

def held_out(run) -> tuple[np.ndarray, np.ndarray]:
  """(normalised source, raw target) of the evaluated rows: the first eval.num_images of the
  validation split, or the overfitting subset itself."""
  c = run.config
  if c.data.overfit_size:
    split, limit = "train", c.data.overfit_size
  else:
    split, limit = "validation", c.eval.num_images
  from flowmap import data as data_lib
  feats = data_lib.load_features(run.data_dir, split, limit, [c.data.source, c.data.target])
  source = np.asarray(run.normalizers["source"].encode(feats[c.data.source]), np.float32)
  return source, feats[c.data.target]


def make_evaluator(run) -> "Evaluator":
  source, target = held_out(run)
  return Evaluator(run.graphdef, run.mesh, source, target, run.normalizers["target"],
                   run.config.eval.batch_size, seed=run.config.seed + 1_000_003)


def run_eval(run, evaluator, state, step: int) -> dict:
  """Periodic evaluation: EMA weights with the configured solver; writes eval/<step>.json."""
  c = run.config.eval
  results = {}
  for label, params in (("ema", state["ema"]), ("raw", state["params"])):
    m = evaluator.evaluate(params, c.solver, c.steps, c.guidance)
    for k, v in m.items():
      results[f"eval/{k}" if label == "ema" else f"eval/raw_{k}"] = v
  results["eval/velocity_cosine"] = evaluator.velocity_cosine(state["ema"])
  if run.is_main:
    os.makedirs(os.path.join(run.workdir, "eval"), exist_ok=True)
    with open(os.path.join(run.workdir, "eval", f"{step}.json"), "w") as f:
      json.dump({"step": step, "solver": c.solver, "evaluations": c.steps,
                 "guidance": c.guidance, **results}, f, indent=1)
  return results


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_training(workdir: str) -> str:
  """plots/training.png: training loss and velocity cosine, held-out cosine over steps."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = read_metrics(workdir)
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  series = [("train/loss", axes[0], "loss"), ("train/velocity_cosine", axes[1], "velocity cosine"),
            ("eval/cosine_token", axes[2], "held-out cosine")]
  for key, ax, title in series:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
      ax.plot(*zip(*pts), marker="o" if key.startswith("eval") else None, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  for key in ("eval/cosine_global", "baseline/ridge_cosine_token"):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
      axes[2].plot(*zip(*pts), marker="o", label=key)
  axes[2].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  path = os.path.join(workdir, "plots", "training.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
