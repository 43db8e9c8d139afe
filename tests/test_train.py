"""The training loop: learning, resuming, and refusing bad configurations."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import run_main, tiny_config
from flowmap import train


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_loss_falls_and_workdir_has_everything(tmp_path, demo_data):
  c = tiny_config(demo_data, steps=60)
  c.model.prior = "none"   # from scratch: a loss that falls fast in a few steps (with
  c.train.lr = 3e-3              # the prior the untrained model already is the linear map)
  c.train.eval_every = 30
  c.train.checkpoint_every = 30
  results = train.train_and_evaluate(c, str(tmp_path))
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert losses[-1] < 0.7 * losses[0]
  for key in ("train/grad_norm", "train/param_norm", "train/update_ratio",
              "train/velocity_cosine", "train/grad_norm_block00", "train/loss_t00_25",
              "perf/samples_per_s"):
    assert any(key in r for r in rows), key
  evals = [r for r in rows if "eval/cosine_token" in r]
  assert [r["step"] for r in evals] == [30, 60]
  assert results["eval/cosine_token"] == evals[-1]["eval/cosine_token"]
  assert 0.0 < results["eval/cosine_token"] <= 1.0
  assert set(results) >= {"eval/cosine_token", "eval/cosine_global", "eval/mse",
                          "eval/recall_at_1", "eval/velocity_cosine"}
  assert (tmp_path / "eval" / "60.json").exists()
  assert (tmp_path / "plots" / "training.png").exists()
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["train"]["steps"] == 60
  assert sorted(os.listdir(tmp_path / "checkpoints")) >= ["30", "60"]


def test_same_command_again_resumes_and_finishes(tmp_path, demo_data, capsys):
  c = tiny_config(demo_data, steps=10)
  c.train.checkpoint_every = 5
  train.train_and_evaluate(c, str(tmp_path))
  # 256 rows and no train.select_rows: one line suggests it, with a tenth of the rows.
  out = capsys.readouterr().out
  assert "note: 256 training rows" in out and "train.select_rows=25 " in out, out
  c.train.steps = 15
  train.train_and_evaluate(c, str(tmp_path))
  steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
  assert steps == [5, 10, 15]   # resumed at 10, nothing trained twice
  assert "15" in os.listdir(tmp_path / "checkpoints")


def test_resuming_restores_into_shapes_without_building_a_fresh_state(tmp_path, demo_data,
                                                                      monkeypatch):
  built = []
  real = train.setup

  def setup(*args, **kwargs):
    run = real(*args, **kwargs)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(run.abstract_state))
    init = run.init
    run.init = lambda: built.append(1) or init()
    return run
  monkeypatch.setattr(train, "setup", setup)
  c = tiny_config(demo_data, steps=2)
  train.train_and_evaluate(c, str(tmp_path))
  assert built == [1]   # a new run builds its state once
  c.train.steps = 3
  train.train_and_evaluate(c, str(tmp_path))
  assert built == [1]   # the resumed run restored into shapes: no second, fresh state


@pytest.mark.parametrize("override,message", [
    ("--config.train.no_such_key=1", "no_such_key"),
    ("--config.train.lr=-1", "train.lr must be positive"),
    ("--config.data.normalize=zscore", "data.normalize"),
    ("--config.data.target_shape=(9,9)", "target_shape"),
    ("--config.data.dir=/nonexistent/features", "does not exist"),
    ("--config.data.target=clip", "'clip' is not in the dataset"),
    ("--config.train.select_rows=256", "must be below the 256 training rows"),
])
def test_bad_config_or_data_exits_2_with_one_line(tmp_path, demo_data, override, message):
  result = run_main(["--workdir", str(tmp_path / "w"), f"--config.data.dir={demo_data}",
                     override], timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("flowmap: error:")]
  assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_train_velocity_cosine_leaves_out_rows_whose_source_was_dropped():
  """train/velocity_cosine averages the conditioned rows only: a dropped row is trained
  towards another (the unconditional) velocity."""
  import jax.numpy as jnp
  from flowmap import flow, model as model_lib, sampling, sharding
  c = tiny_config()
  c.flow.cond_dropout = 0.5
  c.model.prior = "none"   # model-space batches, no fitted prior
  model_cfg = model_lib.config_from(c.model, (16, 48), (16, 32))
  tx = train.make_optimizer(c)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  graphdef, state, _ = train.create_state(model_cfg, tx, 0, mesh)
  leaves, tree = jax.tree.flatten(state["params"])   # off the zero init: a real velocity
  keys = jax.random.split(jax.random.key(1), len(leaves))
  state["params"] = jax.tree.unflatten(
      tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  rng = np.random.default_rng(0)
  batch = {"source": jnp.asarray(rng.normal(size=(16, 16, 48)), jnp.float32),
           "target": jnp.asarray(rng.normal(size=(16, 16, 32)), jnp.float32)}
  key = jax.random.fold_in(jax.random.key(c.seed), state["step"])
  t, _, noise, drop = train._per_example(key, batch["target"], c)
  assert 0 < int(drop.sum()) < 16
  pred = sampling.make_velocity(graphdef)(state["params"], flow.interpolate(
      noise, batch["target"], t), t, batch["source"], drop)
  true = flow.target_velocity(noise, batch["target"])
  cos = np.asarray(jnp.sum(pred * true, (1, 2)) / (
      jnp.linalg.norm(pred.reshape(16, -1), axis=1) * jnp.linalg.norm(true.reshape(16, -1),
                                                                      axis=1)))
  _, metrics = jax.jit(train.make_train_step(c, graphdef, tx))(state, batch)
  kept = ~np.asarray(drop)
  assert float(metrics["velocity_cosine"]) == pytest.approx(cos[kept].mean(), abs=1e-5)
  assert abs(cos[kept].mean() - cos.mean()) > 1e-4   # the mask changes the figure


def test_regression_objective_trains_the_same_network_to_one_output(tmp_path, demo_data):
  """flow.objective=regression: the Next-DiT fitted to the target with MSE, the equal-capacity
  baseline; sample and mean are the same prediction, whatever the seed."""
  from flowmap import Mapper
  c = tiny_config(demo_data, steps=40)
  c.flow.objective = "regression"
  c.model.prior = "none"   # the whole target, not a fitted estimate's residual
  c.train.lr = 3e-3
  results = train.train_and_evaluate(c, str(tmp_path))
  rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
  assert rows[-1]["train/loss"] < 0.7 * rows[0]["train/loss"]
  for k in ("cosine_token", "mse"):
    assert results[f"eval/sample/{k}"] == pytest.approx(results[f"eval/mean/{k}"], abs=1e-6)
  assert results["eval/cosine_token"] > results["baseline/mean_cosine_token"]
  m = Mapper.from_workdir(str(tmp_path))
  x = np.random.default_rng(0).normal(size=(3, 16, 48)).astype(np.float32)
  np.testing.assert_array_equal(m.map(x, seed=1), m.map(x, seed=2))


def test_meanflow_objective_trains_and_samples_in_n_evaluations(tmp_path, demo_data):
  """flow.objective=meanflow: the model gets the interval input, the step computes the
  MeanFlow target with jax.jvp (the custom-VJP kernels swapped for plain ones there), the
  loss falls, and the Mapper samples with N average-velocity Euler steps (N evaluations);
  Heun and guidance are refused with one clear message."""
  from flowmap import Mapper
  from flowmap.config import ConfigError
  c = tiny_config(demo_data, steps=20)
  c.flow.objective = "meanflow"
  c.eval.solver, c.eval.steps = "euler", 2
  results = train.train_and_evaluate(c, str(tmp_path))
  rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
  assert rows and all(np.isfinite(r["train/loss"]) for r in rows)
  # The linear prior's exact average velocity: from the start, two evaluations give samples
  # with the spread of the truth (about twice the mean's squared error), not a mean.
  ratio = results["eval/sample/mse"] / results["eval/mean/mse"]
  assert 1.6 < ratio < 2.6, ratio
  assert results["eval/mean/cosine_token"] > results["baseline/ridge_cosine_token"] - 0.01
  m = Mapper.from_workdir(str(tmp_path))
  assert m.model_cfg.interval
  params = jax.tree.leaves(m.params)
  assert len(params) > 0
  x = np.random.default_rng(0).normal(size=(3, 16, 48)).astype(np.float32)
  one, two = m.map(x, steps=1), m.map(x, steps=2)
  assert np.isfinite(one).all() and not np.allclose(one, two)
  with pytest.raises(ValueError, match="Euler"):
    m.map(x, steps=2, solver="heun")
  bad = c.copy_and_resolve_references()
  bad.eval.solver = "heun"
  with pytest.raises(ConfigError, match="eval.solver=euler"):
    train.setup(bad, str(tmp_path / "other"))


def test_select_rows_keeps_the_best_mean_from_the_linear_map_on(tmp_path, demo_data):
  """train.select_rows: rows held out of training score the mean at step 0 (the untrained
  model is the linear map, so its score is the map's) and at every evaluation; the best EMA
  weights are kept and load in the Mapper."""
  from flowmap import Mapper, data, linear, metrics, workdir
  c = tiny_config(demo_data, steps=40)
  c.train.select_rows = 64
  c.train.eval_every = 20
  results = train.train_and_evaluate(c, str(tmp_path))
  kept, held = workdir.selection_splits(demo_data, 64)
  assert data.split_info(demo_data, held).num_examples == 64
  assert data.split_info(demo_data, kept).num_examples == 256 - 64
  record = workdir.read_selection(str(tmp_path))
  assert [s for s, _ in record["history"]] == [0, 20, 40]
  best_step, best_mse = min(record["history"], key=lambda h: h[1])
  assert (record["step"], record["mse"]) == (best_step, best_mse)
  rows = data.read_rows(demo_data, held, [c.data.source, c.data.target])
  source, target = (np.asarray(rows[n], np.float64) for n in (c.data.source, c.data.target))
  ridge = linear.LinearMap.load(str(tmp_path / workdir.LINEAR_FILE))
  assert record["history"][0][1] == pytest.approx(metrics.score(ridge(source), target)["mse"],
                                                  rel=1e-4)
  assert results["select/step"] == best_step
  assert {"eval/selected/mean/mse", "eval/selected/sample/mse"} <= set(results)
  m = Mapper.from_workdir(str(tmp_path), selected=True)
  assert m.step == best_step
  mapped = m.map(source.astype(np.float32), mode="mean")
  assert metrics.score(mapped, target)["mse"] == pytest.approx(best_mse, rel=0.05)
  again = train.train_and_evaluate(c, str(tmp_path))   # finished: re-evaluates, keeps the choice
  assert again["select/step"] == best_step
  assert again["eval/selected/mean/mse"] == pytest.approx(results["eval/selected/mean/mse"])
