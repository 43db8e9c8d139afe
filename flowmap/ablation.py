"""python -m flowmap.ablation: what each of flowmap's choices buys, one change at a time.

Trains the demo (``--config``, default configs/demo.py) on one shared copy of its synthetic
dataset with flowmap's defaults, then once per earlier choice it replaces (the earlier PyTorch
attempts' and BLIP3-o's), changing only that one:

- targets scaled to unit L2 norm (``data.normalize=unit``: the data far below the noise);
- the sampler run from data to noise (the defaults' own weights, integrated with time
  reversed: the earlier attempts' sampler bug; no training);
- uniform instead of logit-normal training times (``flow.time_sampling=uniform``);
- the closed-form linear map as the prior instead of the MLP (``model.prior=linear``: the
  earlier design), and no prior at all (``model.prior=none``: the network alone, with the
  source still added at each position);
- no source injection: the source reaches the target only through cross-attention
  (``model.aligned_conditioning=False``, ``model.prior=none``);
- raw instead of standardised features (``data.normalize=none``), on the demo's features
  (already near unit scale) and on the same features with the targets at 20x their scale
  (``data.synthetic.target_scale=20``, like encoders whose features are far from unit scale),
  next to the defaults on that data.

It prints one markdown table of the mean mode's and the samples' pointwise figures and the
samples' distribution-level ones (pooled Frechet distance, variance ratio) on the same
held-out images, next to ridge and the MLP, and writes them to ``<out>/ablation.json``. Each run is
resumable: run the same command again to finish.

  python -m flowmap.ablation --out runs/ablation [--variants defaults,unit_norm,...]
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)   # config files import `configs.default`

FLAGS = flags.FLAGS

# name -> (what it is, config overrides, or None for the reversed sampler)
VARIANTS = {
    "defaults": ("flowmap's defaults", {}),
    "unit_norm": ("targets scaled to unit L2 norm", {"data.normalize": "unit"}),
    "reversed_sampler": ("sampler run from data to noise (defaults' weights)", None),
    "uniform_time": ("uniform training times", {"flow.time_sampling": "uniform"}),
    "linear_prior": ("the linear map as the prior, not the MLP", {"model.prior": "linear"}),
    "no_prior": ("no prior: the network alone", {"model.prior": "none"}),
    "no_injection": ("no source injection (cross-attention only)",
                     {"model.aligned_conditioning": False, "model.prior": "none"}),
    "raw_features": ("raw features, not standardised", {"data.normalize": "none"}),
    "defaults_scaled": ("flowmap's defaults, targets at 20x scale",
                        {"data.synthetic.target_scale": 20.0}),
    "raw_features_scaled": ("raw features, targets at 20x scale",
                            {"data.normalize": "none", "data.synthetic.target_scale": 20.0}),
}
BASELINE_ROWS = {"ridge": "ridge (closed-form linear map)",
                 "mlp": "MLP (the ladder's rung; the defaults' prior)"}
# r2 and cosine do not depend on the target's scale; MSE and the Frechet distance do.
FIGURES = (("mean", "eval/mean/", ("cosine_token", "r2", "mse")),
           ("sample", "eval/sample/", ("cosine_token", "r2", "mse", "fd_pooled",
                                       "variance_ratio")))


def with_overrides(config, overrides: dict):
  """A copy of ``config`` with dotted keys replaced (unknown keys are an error)."""
  c = config.copy_and_resolve_references()
  for dotted, value in overrides.items():
    *path, key = dotted.split(".")
    node = c
    for part in path:
      node = node[part]
    if key not in node:
      raise KeyError(f"unknown config key {dotted!r}")
    node[key] = value
  return c


def reversed_row_sampler(graphdef, target_shape, solver: str):
  """A row sampler (the signature of ``sampling.make_row_sampler``'s) that starts from the
  same per-row noise and integrates the learned velocity with time reversed, from t = 1 down
  to t = 0: dx/dtau = -v(x, 1 - tau). It is what a sampler that runs from data to noise does
  with a model trained from noise (t = 0) to data (t = 1)."""
  import jax
  from flax import nnx
  from flowmap import flow, sampling

  @jax.jit
  def sample_rows(params, condition, rows, seed, steps):
    model = nnx.merge(graphdef, params)
    source, prior, prior_std = sampling.model_inputs(condition)
    context = model.source_context(source, None, prior, prior_std)
    noise = sampling.noise_for_rows(seed, rows, target_shape)
    return flow.sample(lambda x, t: -model.velocity(x, 1.0 - t, context), noise, steps,
                       solver)
  return sample_rows


def evaluate_reversed(config, workdir: str) -> dict:
  """The trained run in ``workdir`` sampled with the reversed sampler (``eval.solver``,
  ``eval.steps`` evaluations): ``eval/sample/*``."""
  from flowmap import evaluate
  spec, data_dir, graphdef, mesh, weights = evaluate.restore(config, workdir)
  evaluator = evaluate.make_evaluator(config, workdir, data_dir, spec, graphdef, mesh)
  c = config.eval
  evaluator.use_sampler(c.solver, 1.0, "sample",
                        reversed_row_sampler(graphdef, evaluator.target_shape, c.solver))
  figures = evaluator.evaluate(weights.ema, c.solver, c.steps, 1.0, "sample")
  return {**{f"eval/sample/{k}": v for k, v in figures.items()}, **evaluator.baseline}


def demo_data(config, out: str) -> str:
  """The demo dataset of ``config.data.synthetic`` under ``out`` (written once): one per
  target scale, shared by every variant on it."""
  from flowmap import synthetic
  s = config.data.synthetic
  scale = float(s.target_scale)
  data_dir = os.path.join(out, "data" if scale == 1.0 else f"data-target-scale-{scale:g}")
  synthetic.write_demo_dataset(data_dir, train_size=s.train_size,
                               validation_size=s.validation_size, seed=config.seed,
                               grid=s.grid, source_dim=s.source_dim, target_dim=s.target_dim,
                               target_scale=scale)
  return data_dir


def run_variant(config, out: str, name: str) -> dict:
  from flowmap import train
  _, overrides = VARIANTS[name]
  if overrides is None:   # evaluation only, on the defaults' weights
    base = config.copy_and_resolve_references()
    base.data.dir = demo_data(base, out)
    defaults_dir = os.path.join(out, "runs", "defaults")
    train.train_and_evaluate(base, defaults_dir)   # trains, finishes or just re-evaluates it
    results = evaluate_reversed(base, defaults_dir)
  else:
    c = with_overrides(config, overrides)
    c.data.dir = demo_data(c, out)
    results = train.train_and_evaluate(c, os.path.join(out, "runs", name))
  keep = {p + k for _, p, ks in FIGURES for k in ks}
  keep |= {f"baseline/{rung}_{k}" for rung in BASELINE_ROWS for _, _, ks in FIGURES
           for k in ks}
  return {"variant": name, **{k: results[k] for k in sorted(keep) if k in results}}


def table(rows: list[dict]) -> str:
  """A markdown table, one line per variant and one per baseline rung, ridge and the MLP
  (from the first run on the demo's own scale that has it, or the first run)."""
  head = ["choice"] + [f"{mode} {k}" for mode, _, ks in FIGURES for k in ks]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

  def cells(get):
    return ["-" if get(p + k) is None else f"{get(p + k):.4f}" for _, p, ks in FIGURES
            for k in ks]
  for r in rows:
    lines.append("| " + " | ".join([VARIANTS[r["variant"]][0]] + cells(r.get)) + " |")
  for rung, name in BASELINE_ROWS.items():
    having = [r for r in rows if any(k.startswith(f"baseline/{rung}_") for k in r)]
    unscaled = [r for r in having if "scaled" not in r["variant"]]
    source = (unscaled or having or [None])[0]
    if source is not None:   # a regressor has one output: the same figures in both columns
      get = lambda key, r=source, rung=rung: r.get(f"baseline/{rung}_" + key.split("/")[-1])
      lines.append("| " + " | ".join([name] + cells(get)) + " |")
  return "\n".join(lines)


def _define_flags():
  config = config_flags.DEFINE_config_file(
      "config", os.path.join(HERE, "configs", "demo.py"), "ml_collections config file.",
      lock_config=False)
  flags.DEFINE_string("out", "runs/ablation", "Where the dataset, the runs and ablation.json go.")
  flags.DEFINE_list("variants", list(VARIANTS), f"Any of {', '.join(VARIANTS)}.")
  return config


def main(argv, config):
  del argv
  unknown = [v for v in FLAGS.variants if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
  rows = [run_variant(config.value, FLAGS.out, name) for name in FLAGS.variants]
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "ablation.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(table(rows))


if __name__ == "__main__":
  _config = _define_flags()
  app.run(lambda argv: main(argv, _config))
