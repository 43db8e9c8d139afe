"""Evaluation: sampling the held-out rows, the metrics of DESIGN.md, baselines, solver sweeps.

Every figure is computed in the raw target space. The noise (and, for the velocity cosine,
the time) of evaluated row i is a function of (seed, i) only, padded rows are dropped before
anything is summed, and sums run in float64 on the host, so a figure does not depend on the
batch size or on the number of devices.

Two baselines stand next to every evaluation so that a cosine means something: a closed-form
ridge regression from source to target fitted on (a bounded part of) the training split, and
the trivial predictor that outputs the mean training target. They need one pass over the
training split, so they are computed once per run and cached in ``<workdir>/baseline.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowmap import flow
from flowmap.metrics import METRICS, Metrics, cosine, score

RIDGE_ALPHAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HOLDOUT_EVERY = 10   # every 10th fitted training row chooses the ridge penalty


# ----------------------------------------------------------------------------- sampling

def noise_for_rows(seed, rows: jax.Array, shape) -> jax.Array:
  """Standard normal noise [len(rows), *shape]; each row depends only on (seed, its index).

  Works inside jit with a traced seed and sharded indices (threefry is partitionable, so the
  values do not depend on the sharding either)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), tuple(shape)))(rows)


def row_noise(seed: int, start: int, rows: int, shape) -> jax.Array:
  """Standard normal noise [rows, *shape]; row i depends only on (seed, start + i)."""
  return noise_for_rows(seed, jnp.arange(rows) + start, shape)


def make_velocity(graphdef) -> Callable:
  """(params, x, t, source, drop) -> predicted velocity, float32."""
  def velocity(params, x, t, source, drop=None):
    return nnx.merge(graphdef, params)(x, t, source, drop)
  return velocity


def _generator(graphdef, solver: str, evaluations: int, guidance: float,
               shift: float) -> Callable:
  """(params, source, noise) -> generated target in the normalised space (not jitted)."""
  steps = flow.steps_for_evaluations(solver, evaluations)
  velocity = make_velocity(graphdef)

  def generate(params, source, noise):
    def v(x, t, drop):
      src = jnp.concatenate([source, source]) if x.shape[0] != source.shape[0] else source
      return velocity(params, x, t, src, drop)
    return flow.sample(flow.guided(v, guidance), noise, steps, solver, shift)
  return generate


def make_sampler(graphdef, solver: str, evaluations: int, guidance: float = 1.0,
                 shift: float = 1.0) -> Callable:
  """A jitted (params, source, noise) -> generated target (normalised space)."""
  return jax.jit(_generator(graphdef, solver, evaluations, guidance, shift))


def make_row_sampler(graphdef, target_shape, solver: str, evaluations: int,
                     guidance: float = 1.0, shift: float = 1.0) -> Callable:
  """A jitted (params, source, rows, seed) -> generated target (normalised space) whose
  noise for row ``rows[i]`` is drawn on the device from (seed, rows[i])."""
  generate = _generator(graphdef, solver, evaluations, guidance, shift)

  @jax.jit
  def sample_rows(params, source, rows, seed):
    return generate(params, source, noise_for_rows(seed, rows, target_shape))
  return sample_rows


def make_velocity_cosines(graphdef) -> Callable:
  """A jitted (params, source, x1, rows, seed) -> cosine per row between the predicted and
  the true velocity at a random t; t and noise of row i come from (seed, i)."""
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


# ----------------------------------------------------------------------------- evaluator

class Evaluator:
  """Samples the fixed held-out rows with the ODE sampler and scores them in raw space.

  ``source`` is normalised, ``target_raw`` raw; both numpy, identical on every process. Each
  batch is padded to the (device-divisible) batch size, split between processes, sampled on
  the mesh and gathered back, so every process computes the same figures. ``baseline`` (the
  ``baseline/...`` figures of the same rows) is reported next to every evaluation.
  """

  def __init__(self, graphdef, mesh, source: np.ndarray, target_raw: np.ndarray,
               target_normalizer, batch_size: int, seed: int,
               baseline: Optional[dict] = None, shift: float = 1.0):
    self.graphdef, self.mesh = graphdef, mesh
    self.source = np.asarray(source, np.float32)
    self.target_raw = np.asarray(target_raw, np.float32)
    self.normalizer = target_normalizer
    n_dev = mesh.devices.size   # batches: a multiple of the devices, no larger than needed
    self.batch_size = -(-min(batch_size, max(len(self.source), 1)) // n_dev) * n_dev
    self.seed = seed
    self.shift = shift
    self.baseline = dict(baseline or {})
    self.target_shape = self.target_raw.shape[1:]
    self._samplers = {}
    self._velocity_cosines = make_velocity_cosines(graphdef)

  @property
  def num_images(self) -> int:
    return len(self.source)

  def sampler(self, solver: str, evaluations: int, guidance: float):
    key = (solver, evaluations, float(guidance))
    if key not in self._samplers:
      self._samplers[key] = make_row_sampler(self.graphdef, self.target_shape, solver,
                                             evaluations, guidance, self.shift)
    return self._samplers[key]

  def _batches(self, *arrays):
    """(rows, padded arrays..., row indices) per batch; padding repeats the last row."""
    n = len(arrays[0])
    for start in range(0, n, self.batch_size):
      parts = [a[start:start + self.batch_size] for a in arrays]
      rows = len(parts[0])
      pad = self.batch_size - rows
      if pad:
        parts = [np.concatenate([p, np.repeat(p[-1:], pad, 0)]) for p in parts]
      idx = np.arange(start, start + self.batch_size, dtype=np.int32)
      yield rows, parts, idx

  def _shard(self, x: np.ndarray):
    from flowmap import sharding
    pc, pi = jax.process_count(), jax.process_index()
    per = len(x) // pc
    return sharding.global_batch({"x": x[pi * per:(pi + 1) * per]}, self.mesh)["x"]

  def _gather(self, x) -> np.ndarray:
    if jax.process_count() == 1:
      return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def generate(self, params, solver: str, evaluations: int, guidance: float = 1.0) -> np.ndarray:
    """Raw-space samples for every held-out row."""
    fn = self.sampler(solver, evaluations, guidance)
    seed = np.int32(self.seed)
    out = []
    for rows, (src,), idx in self._batches(self.source):
      gen = self._gather(fn(params, self._shard(src), self._shard(idx), seed))
      out.append(gen[:rows])
    return np.asarray(self.normalizer.decode(np.concatenate(out)), np.float32)

  def evaluate(self, params, solver: str, evaluations: int, guidance: float = 1.0) -> dict:
    return score(self.generate(params, solver, evaluations, guidance), self.target_raw)

  def velocity_cosine(self, params) -> float:
    """Mean over every held-out row, with t and noise of row i fixed by (seed, i)."""
    x1 = np.asarray(self.normalizer.encode(self.target_raw), np.float32)
    seed = np.int32(self.seed + 1)
    total = 0.0
    for rows, (src, tgt), idx in self._batches(self.source, x1):
      cos = self._gather(self._velocity_cosines(params, self._shard(src), self._shard(tgt),
                                                self._shard(idx), seed))
      total += float(np.sum(cos[:rows], dtype=np.float64))
    return total / len(self.source)

  def sweep(self, params, solvers: Sequence[str], evaluations: Sequence[int],
            guidances: Sequence[float] = (1.0,)) -> list[dict]:
    """Every metric per (solver, model evaluations, guidance). Heun spends two evaluations a
    step, so odd counts are Heun-less; a guided evaluation runs the model on a doubled batch
    (``model_passes`` counts that)."""
    rows = []
    for guidance in guidances:
      for solver in solvers:
        for n in evaluations:
          if solver == "heun" and n % 2:
            continue
          m = self.evaluate(params, solver, int(n), guidance)
          rows.append({"solver": solver, "evaluations": int(n), "guidance": float(guidance),
                       "model_passes": int(n) * (1 if guidance == 1.0 else 2), **m})
    return rows


# ----------------------------------------------------------------------------- baselines

class RidgeStats:
  """Sufficient statistics of a least-squares fit y ~ x, accumulated in float64."""

  def __init__(self, din: int, dout: int):
    self.n = 0
    self.xx = np.zeros((din, din))
    self.xy = np.zeros((din, dout))
    self.x_sum = np.zeros(din)
    self.y_sum = np.zeros(dout)
    self.yy = 0.0

  def add(self, x: np.ndarray, y: np.ndarray) -> None:
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    self.n += len(x)
    self.xx += x.T @ x
    self.xy += x.T @ y
    self.x_sum += x.sum(0)
    self.y_sum += y.sum(0)
    self.yy += float(np.sum(y * y))

  def merged(self, other: "RidgeStats") -> "RidgeStats":
    out = RidgeStats(*self.xy.shape)
    out.n = self.n + other.n
    for name in ("xx", "xy", "x_sum", "y_sum", "yy"):
      setattr(out, name, getattr(self, name) + getattr(other, name))
    return out

  def solve(self, alpha: float) -> np.ndarray:
    """[din + 1, dout] weights (last row the intercept) of the ridge fit; the penalty,
    alpha times the mean input variance, leaves the intercept alone."""
    mx, my = self.x_sum / self.n, self.y_sum / self.n
    cxx = self.xx - self.n * np.outer(mx, mx)
    cxy = self.xy - self.n * np.outer(mx, my)
    lam = alpha * max(np.trace(cxx) / len(cxx), 1e-12)
    w = np.linalg.solve(cxx + lam * np.eye(len(cxx)), cxy)
    return np.concatenate([w, (my - mx @ w)[None]])

  def sse(self, coef: np.ndarray) -> float:
    """Sum of squared errors of ``coef`` on the rows these statistics hold."""
    w, b = coef[:-1], coef[-1]
    xx_b = self.x_sum @ w
    quad = (np.sum(w * (self.xx @ w)) + 2 * np.sum(xx_b * b) + self.n * np.sum(b * b))
    return float(self.yy - 2 * (np.sum(w * self.xy) + np.sum(b * self.y_sum)) + quad)


@dataclasses.dataclass
class Baselines:
  """The fitted ridge map (``kind`` per_token or pooled) and the mean training target."""
  kind: str
  coef: np.ndarray            # [source dim + 1, target dim]
  offsets: np.ndarray         # [target tokens, target dim]: added per position (pooled kind)
  mean_target: np.ndarray     # [target tokens, target dim]
  alpha: float
  rows: int

  def ridge(self, source: np.ndarray) -> np.ndarray:
    source = np.asarray(source, np.float64)
    if self.kind == "per_token":
      return source @ self.coef[:-1] + self.coef[-1]
    pooled = source.mean(1) @ self.coef[:-1] + self.coef[-1]
    return pooled[:, None, :] + self.offsets[None]

  def mean(self, rows: int) -> np.ndarray:
    return np.broadcast_to(self.mean_target, (rows, *self.mean_target.shape))


def ridge_kind(source_shape, target_shape) -> str:
  """per_token when every target token has a source token at the same index (equal token
  counts: aligned grids, or two pooled embeddings), pooled otherwise."""
  return "per_token" if source_shape[0] == target_shape[0] else "pooled"


def fit_baselines(batches: Iterable[tuple[np.ndarray, np.ndarray]], source_shape,
                  target_shape, alphas: Sequence[float] = RIDGE_ALPHAS) -> Baselines:
  """Closed-form baselines from raw (source, target) batches of the training split.

  per_token: one linear map (with intercept) shared by every token position, the natural
  linear answer when grids align. pooled: the mean-pooled source predicts the mean-pooled
  target linearly, and each position adds its mean offset from the pooled mean. The penalty
  is chosen on every 10th row, then the map is refitted on all rows.
  """
  kind = ridge_kind(source_shape, target_shape)
  ds, dt = source_shape[1], target_shape[1]
  fit, held = RidgeStats(ds, dt), RidgeStats(ds, dt)
  target_sum = np.zeros(tuple(target_shape))
  seen = 0
  for source, target in batches:
    source = np.asarray(source, np.float64)
    target = np.asarray(target, np.float64)
    target_sum += target.sum(0)
    index = np.arange(seen, seen + len(source))
    seen += len(source)
    for stats, pick in ((fit, index % HOLDOUT_EVERY != HOLDOUT_EVERY - 1),
                        (held, index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1)):
      if not pick.any():
        continue
      s, t = source[pick], target[pick]
      if kind == "per_token":
        stats.add(s.reshape(-1, ds), t.reshape(-1, dt))
      else:
        stats.add(s.mean(1), t.mean(1))
  if seen == 0:
    raise ValueError("no training rows to fit the baselines on")
  mean_target = target_sum / seen
  alpha = 1e-3
  if held.n and fit.n:
    errors = {a: held.sse(fit.solve(a)) for a in alphas}
    alpha = min(errors, key=errors.get)
  coef = fit.merged(held).solve(alpha)
  offsets = mean_target - mean_target.mean(0, keepdims=True)
  if kind == "per_token":
    offsets = np.zeros_like(mean_target)
  return Baselines(kind, coef, offsets, mean_target, alpha, seen)


def baseline_metrics(baselines: Baselines, source_raw: np.ndarray,
                     target_raw: np.ndarray) -> dict:
  out = {}
  for name, pred in (("ridge", baselines.ridge(source_raw)),
                     ("mean", baselines.mean(len(target_raw)))):
    for k, v in score(pred, target_raw).items():
      out[f"baseline/{name}_{k}"] = v
  return out


def _baseline_key(run, held_out_split: str, held_out_rows: int, rows: int) -> dict:
  c = run.config
  with open(os.path.join(run.data_dir, "stats.json"), "rb") as f:
    stats_hash = hashlib.sha1(f.read()).hexdigest()
  return {"data_dir": os.path.abspath(run.data_dir), "stats_sha1": stats_hash,
          "source": c.data.source, "target": c.data.target, "train_rows": rows,
          "held_out_split": held_out_split, "held_out_rows": held_out_rows}


def _training_batches(run, rows: int, batch_size: int = 64):
  from flowmap import data as data_lib
  c = run.config
  ds = data_lib.make_dataset(run.data_dir, "train", [c.data.source, c.data.target], batch_size,
                             shuffle=False, repeat=False, limit=rows, drop_remainder=False)
  for batch in data_lib.iterate_numpy(ds):
    yield batch[c.data.source], batch[c.data.target]


def run_baselines(run, source_raw: np.ndarray, target_raw: np.ndarray, held_out_split: str,
                  ) -> dict:
  """The ``baseline/...`` figures of the held-out rows, from ``<workdir>/baseline.json``
  when it was computed for the same data and rows, else fitted now (one bounded pass over
  the training split) and cached."""
  from flowmap import data as data_lib
  c = run.config
  available = data_lib.split_size(run.data_dir, "train")
  if c.data.overfit_size:
    available = min(available, c.data.overfit_size)
  rows = int(c.eval.get("baseline_rows", 2048))
  rows = available if rows <= 0 else min(rows, available)
  key = _baseline_key(run, held_out_split, len(source_raw), rows)
  path = os.path.join(run.workdir, "baseline.json")
  try:
    with open(path) as f:
      cached = json.load(f)
    if cached.get("key") == key:
      return cached["metrics"]
  except (OSError, ValueError, KeyError):
    pass
  source_shape, target_shape = source_raw.shape[1:], target_raw.shape[1:]
  fitted = fit_baselines(_training_batches(run, rows), source_shape, target_shape)
  metrics = baseline_metrics(fitted, source_raw, target_raw)
  if jax.process_index() == 0:
    write_json_atomic(path, {"key": key, "ridge_kind": fitted.kind,
                             "ridge_alpha": fitted.alpha, "train_rows": fitted.rows,
                             "metrics": metrics})
  return metrics


def write_json_atomic(path: str, obj) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def read_baseline(workdir: str) -> dict:
  """The cached baseline record ({key, ridge_kind, ridge_alpha, train_rows, metrics})."""
  with open(os.path.join(workdir, "baseline.json")) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- in training

def held_out_raw(run) -> tuple[np.ndarray, np.ndarray, str]:
  """(raw source, raw target, split) of the evaluated rows: the first eval.num_images of the
  validation split, or the overfitting subset itself."""
  c = run.config
  if c.data.overfit_size:
    split, limit = "train", c.data.overfit_size
  else:
    split, limit = "validation", c.eval.num_images
  from flowmap import data as data_lib
  feats = data_lib.load_features(run.data_dir, split, limit, [c.data.source, c.data.target])
  return feats[c.data.source], feats[c.data.target], split


def held_out(run) -> tuple[np.ndarray, np.ndarray]:
  """(normalised source, raw target) of the evaluated rows."""
  source, target, _ = held_out_raw(run)
  return np.asarray(run.normalizers["source"].encode(source), np.float32), target


def make_evaluator(run) -> Evaluator:
  source, target, split = held_out_raw(run)
  baseline = run_baselines(run, source, target, split)
  normalised = np.asarray(run.normalizers["source"].encode(source), np.float32)
  return Evaluator(run.graphdef, run.mesh, normalised, target, run.normalizers["target"],
                   run.config.eval.batch_size, seed=run.config.seed + 1_000_003,
                   baseline=baseline)


def _weights(state) -> list[tuple[str, object]]:
  return [("ema", state["ema"]), ("raw", state["params"])]


def _prefix(label: str) -> str:
  return "eval/" if label == "ema" else "eval/raw_"


def run_eval(run, evaluator: Evaluator, state, step: int) -> dict:
  """Periodic evaluation: EMA and raw weights with the configured solver, their velocity
  cosines, and the baselines' cosines; writes every figure to eval/<step>.json."""
  c = run.config.eval
  results = run_eval_weights(run, evaluator, state)
  for name in ("ridge", "mean"):
    for k in ("cosine_token", "cosine_global"):
      key = f"baseline/{name}_{k}"
      if key in evaluator.baseline:
        results[key] = evaluator.baseline[key]
  if run.is_main:
    write_eval_json(run.workdir, step, {
        "solver": c.solver, "evaluations": c.steps, "guidance": c.guidance,
        "num_images": evaluator.num_images, **results, **evaluator.baseline})
  return results


def run_eval_weights(run, evaluator: Evaluator, state) -> dict:
  """The configured solver's figures and the velocity cosine, for EMA and raw weights."""
  c = run.config.eval
  results = {}
  for label, params in _weights(state):
    for k, v in evaluator.evaluate(params, c.solver, c.steps, c.guidance).items():
      results[_prefix(label) + k] = v
    results[_prefix(label) + "velocity_cosine"] = evaluator.velocity_cosine(params)
  return results


def write_eval_json(workdir: str, step: int, record: dict) -> str:
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  path = os.path.join(workdir, "eval", f"{step}.json")
  write_json_atomic(path, {"step": int(step), **record})
  return path


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_training(workdir: str) -> str:
  """plots/training.png: training loss and velocity cosine, held-out cosine over steps with
  the baselines' cosines for reference."""
  plt = _pyplot()
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
  for key, style in (("eval/cosine_global", "-"), ("baseline/ridge_cosine_token", "--"),
                     ("baseline/mean_cosine_token", ":")):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
      axes[2].plot(*zip(*pts), style, marker="o" if style == "-" else None, label=key)
  axes[2].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  path = os.path.join(workdir, "plots", "training.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- --mode eval

def plot_sweep(workdir: str, step: int, sweep: Sequence[dict], baseline: dict) -> str:
  """plots/sweep_<step>.png (and a copy as plots/sweep.png): cosine against model
  evaluations per solver; EMA solid, raw weights dashed, baselines as horizontal lines."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  colours = {"euler": "tab:blue", "heun": "tab:orange"}
  curves = sorted({(r["weights"], r["solver"], r["guidance"]) for r in sweep},
                  key=lambda k: (k[0] != "ema", k[1], k[2]))
  for ax, metric in zip(axes, ("cosine_token", "cosine_global")):
    for weights, solver, guidance in curves:
      pts = sorted((r["evaluations"], r[metric]) for r in sweep
                   if (r["weights"], r["solver"], r["guidance"]) == (weights, solver, guidance))
      label = f"{solver} ({weights})" + (f" g={guidance:g}" if guidance != 1.0 else "")
      ax.plot(*zip(*pts), "-" if weights == "ema" else "--", marker="o", markersize=3,
              color=colours.get(solver), alpha=1.0 if guidance == 1.0 else 0.6,
              linewidth=1.6 if weights == "ema" else 1.0, label=label)
    for name, style in (("ridge", "k--"), ("mean", "k:")):
      key = f"baseline/{name}_{metric}"
      if key in baseline:
        ax.axhline(baseline[key], color="k", linestyle=style[1:], linewidth=1,
                   label=f"{name} baseline {baseline[key]:.3f}")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["evaluations"] for r in sweep})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("model evaluations per sample")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} at step {step}")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  plots = os.path.join(workdir, "plots")
  os.makedirs(plots, exist_ok=True)
  path = os.path.join(plots, f"sweep_{step}.png")
  fig.savefig(path, dpi=100)
  fig.savefig(os.path.join(plots, "sweep.png"), dpi=100)
  plt.close(fig)
  return path


def sweep_guidances(config) -> list[float]:
  """1 (no guidance) plus the configured scales; none when the run never learned the
  unconditional velocity (flow.cond_dropout = 0), which guidance needs."""
  scales = [1.0]
  if config.flow.cond_dropout > 0:
    for g in [config.eval.guidance, *config.eval.get("sweep_guidances", ())]:
      if float(g) not in scales:
        scales.append(float(g))
  return scales


def format_table(step: int, record: dict) -> str:
  """The short table --mode eval prints: cosine_token per solver and evaluation count."""
  sweep = record["sweep"]
  columns = sorted({(r["solver"], r["guidance"]) for r in sweep}, key=lambda k: (k[1], k[0]))
  header = ["evals"] + [f"{s}" + (f" g={g:g}" if g != 1.0 else "") + " ema/raw"
                        for s, g in columns]
  lines = [f"step {step}: cosine_token on {record['num_images']} held-out images",
           "  ".join(f"{h:>18}" if i else f"{h:>5}" for i, h in enumerate(header))]
  by_key = {(r["weights"], r["solver"], r["guidance"], r["evaluations"]): r for r in sweep}
  for n in sorted({r["evaluations"] for r in sweep}):
    cells = [f"{n:>5}"]
    for s, g in columns:
      ema, raw = by_key.get(("ema", s, g, n)), by_key.get(("raw", s, g, n))
      cells.append(f"{ema['cosine_token']:.4f}/{raw['cosine_token']:.4f}".rjust(18)
                   if ema and raw else "-".rjust(18))
    lines.append("  ".join(cells))
  b = record
  lines.append(f"baselines: ridge ({b.get('ridge_kind', '?')}) "
               f"{b['baseline/ridge_cosine_token']:.4f}  mean target "
               f"{b['baseline/mean_cosine_token']:.4f}")
  lines.append(f"configured ({b['solver']}, {b['evaluations']} evaluations, guidance "
               f"{b['guidance']:g}): " + "  ".join(
                   f"{k}={b['eval/' + k]:.4f}" for k in (*METRICS, "velocity_cosine")))
  return "\n".join(lines)


SHAPE_KEYS = ("size", "dim", "depth", "heads", "kv_heads", "mlp_ratio", "aligned_conditioning")


def _check_workdir_fits(config, workdir: str) -> None:
  """The model and features of the config must be the ones the checkpoint was trained
  with; say so in one line rather than fail deep inside the restore."""
  from flowmap import train
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  mine = json.loads(config.to_json_best_effort())
  for section, keys in (("model", SHAPE_KEYS), ("data", ("source", "target", "normalize"))):
    a, b = saved.get(section, {}), mine.get(section, {})
    for k in keys:
      if a.get(k) != b.get(k):
        raise train.ConfigError(
            f"config.{section}.{k} is {b.get(k)!r} but {workdir} was trained with "
            f"{a.get(k)!r}; evaluate with the run's config")


def restore_run(config, workdir: str, step: Optional[int] = None):
  """A ``train.Run`` for evaluation: data, normalisers, mesh and the restored weights
  ({'params', 'ema'}, nothing else) of ``step`` (default: newest); writes nothing."""
  from flowmap import checkpoint as checkpoint_lib
  from flowmap import data as data_lib
  from flowmap import mapper as mapper_lib
  from flowmap import model as model_lib
  from flowmap import sharding
  from flowmap import train
  train.validate_config(config)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise train.ConfigError(f"no checkpoints in {workdir}; train first with the same "
                            "--config and --workdir")
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  if checkpointer.latest_step() is None:
    raise train.ConfigError(f"no complete checkpoint in {ckpt_dir}")
  _check_workdir_fits(config, workdir)
  data_dir, stats = train.resolve_data(config, workdir)
  source_shape = data_lib.feature_shape(stats, config.data.source)
  target_shape = data_lib.feature_shape(stats, config.data.target)
  model_cfg = model_lib.config_from(config.model, source_shape, target_shape)
  mesh = sharding.make_mesh(config.mesh)
  normalizers = mapper_lib.read_normalizers(workdir)
  if normalizers is None:
    normalizers = {role: data_lib.Normalizer.from_stats(stats, config.data[role],
                                                        config.data.normalize)
                   for role in ("source", "target")}
  graphdef, abstract = mapper_lib.abstract_weights(model_cfg, config.seed)
  abstract = {"params": abstract, "ema": abstract}
  shardings = sharding.state_shardings(abstract, mesh)
  step, weights = mapper_lib.restore_weights(checkpointer, abstract, shardings, step)
  return train.Run(config, workdir, mesh, data_dir, stats, model_cfg, normalizers, graphdef,
                   None, {"step": step, **weights}, shardings, checkpointer)


def evaluate_workdir(config, workdir: str, step: Optional[int] = None) -> dict:
  """--mode eval: the newest checkpoint, EMA and raw weights, the configured solver and the
  full solver/evaluations(/guidance) sweep, next to the baselines. Writes eval/<step>.json,
  plots/sweep_<step>.png (and sweep.png), refreshes plots/training.png, prints a table."""
  run = restore_run(config, workdir, step)
  step = int(run.state["step"])
  c = config.eval
  evaluator = make_evaluator(run)
  results = run_eval_weights(run, evaluator, run.state)
  sweep = []
  solvers = list(c.get("sweep_solvers", flow.SOLVERS))
  counts = [int(n) for n in c.get("sweep_evaluations", (1, 2, 4, 8, 16, 32, 50))]
  guidances = sweep_guidances(config)
  for label, params in _weights(run.state):
    for row in evaluator.sweep(params, solvers, counts, guidances):
      sweep.append({"weights": label, **row})
  record = {"solver": c.solver, "evaluations": c.steps, "guidance": c.guidance,
            "num_images": evaluator.num_images, **results, **evaluator.baseline,
            "sweep": sweep}
  try:
    base = read_baseline(workdir)
    record.update(ridge_kind=base["ridge_kind"], ridge_alpha=base["ridge_alpha"],
                  baseline_train_rows=base["train_rows"])
  except (OSError, ValueError, KeyError):
    pass
  if run.is_main:
    path = write_eval_json(workdir, step, record)
    plot = plot_sweep(workdir, step, sweep, evaluator.baseline)
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      plot_training(workdir)
    print(format_table(step, record))
    print(f"wrote {path} and {plot}")
  return {**results, **{f"baseline/{name}_cosine_token":
                        evaluator.baseline[f"baseline/{name}_cosine_token"]
                        for name in ("ridge", "mean")}}
