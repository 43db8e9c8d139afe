"""What flowmap's samples are worth where the target is genuinely spread: a synthetic task
whose target moves, per image, by a point on a sphere of directions the source does not show
(``spread_sphere`` of flowmap/synthetic.py). Every regressor collapses that spread to the
centre; the samples have to keep it, and a MeanFlow model's in one model evaluation, where a
flow model's one evaluation is its mean."""

import pytest


@pytest.fixture(scope="module")
def sphere(tmp_path_factory):
  from flowmap import synthetic
  data_dir = str(tmp_path_factory.mktemp("sphere") / "data")
  synthetic.write_task(data_dir, "spread_sphere", train_size=2000, validation_size=512)
  return data_dir


def _train(data_dir, workdir, objective: str, evaluations: int):
  """The quality table's config, shortened to 300 steps; returns (the final evaluation,
  {model evaluations: the EMA weights' sample figures} at 1 and 2 Euler evaluations)."""
  from flowmap import evaluate, synthetic, train
  from configs import quality
  c = quality.get_config()
  c.data.dir, c.data.source, c.data.target = data_dir, synthetic.SOURCE, synthetic.TARGET
  c.flow.objective = objective
  c.train.steps = 300
  c.train.eval_every = c.train.checkpoint_every = 300
  c.train.select_rows = 0
  c.eval.steps = evaluations
  c.eval.baselines = ()     # the mean target and ridge
  r = train.train_and_evaluate(c, workdir)
  spec, data_dir, graphdef, mesh, weights = evaluate.restore(c, workdir)
  evaluator = evaluate.make_evaluator(c, workdir, data_dir, spec, graphdef, mesh)
  few = {n: evaluator.evaluate(weights.ema, "euler", n, 1.0, "sample") for n in (1, 2)}
  return r, few


def _along(r):
  return {k: round(r[k], 4) for k in r if k.endswith(("variance_ratio_along", "fd_pooled"))
          and not k.startswith("eval/raw_")}


@pytest.mark.slow
def test_samples_keep_a_sphere_of_directions_that_every_regressor_collapses(sphere, tmp_path):
  """The flow objective, 8 Euler evaluations (measured here: a variance ratio along the
  sphere of 0.97, 0.93 at 2 evaluations); its one-evaluation output is an estimate of its
  mean, pulled to the centre (0.39 here; the mean mode's 4 draws averaged, 0.14)."""
  r, few = _train(sphere, str(tmp_path / "run"), "flow", 8)
  print(_along(r), {n: _along(f) for n, f in few.items()})
  assert 0.85 <= r["eval/sample/variance_ratio_along"] <= 1.15, _along(r)
  assert r["eval/mean/variance_ratio_along"] < 0.3, _along(r)    # a mean, as it should be
  assert r["baseline/ridge_variance_ratio_along"] < 0.1, _along(r)
  assert r["eval/sample/fd_pooled"] < 0.25 * min(r["eval/mean/fd_pooled"],
                                                  r["baseline/ridge_fd_pooled"]), _along(r)
  assert few[1]["variance_ratio_along"] < 0.5, few[1]


@pytest.mark.slow
def test_meanflow_samples_keep_the_sphere_in_one_evaluation(sphere, tmp_path):
  """flow.objective=meanflow: one average-velocity step from the noise is a sample that
  keeps the sphere (0.92 along it here), at a pooled Frechet distance far below the mean's
  and ridge's, where the flow objective's one evaluation is pulled to the centre (the test
  above). At 300 steps its 2-evaluation samples still overshoot the spread (1.37 here); the
  1000-step run of the README measured 0.93 at 1 and 0.99 at 2 evaluations."""
  r, few = _train(sphere, str(tmp_path / "run"), "meanflow", 1)
  print(_along(r), {n: _along(f) for n, f in few.items()})
  assert 0.85 <= few[1]["variance_ratio_along"] <= 1.15, few[1]
  assert few[1]["fd_pooled"] < 0.25 * min(r["eval/mean/fd_pooled"],
                                          r["baseline/ridge_fd_pooled"]), few[1]
