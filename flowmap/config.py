"""Errors, and every check of a configuration and of a dataset against it.

The lowest module of flowmap: it imports nothing of the project, so every other module (data,
train, evaluate, the mapper, the benchmark) can raise and check the same way. A problem found
here stops a run before any work, with one line and exit code 2 (main.py).
"""

from __future__ import annotations

from typing import Optional


class ConfigError(ValueError):
  """A configuration, or a dataset that does not fit it; reported before any work."""


class DataError(ConfigError):
  """A dataset that is missing, incomplete, or does not fit what was asked of it."""


class NonFiniteError(RuntimeError):
  """The loss or the gradient stopped being finite."""


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint."""


NORMALIZATIONS = ("standardize", "l2", "unit", "none")
SOLVERS = ("euler", "heun")
TIME_SAMPLINGS = ("uniform", "logit_normal", "shifted")
DTYPES = ("auto", "float32", "bfloat16", "float16")   # auto: flowmap.platform.resolve_dtype
MODES = ("sample", "mean")
OBJECTIVES = ("flow", "regression", "meanflow")
PRIORS = ("auto", "linear", "mlp", "none")   # the estimate the model corrects (model.prior)
BASELINES = ("procrustes", "mlp")   # optional rungs next to the mean target and the ridge


def validate(config, sizes, remat_policies, attentions) -> None:
  """Every value check of a config; all problems in one ConfigError.

  ``sizes``, ``remat_policies`` and ``attentions`` are the model's named sizes, remat
  policies and attention kernels (passed in, so that this module stays below the model)."""
  c = config
  problems = []
  if c.train.steps <= 0:
    problems.append(f"train.steps must be positive, got {c.train.steps}")
  if c.train.lr <= 0:
    problems.append(f"train.lr must be positive, got {c.train.lr}")
  if c.train.batch_size <= 0:
    problems.append(f"train.batch_size must be positive, got {c.train.batch_size}")
  if c.train.grad_accum < 1 or c.train.batch_size % c.train.grad_accum:
    problems.append(f"train.batch_size {c.train.batch_size} must split into "
                    f"train.grad_accum={c.train.grad_accum} equal micro-batches")
  for key in ("log_every", "eval_every", "checkpoint_every"):
    if c.train[key] <= 0:
      problems.append(f"train.{key} must be positive, got {c.train[key]}")
  if c.data.normalize not in NORMALIZATIONS:
    problems.append(f"data.normalize must be one of {NORMALIZATIONS}, "
                    f"got {c.data.normalize!r}")
  if c.eval.solver not in SOLVERS:
    problems.append(f"eval.solver must be one of {SOLVERS}, got {c.eval.solver!r}")
  elif c.eval.solver == "heun" and c.eval.steps % 2:
    problems.append(f"eval.steps counts model evaluations; heun needs an even number, "
                    f"got {c.eval.steps}")
  if c.eval.steps < 1:
    problems.append(f"eval.steps must be >= 1, got {c.eval.steps}")
  if c.eval.mode not in MODES:
    problems.append(f"eval.mode must be one of {MODES}, got {c.eval.mode!r}")
  if c.map.mode not in MODES:
    problems.append(f"map.mode must be one of {MODES}, got {c.map.mode!r}")
  unknown = sorted(set(c.eval.baselines) - set(BASELINES))
  if unknown:
    problems.append(f"eval.baselines may name {BASELINES}, got {unknown}")
  if c.eval.mean_draws < 1:
    problems.append(f"eval.mean_draws must be >= 1, got {c.eval.mean_draws}")
  if c.eval.num_samples < 2:
    problems.append(f"eval.num_samples must be >= 2 (the energy score compares samples), "
                    f"got {c.eval.num_samples}")
  if c.train.select_rows < 0:
    problems.append(f"train.select_rows must be >= 0, got {c.train.select_rows}")
  elif c.train.select_rows and c.data.overfit_size:
    problems.append("train.select_rows holds training rows out; it does not combine with "
                    "data.overfit_size")
  if c.eval.baseline_mb <= 0:
    problems.append(f"eval.baseline_mb must be positive, got {c.eval.baseline_mb}")
  if c.eval.batch_size <= 0:
    problems.append(f"eval.batch_size must be positive, got {c.eval.batch_size}")
  if not 0.0 <= c.flow.mean_fraction < 1.0:
    problems.append(f"flow.mean_fraction must be in [0, 1), got {c.flow.mean_fraction}")
  if not 0.0 <= c.flow.cond_dropout < 1.0:
    problems.append(f"flow.cond_dropout must be in [0, 1), got {c.flow.cond_dropout}")
  if not 0.0 <= c.train.ema_decay < 1.0:
    problems.append(f"train.ema_decay must be in [0, 1), got {c.train.ema_decay}")
  if c.eval.guidance != 1.0 and c.flow.cond_dropout == 0.0:
    problems.append(f"eval.guidance={c.eval.guidance} needs the unconditional velocity, which "
                    "a run learns only with flow.cond_dropout > 0; set eval.guidance=1")
  if c.flow.objective not in OBJECTIVES:
    problems.append(f"flow.objective must be one of {OBJECTIVES}, got {c.flow.objective!r}")
  if c.flow.objective == "meanflow":
    if c.eval.solver != "euler":
      problems.append("flow.objective=meanflow samples with average-velocity Euler steps: set "
                      f"eval.solver=euler (got {c.eval.solver!r})")
    if c.eval.guidance != 1.0:
      problems.append("flow.objective=meanflow does not do classifier-free guidance yet: set "
                      "eval.guidance=1")
    if not 0.0 <= c.flow.get("interval_fraction", 0.25) <= 1.0:
      problems.append(f"flow.interval_fraction must be in [0, 1], got "
                      f"{c.flow.interval_fraction}")
  if c.flow.time_sampling not in TIME_SAMPLINGS:
    problems.append(f"flow.time_sampling must be one of {TIME_SAMPLINGS}")
  if c.model.size not in sizes:
    problems.append(f"model.size must be one of {list(sizes)}, got {c.model.size!r}")
  if c.model.remat not in remat_policies:
    problems.append(f"model.remat must be one of {list(remat_policies)}")
  if c.model.prior not in PRIORS:
    problems.append(f"model.prior must be one of {PRIORS}, got {c.model.prior!r}")
  if c.model.prior_mlp_steps < 100:
    problems.append(f"model.prior_mlp_steps must be >= 100 (the MLP is checked every 100 "
                    f"steps), got {c.model.prior_mlp_steps}")
  if c.model.dtype not in DTYPES:
    problems.append(f"model.dtype must be one of {DTYPES}, got {c.model.dtype!r}")
  if not c.data.source or not c.data.target:
    problems.append("data.source and data.target must name stored features")
  for role in ("source", "target"):
    try:
      shape_or_none(c.data[f"{role}_shape"])
    except ConfigError as e:
      problems.append(f"data.{role}_shape: {e}")
  if c.model.attention not in attentions:
    problems.append(f"model.attention must be one of {list(attentions)}, got "
                    f"{c.model.attention!r}")
  if problems:
    raise ConfigError("; ".join(problems))


def shape_or_none(value) -> Optional[tuple[int, int]]:
  """A (tokens, dim) shape from the config, or None when unset. On the command line
  ``--config.data.source_shape=None`` unsets it (ml_collections turns that into (None,))."""
  if value is None or (isinstance(value, (tuple, list)) and all(v is None for v in value)):
    return None
  try:
    shape = tuple(int(v) for v in value)
  except (TypeError, ValueError):
    shape = ()
  if len(shape) != 2 or min(shape) < 1:
    raise ConfigError(f"a shape is (tokens, dim), two positive integers, or None; got {value!r}")
  return shape


def check_dataset(config, data_dir: str, shapes: dict) -> None:
  """The named features exist in the dataset (``shapes``: name -> (tokens, dim)) and have
  the shapes the config gives, where it gives them."""
  for role in ("source", "target"):
    name = config.data[role]
    if name not in shapes:
      raise DataError(f"{data_dir}: feature {name!r} is not in the dataset; it holds "
                      f"{sorted(shapes)}")
    wanted = shape_or_none(config.data[f"{role}_shape"])
    if wanted is not None and wanted != tuple(shapes[name]):
      raise ConfigError(f"data.{role}_shape is {wanted} but feature {name!r} in "
                        f"{data_dir} has shape {tuple(shapes[name])}")
