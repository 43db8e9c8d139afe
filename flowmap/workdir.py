"""What a run leaves in its workdir, and reading it back.

  config.json          the full configuration (data.dir resolved to where the data really is)
  normalization.json   the run's spec: feature names and shapes, the model's shape-defining
                       settings, and the normalisation statistics it was trained in
  checkpoints/         orbax (flowmap.checkpoint)
  metrics.jsonl        one JSON object per logging event
  eval/<step>.json     every figure of one evaluation
  baseline.json        the fitted baselines' figures, cached
  plots/*.png          flowmap.plots

Training, ``--mode eval``, ``--mode map`` and the Mapper all read a run through ``RunSpec``,
and one check (``check_compatible``) decides whether a config may resume, evaluate or map
with a workdir's checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import jax.numpy as jnp
import ml_collections
import numpy as np

from flowmap import data as data_lib
from flowmap import linear as linear_lib
from flowmap import mlp as mlp_lib
from flowmap import model as model_lib
from flowmap import config as config_lib
from flowmap.config import ConfigError, check_dataset
from flowmap.fileio import read_json, write_json_atomic

CONFIG_FILE = "config.json"
SPEC_FILE = "normalization.json"
LINEAR_FILE = "linear_map.npz"
MLP_FILE = "prior_mlp.npz"          # the MLP fitted for model.prior (auto, mlp)
SELECTION_FILE = "selection.json"   # train.select_rows: every step's score, the chosen one
                                    # (its EMA weights: checkpoint.SELECTED_DIR)
# The model settings that give the weights their shapes and meaning: a checkpoint serves only
# a config that resolves to the same values (a named size and explicit dims may say it
# differently).
MODEL_KEYS = ("dim", "depth", "heads", "kv_heads", "mlp_ratio", "aligned_conditioning",
              "prior", "interval")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What a run is, whichever command opens it: the features, their shapes, the model, and
  the space the model works in (the normalisation statistics, ``data.normalize``).

  With a prior (``model.prior``) the model also reads, at each target position, an estimate
  of the target fitted on the training split before training, normalised like the target:
  the closed-form linear map's (``flowmap.linear``) or the MLP's (``flowmap.mlp``),
  whichever ``fit_prior`` chose. The regressor a user would otherwise fit is one of the
  model's inputs and the mean of the Gaussian model the network corrects. ``condition``
  builds the model's conditioning from raw source features, numpy on the host or jax arrays
  inside jit."""
  source: str
  target: str
  model_cfg: model_lib.ModelConfig
  normalizers: dict          # role ("source", "target") -> data.Normalizer
  linear: Optional[linear_lib.LinearMap] = None   # fitted when the model takes a prior
  mlp: Optional[mlp_lib.MLPRegressor] = None      # fitted when model.prior is auto or mlp
  prior: str = "none"        # the estimate the model corrects: linear, mlp or none ("auto"
                             # until fit_prior has chosen)

  @property
  def estimate(self):
    """The fitted estimate the model corrects (LinearMap or MLPRegressor), or None."""
    return {"linear": self.linear, "mlp": self.mlp}.get(self.prior)

  @property
  def source_shape(self) -> tuple:
    return tuple(self.model_cfg.source_shape)

  @property
  def target_shape(self) -> tuple:
    return tuple(self.model_cfg.target_shape)

  def encode_source(self, source):
    return self.normalizers["source"].encode(_float(source))

  def encode_target(self, target):
    return self.normalizers["target"].encode(_float(target))

  def decode_target(self, x):
    return self.normalizers["target"].decode(x)

  def condition(self, source) -> dict:
    """{"source": the normalised source, "prior" and "prior_std": the fitted estimate of the
    target and its residual spread in the model's space (with a prior)} from raw source
    features."""
    out = {"source": self.encode_source(source)}
    if self.model_cfg.prior:
      prior = self.normalizers["target"].encode(self.estimate(_float(source)))
      out["prior"] = prior.astype(np.float32) if isinstance(prior, np.ndarray) else prior
      std = self.prior_std
      shape = (prior.shape[0], 1, len(std))
      out["prior_std"] = (np.broadcast_to(std, shape) if isinstance(prior, np.ndarray) else
                          jnp.broadcast_to(jnp.asarray(std), shape))
    if isinstance(out["source"], np.ndarray):
      out["source"] = out["source"].astype(np.float32)
    return out

  @property
  def prior_std(self) -> np.ndarray:
    """[Dt] float32: the estimate's residual standard deviation in the model's space."""
    std = np.asarray(self.estimate.residual_std, np.float64)
    norm = self.normalizers["target"]
    if norm.kind == "standardize":
      std = std / np.asarray(norm.std, np.float64).reshape(-1, len(std)).mean(0)
    elif norm.kind == "l2":
      std = std * np.sqrt(len(std)) / norm.mean_norm
    elif norm.kind == "unit":
      std = std / norm.mean_norm
    return std.astype(np.float32)

  def to_json(self) -> dict:
    return {"source": self.source, "target": self.target,
            "source_shape": list(self.source_shape), "target_shape": list(self.target_shape),
            "model": {k: getattr(self.model_cfg, k) for k in MODEL_KEYS},
            "prior": self.prior,
            "source_normalizer": self.normalizers["source"].to_json(),
            "target_normalizer": self.normalizers["target"].to_json()}


def _float(x):
  """float32 on the device (features travel in their stored dtype), float64 on the host."""
  if isinstance(x, np.ndarray):
    return np.asarray(x, np.float64)
  import jax.numpy as jnp
  return x.astype(jnp.float32)


def validate_config(config) -> None:
  """Every value check of ``config`` (flowmap.config.validate, with the model's names)."""
  config_lib.validate(config, model_lib.SIZES, model_lib.REMAT_POLICIES, model_lib.ATTENTION)


def model_config(config, source_shape, target_shape) -> model_lib.ModelConfig:
  """``config.model`` resolved for these shapes; the MeanFlow objective adds the model's
  second time input."""
  model_cfg = model_lib.config_from(config.model, source_shape, target_shape)
  return dataclasses.replace(model_cfg,
                             interval=config.flow.get("objective", "flow") == "meanflow")


def spec_from_config(config, stats: dict) -> RunSpec:
  """The spec a config gives on a dataset (its stats.json): shapes and statistics from the
  data, model settings from the config."""
  shapes = {name: tuple(f["shape"]) for name, f in stats["features"].items()}
  try:
    model_cfg = model_config(config, shapes[config.data.source], shapes[config.data.target])
  except ValueError as e:
    raise ConfigError(str(e)) from None
  normalizers = {role: data_lib.Normalizer.from_stats(stats, config.data[role],
                                                      config.data.normalize)
                 for role in ("source", "target")}
  return RunSpec(config.data.source, config.data.target, model_cfg, normalizers,
                 prior=config.model.prior if model_cfg.prior else "none")


def resolve_data(config, workdir: str) -> tuple[str, dict]:
  """The dataset directory and its stats, checked against the config. An empty data.dir is
  the demo: its synthetic dataset is written into ``<workdir>/data`` (process 0)."""
  import jax
  data_dir = config.data.dir
  if not data_dir:
    data_dir = os.path.join(workdir, "data")
    if jax.process_index() == 0:
      from flowmap import synthetic
      s = config.data.synthetic
      synthetic.write_demo_dataset(
          data_dir, train_size=s.train_size, validation_size=s.validation_size,
          seed=config.seed, grid=s.grid, source_dim=s.source_dim, target_dim=s.target_dim,
          target_scale=s.target_scale)
    sync("synthetic-data")
  if not os.path.isdir(data_dir):
    raise ConfigError(f"data.dir {data_dir!r} does not exist; extract features into it "
                      "with extract_features.py or leave data.dir empty for the demo")
  try:
    stats = data_lib.load_stats(data_dir)
  except data_lib.DataError as e:
    raise ConfigError(str(e)) from None
  check_dataset(config, data_dir,
                {name: tuple(f["shape"]) for name, f in stats["features"].items()})
  return data_dir, stats


def sync(name: str) -> None:
  """A barrier across processes (nothing with one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- reading back

def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} is not a flowmap run (no {CONFIG_FILE})")
  return ml_collections.ConfigDict(read_json(path))


def read_spec_json(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, SPEC_FILE)
  return read_json(path) if os.path.exists(path) else None


def read_spec(workdir: str, config=None) -> RunSpec:
  """The spec a workdir's run was trained with (its config.json and normalization.json)."""
  config = config if config is not None else read_config(workdir)
  info = read_spec_json(workdir)
  if info is None:
    raise FileNotFoundError(f"{workdir} is not a flowmap run (no {SPEC_FILE})")
  model_cfg = model_config(config, info["source_shape"], info["target_shape"])
  normalizers = {role: data_lib.Normalizer.from_json(info[f"{role}_normalizer"])
                 for role in ("source", "target")}
  prior = info.get("prior", "linear") if model_cfg.prior else "none"
  linear = mlp = None
  if model_cfg.prior:
    linear = linear_lib.LinearMap.load(os.path.join(workdir, LINEAR_FILE))
  if prior == "mlp" or (model_cfg.prior and os.path.exists(os.path.join(workdir, MLP_FILE))):
    mlp = mlp_lib.MLPRegressor.load(os.path.join(workdir, MLP_FILE))
  return RunSpec(info["source"], info["target"], model_cfg, normalizers, linear, mlp, prior)


def check_compatible(workdir: str, spec: RunSpec) -> None:
  """A workdir's checkpoints serve only a run of the same features, shapes and model: resume,
  --mode eval and --mode map all ask this one question. Silent when the workdir holds no
  run yet."""
  saved = read_spec_json(workdir)
  if saved is None:
    return
  mine = spec.to_json()
  for key in ("source", "target", "source_shape", "target_shape"):
    if saved.get(key) != mine[key]:
      raise ConfigError(f"{workdir} holds a run with data.{key}={saved.get(key)}, but this "
                        f"config gives {mine[key]}; use the run's config or a new --workdir")
  for key, value in mine["model"].items():
    old = saved.get("model", {}).get(key, False if key == "interval" else value)
    if old != value:
      name = "flow.objective=meanflow" if key == "interval" else f"model.{key}"
      raise ConfigError(f"{workdir} holds a run with {name}={old}, but this config "
                        f"gives {value}; use the run's config or a new --workdir")
  old = saved.get("prior", "linear" if saved.get("model", {}).get("prior", True) else "none")
  if mine["prior"] not in ("auto", old):
    raise ConfigError(f"{workdir} holds a run whose model corrects the {old!r} prior, but this "
                      f"config gives model.prior={mine['prior']!r}; use the run's config (or "
                      "auto) or a new --workdir")
  for role in ("source", "target"):
    old = saved.get(f"{role}_normalizer", {}).get("kind")
    new = mine[f"{role}_normalizer"]["kind"]
    if old is not None and old != new:
      raise ConfigError(f"{workdir} holds a run with data.normalize={old!r}, but this "
                        f"config gives {new!r}; use the run's config or a new --workdir")


def same_statistics(a: RunSpec, b: RunSpec) -> bool:
  """Whether two specs normalise every feature alike (to float32 round-off)."""
  for role in ("source", "target"):
    x, y = a.normalizers[role].to_json(), b.normalizers[role].to_json()
    for key in ("mean", "std"):
      if (x[key] is None) != (y[key] is None) or (
          x[key] is not None and not np.allclose(x[key], y[key], rtol=1e-5, atol=1e-7)):
        return False
    if not np.isclose(x["mean_norm"], y["mean_norm"], rtol=1e-5):
      return False
  return True


def resumed_spec(config, workdir: str, spec: RunSpec) -> RunSpec:
  """The spec a resumed run continues with: the stored one, whose statistics its weights
  were trained in. A dataset whose statistics changed (re-extracted under the same names and
  shapes) is refused unless ``data.renormalize`` asks to continue in the new ones."""
  check_compatible(workdir, spec)
  if read_spec_json(workdir) is None:
    return spec
  stored = read_spec(workdir, config)
  if same_statistics(stored, spec):
    return stored
  if config.data.renormalize:
    return spec
  raise ConfigError(
      f"the normalisation statistics of {config.data.source!r}/{config.data.target!r} in this "
      f"dataset differ from those {workdir} was trained in (normalization.json): the data "
      "was re-extracted or changed. Resume on the original dataset, or set "
      "--config.data.renormalize=True to continue in the new statistics")


def write_run_files(workdir: str, config, data_dir: str, spec: RunSpec) -> None:
  """config.json (with data.dir resolved to where the data is) and normalization.json
  (process 0 only)."""
  import jax
  if jax.process_index() != 0:
    return
  record = json.loads(config.to_json_best_effort())
  record["data"]["dir"] = os.path.abspath(data_dir)
  write_json_atomic(os.path.join(workdir, CONFIG_FILE), record)
  write_json_atomic(os.path.join(workdir, SPEC_FILE), spec.to_json())


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_eval(workdir: str, step: int, record: dict) -> str:
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  path = os.path.join(workdir, "eval", f"{step}.json")
  write_json_atomic(path, {"step": int(step), **record})
  return path


# ----------------------------------------------------------------------------- the linear map

def _shard_shares(data_dir: str, split: str, rows: int):
  """(the split's rows, [(first row, shard rows, share)] per shard): ``rows`` shared out in
  proportion to the shards' lengths, the last shard taking what rounding left."""
  info = data_lib.split_info(data_dir, split)
  lengths = list(info.shard_lengths) or [info.num_examples]
  total = sum(lengths)
  shares, start, left = [], 0, rows
  for i, n in enumerate(lengths):
    take = min(n, left if i == len(lengths) - 1 else int(round(rows * n / total)))
    left -= take
    shares.append((start, n, take))
    start += n
  return total, shares


def spread_rows(data_dir: str, split: str, rows: int, seed: int, held_out: int = 0) -> str:
  """A tfds split string of about ``rows`` rows spread over every shard of ``split``: from
  each shard a share proportional to its length, as one run starting at a seeded offset.
  Extraction writes one shard per input tar (often one source of images), so the first rows
  in file order would be one source; reading runs keeps the pass short. ``held_out``: the
  ``train.select_rows`` of the split, whose share at the end of every shard is never
  picked (the rows the network does not train on are not fitted on either)."""
  total, shares = _shard_shares(data_dir, split, rows)
  held = {start: take for start, _, take in _shard_shares(data_dir, split, held_out)[1]} \
      if held_out else {}
  if rows <= 0 or rows >= total - held_out:
    return selection_splits(data_dir, held_out)[0] if held_out else split
  rng = np.random.default_rng([seed, 0x5EED])
  parts = []
  for start, n, take in shares:
    usable = n - held.get(start, 0)
    take = min(take, usable)
    if take > 0:
      offset = start + int(rng.integers(0, usable - take + 1))
      parts.append(f"{split}[{offset}:{offset + take}]")
  return "+".join(parts)


def selection_splits(data_dir: str, rows: int) -> tuple[str, str]:
  """(training split, selection split) for ``train.select_rows``: the last share of every
  shard (proportional to its length) is held out, so the selection rows come from every
  shard (extraction writes one shard per input tar, often one source of images)."""
  total, shares = _shard_shares(data_dir, "train", rows)
  if not 0 < rows < total:
    raise ConfigError(f"train.select_rows={rows} must be below the {total} training rows")
  kept, held = [], []
  for start, n, take in shares:
    if take < n:
      kept.append(f"train[{start}:{start + n - take}]")
    if take:
      held.append(f"train[{start + n - take}:{start + n}]")
  return "+".join(kept), "+".join(held)


def read_selection(workdir: str) -> Optional[dict]:
  """``selection.json``: {"rows", "history": [[step, mse], ...], "step", "mse"} or None."""
  path = os.path.join(workdir, SELECTION_FILE)
  return read_json(path) if os.path.exists(path) else None


def linear_split(config, data_dir: str) -> str:
  """The training rows the prior (the linear map, the MLP) and the baseline ladder are
  fitted on: ``eval.baseline_rows`` of them spread over the split (never the
  ``train.select_rows`` held out of training), or the overfitting subset; no more than
  ``eval.baseline_mb`` of them in their stored dtype (at least 64 rows), which bounds the
  fit's memory and time at patch-token shapes (256 x 1024 on both sides: 1 MiB a row)."""
  rows = int(config.eval.baseline_rows)
  per_row = data_lib.row_bytes(data_lib.load_stats(data_dir),
                               (config.data.source, config.data.target))
  budget = max(64, int(config.eval.baseline_mb * 2 ** 20) // max(per_row, 1))
  rows = min(rows, budget) if rows > 0 else budget
  if config.data.overfit_size:
    rows = min(rows, config.data.overfit_size) if rows > 0 else config.data.overfit_size
    return f"train[:{rows}]"
  return spread_rows(data_dir, "train", rows, config.seed, held_out=config.train.select_rows)


def fit_linear_map(config, data_dir: str, workdir: str) -> linear_lib.LinearMap:
  """The closed-form linear map from source to target, fitted on ``linear_split`` (process
  0) and stored as ``linear_map.npz``; every process then reads the same file. The ridge
  baseline and, where ``fit_prior`` chooses it, the model's prior."""
  import jax
  path = os.path.join(workdir, LINEAR_FILE)
  if jax.process_index() == 0:
    names = (config.data.source, config.data.target)
    batches = ((b[names[0]], b[names[1]]) for b in data_lib.iterate_split(
        data_dir, linear_split(config, data_dir), names, batch_size=64))
    stats = data_lib.load_stats(data_dir)
    fitted = linear_lib.fit(batches, stats["features"][names[0]]["shape"],
                            stats["features"][names[1]]["shape"])
    tmp = f"{path}.tmp.npz"
    fitted.save(tmp)
    os.replace(tmp, path)
  sync("linear-map")
  return linear_lib.LinearMap.load(path)


def fit_mlp(config, data_dir: str, workdir: str) -> mlp_lib.MLPRegressor:
  """The MLP of ``flowmap.mlp`` fitted on ``linear_split`` (process 0; the rows read into
  host memory in their stored dtype, at most ``eval.baseline_mb`` of them) and stored as
  ``prior_mlp.npz``; every process then reads the same file."""
  import jax
  path = os.path.join(workdir, MLP_FILE)
  if jax.process_index() == 0:
    names = (config.data.source, config.data.target)
    rows = data_lib.read_rows(data_dir, linear_split(config, data_dir), names)
    fitted = mlp_lib.fit(rows[names[0]], rows[names[1]], seed=config.seed,
                         steps=config.model.prior_mlp_steps)
    del rows
    tmp = f"{path}.tmp.npz"
    fitted.save(tmp)
    os.replace(tmp, path)
  sync("prior-mlp")
  return mlp_lib.MLPRegressor.load(path)


def fit_prior(config, data_dir: str, workdir: str, spec: RunSpec) -> RunSpec:
  """The spec with its prior fitted and chosen (``model.prior``): the linear map always (it
  is also the ridge baseline); the MLP for ``mlp`` and ``auto``; ``auto`` keeps the MLP when
  its error on the held-out tenth of the fitted rows is below the linear map's (each fitted
  on the other nine tenths; the MLP was also early-stopped on that tenth, a small favour),
  else the linear map. Measured on the synthetic pairs at 2,000 rows the MLP wins on every
  layout; on a real pair whose pooled embeddings no regressor improves on, the map wins."""
  linear = fit_linear_map(config, data_dir, workdir)
  kind, mlp = spec.prior, None
  if linear.rows < mlp_lib.HOLDOUT_EVERY:   # too few rows to hold any out
    if kind == "mlp":
      raise ConfigError(f"model.prior=mlp needs at least {mlp_lib.HOLDOUT_EVERY} training "
                        f"rows to stop the MLP early on; there are {linear.rows}")
    kind = "linear"
  if kind in ("auto", "mlp"):
    mlp = fit_mlp(config, data_dir, workdir)
    if kind == "auto":
      kind = "mlp" if mlp.held_out_mse < linear.held_out_mse else "linear"
  return dataclasses.replace(spec, linear=linear, mlp=mlp, prior=kind)
