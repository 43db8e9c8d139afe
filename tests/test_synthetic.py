"""The synthetic task family: deterministic rows of the shapes each task claims, a true
conditional mean that is one, grid tasks that leave room above the strongest linear map, spread
tasks whose spread the conditional mean does not have, and the written dataset."""

import os

import numpy as np
import pytest

from flowmap import data, linear, metrics, synthetic
from flowmap.synthetic import CONDITIONAL_MEAN, SOURCE, TARGET


@pytest.mark.parametrize("name", synthetic.TASKS)
def test_rows_are_deterministic_and_have_the_claimed_shapes(name):
  task = synthetic.make_task(name)
  rows = task.rows(6, seed=3)
  again = synthetic.make_task(name).rows(6, seed=3)
  other = task.rows(6, seed=4)
  assert rows[SOURCE].shape == (6, *task.source_shape)
  assert rows[TARGET].shape == rows[CONDITIONAL_MEAN].shape == (6, *task.target_shape)
  for key in rows:
    np.testing.assert_array_equal(rows[key], again[key])
    assert not np.allclose(rows[key], other[key])
  assert not np.allclose(rows[SOURCE], synthetic.make_task(name, world_seed=1).rows(6, 3)[SOURCE])
  assert synthetic.TASKS[name]


def test_task_list_and_unknown_name():
  assert set(synthetic.GRID_TASKS) | set(synthetic.SPREAD_TASKS) == set(synthetic.TASKS)
  with pytest.raises(ValueError, match="unknown synthetic task 'grid_8x8'"):
    synthetic.make_task("grid_8x8")


class _Ridge:
  """The closed-form linear map (flowmap.linear) fitted on one set of rows."""

  def __init__(self, rows):
    self.map = linear.fit([(rows[SOURCE], rows[TARGET])], rows[SOURCE].shape[1:],
                          rows[TARGET].shape[1:])

  def predict(self, source):
    return self.map(np.asarray(source, np.float64))


def _fit_ridge(rows):
  return _Ridge(rows)


@pytest.mark.parametrize("name", synthetic.TASKS)
def test_conditional_mean_is_the_best_function_of_the_source(name):
  """For any function f of the source, E||f - y||^2 = E||f - m||^2 + E||m - y||^2 when
  m = E[y | source]: checked with the ridge map, fitted on other rows."""
  task = synthetic.make_task(name)
  ridge = _fit_ridge(task.rows(500, seed=0))
  rows = task.rows(1000, seed=1)
  pred, mean, target = ridge.predict(rows[SOURCE]), rows[CONDITIONAL_MEAN], rows[TARGET]
  direct = np.mean((pred - target) ** 2)
  split = np.mean((pred - mean) ** 2) + np.mean((mean - target) ** 2)
  assert direct == pytest.approx(split, rel=0.01)


@pytest.mark.parametrize("name", synthetic.GRID_TASKS)
def test_grid_tasks_leave_room_above_the_strongest_linear_map(name):
  """The noise is small (the true conditional mean explains > 99% of the variance) and the
  ridge on [resampled source, pooled source] leaves at least 5x its squared error."""
  task = synthetic.make_task(name)
  ridge = _fit_ridge(task.rows(1000, seed=0))
  rows = task.rows(512, seed=1)
  truth = metrics.score(rows[CONDITIONAL_MEAN], rows[TARGET])
  linear = metrics.score(ridge.predict(rows[SOURCE]), rows[TARGET])
  np.testing.assert_allclose(np.std(rows[TARGET] - rows[CONDITIONAL_MEAN]),
                             synthetic.TARGET_NOISE, rtol=0.05)
  assert truth["r2"] > 0.99
  assert linear["mse"] > 5 * truth["mse"]
  assert linear["r2"] < truth["r2"] - 0.04
  assert linear["cosine_token"] < truth["cosine_token"] - 0.01


@pytest.mark.parametrize("name", synthetic.SPREAD_TASKS)
def test_spread_is_along_the_directions_and_only_there(name):
  """Along the spread directions the conditional mean keeps ~0 of the variance and a second
  draw from the true conditional ~1; off them the target is the mean plus the small noise."""
  task = synthetic.make_task(name)
  directions = task.directions
  flat = directions.reshape(len(directions), -1)
  np.testing.assert_allclose(flat @ flat.T, np.eye(len(directions)), atol=1e-12)
  z = task.latents(2000, seed=5)
  first, second = task.target(z, seed=5), task.target(z, seed=6)
  mean = task.conditional_mean(z)
  assert np.nanmax(metrics.variance_ratio(mean, first, directions)) < 0.01
  ratio = metrics.variance_ratio(second, first, directions)
  assert 0.85 < np.nanmin(ratio) and np.nanmax(ratio) < 1.15
  spread = first - mean
  along = metrics._projections(spread, directions)
  np.testing.assert_allclose(along.mean(0), 0, atol=0.15)
  np.testing.assert_allclose(along.var(0) / along.var(0).mean(), 1, atol=0.15)
  if directions.ndim == 3:
    off = spread - np.tensordot(along, directions, axes=1)
  else:
    off = spread - along @ directions
  np.testing.assert_allclose(off.std(), synthetic.TARGET_NOISE, rtol=0.05)


def test_spread_modes_are_discrete():
  task = synthetic.make_task("spread_modes")
  coefficients = task.spread_coefficients(400, seed=0)
  assert len(np.unique(coefficients.round(9), axis=0)) == synthetic.MODES


def test_written_task_matches_the_regenerated_rows(tmp_path):
  out = str(tmp_path / "task")
  info = synthetic.write_task(out, "spread_shared_mapped", train_size=20, validation_size=10,
                              seed=2)
  assert info == synthetic.read_task(out)
  assert info["source_shape"] == [16, 32] and info["target_shape"] == [16, 32]
  task = synthetic.make_task("spread_shared_mapped")
  np.testing.assert_array_equal(synthetic.spread_directions(info), task.directions)
  stored = data.load_features(out, "validation")
  rows = synthetic.task_rows(info, "validation")
  for name in (SOURCE, TARGET):
    np.testing.assert_allclose(stored[name], rows[name], rtol=2e-3, atol=2e-3)
  assert data.split_size(out, "train") == 20
  stamp = os.path.getmtime(os.path.join(out, "stats.json"))
  assert synthetic.write_task(out, "spread_shared_mapped", 20, 10, seed=2) == info
  assert os.path.getmtime(os.path.join(out, "stats.json")) == stamp
  with pytest.raises(ValueError, match="already holds a different dataset"):
    synthetic.write_task(out, "spread_shared_mapped", 40, 10, seed=2)
  assert synthetic.spread_directions({"spread_directions": None}) is None


def test_quality_table_puts_each_figure_under_its_output_and_marks_what_is_missing():
  from flowmap import quality
  row = {"task": "grid_to_pooled", "rows": 2000, "eval/mean/cosine_token": 0.95,
         "baseline/ridge_cosine_token": 0.9, "eval/sample/mse": 0.2,
         "eval/selected/mean/mse": 0.1, "select/step": 300}
  lines = quality.table([row]).splitlines()
  head = [c.strip() for c in lines[0].strip("|").split("|")]
  cells = [c.strip() for c in lines[2].strip("|").split("|")]
  assert len(head) == len(cells) == 3 + len(quality.FIGURES) * len(quality.COLUMNS)
  got = dict(zip(head, cells))
  assert got["task"] == "grid_to_pooled" and got["train rows"] == "2,000"
  assert got["flowmap mean cosine_token"] == "0.9500"
  assert got["ridge cosine_token"] == "0.9000"
  assert got["flowmap sample mse"] == "0.2000" and got["mlp mse"] == "-"
  assert got["flowmap selected mean mse"] == "0.1000" and got["selected step"] == "300"


def test_spread_rows_get_the_distribution_table_and_task_groups_expand():
  from absl import app
  from flowmap import quality
  rows = [{"task": "grid_equal", "rows": 2000, "eval/mean/mse": 0.1},
          {"task": "spread_sphere", "rows": 2000, "eval/sample/variance_ratio_along": 1.02,
           "baseline/ridge_variance_ratio_along": 0.016, "eval/mean/fd_pooled": 1.66}]
  lines = quality.spread_table(rows).splitlines()
  assert len(lines) == 3   # the grid task has no spread directions: not in this table
  got = dict(zip([c.strip() for c in lines[0].strip("|").split("|")],
                 [c.strip() for c in lines[2].strip("|").split("|")]))
  assert got["task"] == "spread_sphere" and "selected step" not in got
  assert got["flowmap sample variance_ratio_along"] == "1.0200"
  assert got["ridge variance_ratio_along"] == "0.0160"
  assert got["flowmap mean fd_pooled"] == "1.6600" and got["mlp fd_pooled"] == "-"
  assert quality.spread_table(rows[:1]) == ""
  assert quality.resolve_tasks([]) == list(synthetic.GRID_TASKS)
  assert quality.resolve_tasks(["spread", "grid_equal", "spread_modes"]) == [
      *synthetic.SPREAD_TASKS, "grid_equal"]
  with pytest.raises(app.UsageError, match="grid_equl"):
    quality.resolve_tasks(["grid_equl"])


def test_demo_target_scale_multiplies_the_targets_and_nothing_else():
  a = synthetic.PairedEncoders().pairs(8, seed=3)
  b = synthetic.PairedEncoders(target_scale=20.0).pairs(8, seed=3)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_allclose(b[1], 20.0 * a[1], rtol=1e-12)
