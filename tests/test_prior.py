"""model.prior: the estimate of the target the model corrects, fitted before training and
chosen on held-out training rows (flowmap.workdir.fit_prior)."""

import json
import os

import numpy as np
import pytest

from conftest import tiny_config
from flowmap import data, metrics, mlp, train, workdir
from flowmap.config import ConfigError


def _pooled_dataset(path, nonlinear: bool, rows: int = 600):
  """Pooled 1 x 6 -> 1 x 4 rows: the target a saturating function of the source (which an
  MLP fits far better than a linear map) or a linear one plus noise (which it cannot)."""
  rng = np.random.default_rng(0)
  weights = np.random.default_rng(1).normal(size=(6, 4))
  splits = {}
  for split, n in (("train", rows), ("validation", 64)):
    source = rng.normal(size=(n, 1, 6))
    clean = np.tanh(2 * source @ weights) if nonlinear else 0.5 * source @ weights
    target = clean + 0.05 * rng.normal(size=clean.shape)
    splits[split] = [{"key": f"{split}-{i}", "caption": "",
                      "features": {"source_enc": source[i], "target_enc": target[i]}}
                     for i in range(n)]
  data.write_dataset(str(path), splits, {"source_enc": (1, 6), "target_enc": (1, 4)},
                     num_shards=3)
  return str(path)


def _config(data_dir, prior="auto", steps=20):
  c = tiny_config(data_dir, steps=steps)
  c.model.prior = prior
  c.model.prior_mlp_steps = 1500
  return c


@pytest.mark.parametrize("nonlinear,chosen", [(True, "mlp"), (False, "linear")])
def test_auto_keeps_whichever_estimate_is_better_on_held_out_rows(tmp_path, nonlinear,
                                                                    chosen):
  data_dir = _pooled_dataset(tmp_path / "data", nonlinear)
  c = _config(data_dir)
  run = str(tmp_path / "run")
  os.makedirs(run)
  spec = workdir.spec_from_config(c, data.load_stats(data_dir))
  assert spec.prior == "auto" and spec.estimate is None
  fitted = workdir.fit_prior(c, data_dir, run, spec)
  assert fitted.prior == chosen
  assert fitted.estimate is (fitted.mlp if chosen == "mlp" else fitted.linear)
  mlp_error, linear_error = fitted.mlp.held_out_mse, fitted.linear.held_out_mse
  assert (mlp_error < linear_error) == nonlinear, (mlp_error, linear_error)
  if nonlinear:   # the choice is worth it on new rows too
    rows = data.read_rows(data_dir, "validation", ["source_enc", "target_enc"])
    source, target = (np.asarray(rows[n], np.float64) for n in ("source_enc", "target_enc"))
    assert metrics.score(fitted.mlp(source), target)["mse"] < \
        0.5 * metrics.score(fitted.linear(source), target)["mse"]


def test_explicit_choices_and_too_few_rows(tmp_path):
  data_dir = _pooled_dataset(tmp_path / "data", nonlinear=True, rows=40)
  stats = data.load_stats(data_dir)
  run = str(tmp_path / "run")
  os.makedirs(run)
  for prior in ("linear", "mlp"):
    c = _config(data_dir, prior)
    fitted = workdir.fit_prior(c, data_dir, run, workdir.spec_from_config(c, stats))
    assert fitted.prior == prior and (fitted.mlp is None) == (prior == "linear")
  c = _config(data_dir, "none")
  assert workdir.spec_from_config(c, stats).model_cfg.prior is False
  c = _config(data_dir, "mlp")
  c.data.overfit_size = 8   # eight rows: none to hold out, so no MLP to stop early
  with pytest.raises(ConfigError, match="at least 10 training rows"):
    workdir.fit_prior(c, data_dir, run, workdir.spec_from_config(c, stats))
  c.model.prior = "auto"
  assert workdir.fit_prior(c, data_dir, run, workdir.spec_from_config(c, stats)).prior == \
      "linear"


def test_the_prior_and_the_ladder_never_see_the_selection_rows(tmp_path):
  """train.select_rows holds the last share of every shard out of training; the rows the
  prior (and the ladder) are fitted on come from the rest, from every shard."""
  data_dir = _pooled_dataset(tmp_path / "data", nonlinear=True, rows=600)
  c = _config(data_dir)
  c.train.select_rows = 60

  def rows_of(split):
    return {i for part in split.split("+")
            for i in range(*map(int, part[len("train["):-1].split(":")))}
  kept, held = workdir.selection_splits(data_dir, 60)
  for baseline_rows in (100, 300):
    c.eval.baseline_rows = baseline_rows
    fitted = rows_of(workdir.linear_split(c, data_dir))
    assert not fitted & rows_of(held)
    assert abs(len(fitted) - baseline_rows) <= 3
    assert all(fitted & set(range(s, s + 200)) for s in (0, 200, 400))   # every shard
  c.eval.baseline_rows = 2048   # more than the network trains on: all of those
  assert workdir.linear_split(c, data_dir) == kept


def test_a_run_with_the_mlp_prior_starts_at_the_mlp_and_keeps_it(tmp_path):
  """The untrained model's mean is the MLP's estimate (the step-0 selection score is the
  MLP's error on the held-out rows), the choice is recorded with the run and read back by
  a resumed run and the Mapper, and a config asking for another prior is refused."""
  from flowmap import Mapper
  data_dir = _pooled_dataset(tmp_path / "data", nonlinear=True)
  c = _config(data_dir, steps=20)
  c.train.select_rows = 60
  run = str(tmp_path / "run")
  train.train_and_evaluate(c, run)
  with open(os.path.join(run, workdir.SPEC_FILE)) as f:
    assert json.load(f)["prior"] == "mlp"
  fitted = mlp.MLPRegressor.load(os.path.join(run, workdir.MLP_FILE))
  _, held = workdir.selection_splits(data_dir, 60)
  rows = data.read_rows(data_dir, held, ["source_enc", "target_enc"])
  source, target = (np.asarray(rows[n], np.float64) for n in ("source_enc", "target_enc"))
  record = workdir.read_selection(run)
  assert record["history"][0] == [0, pytest.approx(metrics.score(fitted(source),
                                                                 target)["mse"], rel=1e-3)]
  m = Mapper.from_workdir(run)
  assert m.spec.prior == "mlp"
  c.train.steps = 30
  train.train_and_evaluate(c, run)   # resumes with the recorded choice
  assert Mapper.from_workdir(run).step == 30
  c.model.prior = "linear"
  with pytest.raises(ConfigError, match="model.prior"):
    train.train_and_evaluate(c, run)


def test_the_mlp_learns_the_target_where_fitted_to_the_linear_maps_residual_it_overfits():
  """Why the prior is the MLP fitted to the target and not a correction of the linear map:
  on the pooled synthetic pair at 2,000 rows the same MLP fitted to the map's residual ends
  worse than the map alone, fitted from scratch it ends well below it (held-out rows)."""
  from flowmap import linear, synthetic
  task = synthetic.make_task("pooled_to_pooled")
  train_rows, held_out = task.rows(2000, 10), task.rows(512, 11)
  source, target = train_rows[synthetic.SOURCE], train_rows[synthetic.TARGET]
  new_source, new_target = held_out[synthetic.SOURCE], held_out[synthetic.TARGET]
  ridge = linear.fit([(source, target)], source.shape[1:], target.shape[1:])
  error = lambda prediction: float(np.mean((prediction - new_target) ** 2))
  scratch = mlp.fit(source, target, steps=2000)
  residual = mlp.fit(source, target - ridge(source), steps=2000)
  errors = {"ridge": error(ridge(new_source)), "scratch": error(scratch(new_source)),
            "residual": error(ridge(new_source) + residual(new_source))}
  print(errors)
  assert errors["scratch"] < 0.8 * errors["ridge"] < errors["residual"], errors
