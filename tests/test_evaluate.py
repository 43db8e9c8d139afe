"""Evaluation: the samplers against diffrax, metrics and baselines on known answers, figures
that do not depend on batching, --mode eval end to end, and the training-time monitoring."""

import glob
import json
import os
import shutil

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_main
from flowmap import baselines, data, evaluate, flow, metrics, plots, sampling, workdir
from flowmap.config import ConfigError

SWEEP = (1, 2, 4, 8, 16, 32, 50)


# ----------------------------------------------------------------------------- samplers

def _curved_field(x, t):
  """A nonlinear, time-dependent velocity field; t is a per-row vector as in flow.sample."""
  a = jnp.linspace(-1.0, 1.0, x.shape[-1] ** 2).reshape(x.shape[-1], x.shape[-1])
  return jnp.tanh(x @ a) * (1.0 + t[:, None]) + jnp.cos(3.0 * t)[:, None]


def _diffrax_solve(velocity, x0, solver, steps=None, rtol=None):
  term = diffrax.ODETerm(lambda t, y, args: velocity(y, jnp.full((y.shape[0],), t)))
  if steps is not None:
    controller = diffrax.StepTo(ts=jnp.linspace(0.0, 1.0, steps + 1))
    dt0 = None
  else:
    controller = diffrax.PIDController(rtol=rtol, atol=rtol)
    dt0 = 0.01
  sol = diffrax.diffeqsolve(term, solver, t0=0.0, t1=1.0, dt0=dt0, y0=x0,
                            stepsize_controller=controller, max_steps=100_000)
  return sol.ys[-1]


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_euler_and_heun_equal_diffrax_on_the_same_grid(steps):
  x0 = jax.random.normal(jax.random.key(0), (3, 5))
  for solver, reference in (("euler", diffrax.Euler()), ("heun", diffrax.Heun())):
    ours = flow.sample(_curved_field, x0, steps, solver)
    np.testing.assert_allclose(ours, _diffrax_solve(_curved_field, x0, reference, steps),
                               atol=1e-5, err_msg=solver)


def test_heun_approaches_tsit5_reference_at_second_order():
  x0 = jax.random.normal(jax.random.key(1), (3, 5))
  exact = _diffrax_solve(_curved_field, x0, diffrax.Tsit5(), rtol=1e-7)
  err = {s: [float(jnp.abs(flow.sample(_curved_field, x0, n, s) - exact).max())
             for n in (2, 4, 8, 16, 32, 64)] for s in flow.SOLVERS}
  heun, euler = err["heun"], err["euler"]
  assert all(3.5 < a / b < 4.5 for a, b in zip(heun, heun[1:])), heun     # second order
  assert all(1.7 < a / b < 2.5 for a, b in zip(euler, euler[1:])), euler  # first order
  assert heun[-1] < 2e-4 and heun[-1] < euler[-1] / 50


@pytest.mark.parametrize("guidance,solvers", [(1.0, ("euler", "heun")), (2.5, ("heun",))])
def test_model_sampler_integrates_the_model_ode_like_diffrax(small_run, guidance, solvers):
  """The sampler Mapper and Evaluator use, with the trained model (trained with condition
  dropout, so guidance has a learned unconditional velocity): its noise, time direction and
  guidance give the ODE that diffrax integrates from the same noise, and one program serves
  every step count."""
  from flowmap import Mapper
  m = Mapper.from_workdir(small_run["workdir"])
  graphdef, params, shape = m.graphdef, m.params, m.target_shape
  raw = np.random.default_rng(3).normal(size=(5, *m.source_shape)).astype(np.float32)
  condition = m.spec.condition(raw)
  rows = jnp.arange(10, 15)
  velocity = sampling.make_velocity(graphdef)

  @jax.jit
  def field(x, t):
    keep = jnp.zeros((x.shape[0],), bool)
    cond = velocity(params, x, t, condition, keep)
    if guidance == 1.0:
      return cond
    uncond = velocity(params, x, t, condition, ~keep)
    return uncond + guidance * (cond - uncond)

  x0 = sampling.noise_for_rows(11, rows, shape)
  # Two programs of the same sum: in bfloat16 (model.dtype=auto on CPUs with native
  # bfloat16) their fusions round the network's outputs differently (an ulp is 0.4% of a
  # value; guidance 2.5 amplifies it: up to 7.5e-3 seen on features of scale 1). A wrong
  # noise, time direction or guidance would be off by O(1).
  tolerance = 1e-4 if m.dtype == "float32" else 1e-2
  for solver in solvers:
    sampler = sampling.make_row_sampler(graphdef, shape, solver, guidance)
    for evaluations in (4, 8):
      steps = flow.steps_for_evaluations(solver, evaluations)
      ours = sampler(params, condition, rows, 11, np.int32(steps))
      reference = {"euler": diffrax.Euler(), "heun": diffrax.Heun()}[solver]
      np.testing.assert_allclose(ours, _diffrax_solve(field, x0, reference, steps),
                                 atol=tolerance, rtol=tolerance, err_msg=solver)
    assert sampler._cache_size() == 1


def test_the_unconditional_velocity_was_learned(small_run):
  """Condition dropout trains the unconditional branch that guidance uses: with every
  row's source dropped, the one-step estimates no longer depend on the source and land near
  the mean target (the untrained branch would return the noise itself)."""
  from flowmap import Mapper
  m = Mapper.from_workdir(small_run["workdir"])
  rng = np.random.default_rng(4)
  condition = m.spec.condition(rng.normal(size=(64, *m.source_shape)).astype(np.float32))
  other = m.spec.condition(rng.normal(size=(64, *m.source_shape)).astype(np.float32))
  velocity = jax.jit(sampling.make_velocity(m.graphdef))
  x0 = sampling.noise_for_rows(0, jnp.arange(64), m.target_shape)
  t, dropped = jnp.zeros(64), jnp.ones(64, bool)
  estimate = x0 + velocity(m.params, x0, t, condition, dropped)
  np.testing.assert_allclose(estimate, x0 + velocity(m.params, x0, t, other, dropped),
                             atol=1e-5)
  # In the normalised space the mean target is about zero and the noise has unit scale.
  assert float(jnp.mean(estimate ** 2)) < 0.5 * float(jnp.mean(x0 ** 2))


def test_row_noise_depends_only_on_seed_and_row():
  a = sampling.noise_for_rows(5, jnp.arange(8), (2, 3))
  b = sampling.noise_for_rows(5, jnp.arange(3, 5), (2, 3))
  np.testing.assert_array_equal(a[3:5], b)
  assert not np.allclose(sampling.noise_for_rows(6, jnp.arange(8), (2, 3)), a)


# ----------------------------------------------------------------------------- metrics

def test_metrics_on_known_answers():
  rng = np.random.default_rng(0)
  true = rng.normal(size=(6, 4, 3))
  same = metrics.score(true, true)
  assert same["cosine_token"] == pytest.approx(1.0)
  assert same["cosine_global"] == pytest.approx(1.0)
  assert same["mse"] == pytest.approx(0.0)
  assert same["recall_at_1"] == 1.0
  flipped = metrics.score(-true, true)
  assert flipped["cosine_token"] == pytest.approx(-1.0)
  assert flipped["mse"] == pytest.approx(4 * np.mean(true ** 2))
  constant = metrics.score(np.broadcast_to(true[0], true.shape), true)
  assert constant["recall_at_1"] == pytest.approx(1 / 6)


def test_metrics_do_not_depend_on_batching():
  rng = np.random.default_rng(1)
  gen, true = rng.normal(size=(2, 23, 5, 4))
  whole = metrics.score(gen, true)
  m = metrics.Metrics()
  for i in range(0, 23, 5):
    m.add(gen[i:i + 5], true[i:i + 5])
  for k, v in m.result().items():
    assert v == pytest.approx(whole[k], abs=1e-12), k


# ----------------------------------------------------------------------------- baselines

def test_sweep_table_and_plot_show_every_output_and_guidance(tmp_path):
  figures = {"cosine_global": 0.9, "mse": 0.1, "r2": 0.8, "recall_at_1": 1.0,
             "fd_pooled": 0.3, "variance_ratio": 0.9}
  sweep = [{"weights": w, "mode": "sample", "solver": s, "evaluations": n, "guidance": g,
            "model_passes": n, "cosine_token": 0.5 + n / 100 + (w == "ema") / 10, **figures}
           for w in ("ema", "raw") for s in ("euler", "heun") for n in SWEEP
           for g in (1.0, 2.0) if not (s == "heun" and n % 2)]
  sweep += [{"weights": w, "mode": "mean", "solver": "euler", "evaluations": 4, "guidance": g,
             "model_passes": 4, **figures, "cosine_token": 0.77, "variance_ratio": 0.25}
            for w in ("ema", "raw") for g in (1.0, 2.0)]
  baseline = {"baseline/ridge_cosine_token": 0.6, "baseline/mean_cosine_token": 0.3,
              "baseline/ridge_mse": 0.2, "baseline/ridge_variance_ratio": 0.4}
  record = {"sweep": sweep, "num_images": 10, "mode": "sample", "solver": "heun",
            "evaluations": 8, "guidance": 1.0, "ridge_kind": "pooled", **baseline,
            **{f"eval/{k}": 0.5 for k in (*metrics.METRICS, "velocity_cosine")}}
  table = plots.format_table(7, record).splitlines()
  rows = {line[:36].strip(): line[36:].split() for line in table[2:-1]}
  assert table[1].split() == ["output", *plots.TABLE_METRICS]   # every header apart
  assert rows["mean, 4 evals"][0] == "0.7700" and rows["mean, 4 evals"][-1] == "0.2500"
  assert rows["euler, 1 eval"][0] == "0.6100"        # the EMA weights' figure
  assert rows["heun, 8 evals g=2"][0] == "0.6800"
  assert "heun, 1 eval" not in rows                   # no 1-step Heun
  assert rows["baseline: ridge (pooled)"] == ["0.6000", "0.2000", "-", "-", "-", "0.4000"]
  assert table[-1].startswith("configured (sample; heun, 8 evaluations")
  path = plots.plot_sweep(str(tmp_path), 7, sweep, baseline)
  assert path.endswith("sweep_7.png") and os.path.getsize(path) > 10_000
  assert os.path.exists(tmp_path / "plots" / "sweep.png")


# ----------------------------------------------------------------------------- with a run

def test_evaluator_figures_do_not_depend_on_batch_size(small_run):
  config, run_dir = small_run["config"], small_run["workdir"]
  spec, data_dir, graphdef, mesh, weights = evaluate.restore(config, run_dir)
  assert weights.step == 400
  reference = evaluate.make_evaluator(config, run_dir, data_dir, spec, graphdef, mesh)
  figures = []
  for batch_size in (64, 7):
    ev = evaluate.Evaluator(graphdef, mesh, spec, reference.source_raw, reference.target_raw,
                            batch_size, seed=reference.seed)
    figures.append({**ev.evaluate(weights.ema, "euler", 4),
                    "velocity_cosine": ev.velocity_cosine(weights.ema)})
  for other in figures[1:]:
    for k, v in figures[0].items():
      assert other[k] == pytest.approx(v, abs=2e-6), k


def test_eval_mode_reports_sweep_baselines_json_and_plots(small_run):
  """main.py --mode eval on the newest checkpoint: a table on stdout, every figure in
  eval/<step>.json, the sweep plot; on this run flowmap's mean is at least the ridge map's
  and its samples keep the target's spread."""
  workdir = small_run["workdir"]
  result = run_main(["--config", small_run["config_file"], "--workdir", workdir,
                     "--mode", "eval"])
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  for text in ("mean, 4 evals", "euler, 50 evals", "heun, 8 evals",
               "baseline: ridge (resampled+pooled)", "eval/400.json", "cosine_token=",
               "sample/energy_score="):
    assert text in out, out
  with open(os.path.join(workdir, "eval", "400.json")) as f:
    record = json.load(f)
  sweep = record["sweep"]
  assert {(r["weights"], r["mode"], r["solver"], r["evaluations"]) for r in sweep} == {
      (w, "sample", s, n) for w in ("ema", "raw") for s in ("euler", "heun") for n in SWEEP
      if not (s == "heun" and n % 2)} | {(w, "mean", "euler", 4) for w in ("ema", "raw")}
  for row in sweep:
    assert set(row) >= {"cosine_token", "cosine_global", "mse", "recall_at_1", "guidance",
                        "model_passes"}
  for key in ("eval/cosine_token", "eval/raw_cosine_token", "eval/velocity_cosine",
              "eval/raw_velocity_cosine", "baseline/ridge_cosine_token",
              "baseline/ridge_recall_at_1", "baseline/mean_cosine_token", "baseline/mean_mse"):
    assert key in record, key
  assert record["ridge_kind"] == "resampled+pooled" and record["baseline_train_rows"] == 1024
  # The configured solver (euler, 8 evaluations) is one point of the sweep.
  configured = next(r for r in sweep if (r["weights"], r["mode"], r["solver"],
                                         r["evaluations"]) == ("ema", "sample", "euler", 8))
  assert configured["cosine_token"] == pytest.approx(record["eval/cosine_token"], abs=1e-9)
  mean = next(r for r in sweep if (r["weights"], r["mode"]) == ("ema", "mean"))
  assert mean["cosine_token"] == pytest.approx(record["eval/mean/cosine_token"], abs=1e-9)
  # Every figure says which output it scores; the samples keep more spread than the mean,
  # and several samples per image give the energy score and the spread-skill ratio.
  assert record["mode"] == "sample"
  assert record["eval/sample/variance_ratio"] > record["eval/mean/variance_ratio"]
  assert record["eval/sample/energy_score"] > 0 and record["eval/sample/spread_skill"] > 0
  # The periodic evaluation at step 400 sampled the same rows with the same noise.
  assert record["eval/cosine_token"] == pytest.approx(
      small_run["results"]["eval/cosine_token"], abs=1e-6)
  assert record["eval/mean/cosine_token"] > record["baseline/ridge_cosine_token"] - 0.003
  assert 0.85 < record["eval/sample/variance_ratio"] < 1.15
  assert record["baseline/ridge_cosine_token"] > record["baseline/mean_cosine_token"]
  # Both solvers converge to the same ODE solution as evaluations grow.
  final = {r["solver"]: r["cosine_token"] for r in sweep
           if r["weights"] == "ema" and r["mode"] == "sample" and r["evaluations"] == 50}
  assert abs(final["euler"] - final["heun"]) < 0.01, final
  for name in ("sweep.png", "sweep_400.png", "training.png"):
    assert os.path.getsize(os.path.join(workdir, "plots", name)) > 10_000, name


def test_eval_mode_refuses_missing_checkpoints_and_foreign_configs(small_run, tmp_path):
  config = small_run["config"]
  with pytest.raises(ConfigError, match="no checkpoints"):
    evaluate.evaluate_workdir(config, str(tmp_path))
  other = config.copy_and_resolve_references()
  other.model.dim = 32
  with pytest.raises(ConfigError, match="with model.dim=64, but this config gives 32"):
    evaluate.evaluate_workdir(other, small_run["workdir"])


def test_baseline_is_cached_per_run(small_run):
  record = baselines.read_baseline(small_run["workdir"])
  assert record["key"]["train_rows"] == 1024 and record["key"]["held_out_rows"] == 64
  assert record["ridge_kind"] == "resampled+pooled"
  config, run_dir = small_run["config"], small_run["workdir"]
  spec, data_dir, _, _, _ = evaluate.restore(config, run_dir)
  source, target, split = evaluate.held_out_raw(config, data_dir)
  path = os.path.join(small_run["workdir"], "baseline.json")
  before = os.path.getmtime(path)
  assert baselines.run_baselines(config, data_dir, run_dir, spec.linear,
                                 workdir.linear_split(config, data_dir), source, target,
                                 split) == record["metrics"]
  assert os.path.getmtime(path) == before   # read from the cache, not refitted


def test_the_ladder_is_fitted_at_the_first_evaluation_not_before_training(small_run, tmp_path):
  # Fitting the MLP rung takes minutes at patch-token shapes; the first step must not wait.
  config, run_dir = small_run["config"], str(tmp_path / "run")
  shutil.copytree(small_run["workdir"], run_dir)
  os.remove(os.path.join(run_dir, "baseline.json"))
  spec, data_dir, graphdef, mesh, _ = evaluate.restore(config, run_dir)
  evaluator = evaluate.make_evaluator(config, run_dir, data_dir, spec, graphdef, mesh)
  assert not os.path.exists(os.path.join(run_dir, "baseline.json"))
  assert evaluator.baseline == baselines.read_baseline(small_run["workdir"])["metrics"]
  assert os.path.exists(os.path.join(run_dir, "baseline.json"))


def test_the_fitted_rows_are_capped_in_bytes(small_run):
  config = small_run["config"].copy_and_resolve_references()
  data_dir = small_run["data_dir"]
  per_row = data.row_bytes(data.load_stats(data_dir), (config.data.source, config.data.target))
  config.eval.baseline_mb = 100 * per_row / 2 ** 20   # room for 100 rows, fewer than asked
  split = workdir.linear_split(config, data_dir)
  assert data.split_info(data_dir, split).num_examples == 100
  config.eval.baseline_mb = 1e-9                        # never fewer than 64
  assert data.split_info(data_dir, workdir.linear_split(config, data_dir)).num_examples == 64


# ----------------------------------------------------------------------------- monitoring

def test_training_logs_monitoring_every_log_every_steps(small_run):
  rows = workdir.read_metrics(small_run["workdir"])
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == list(range(50, 401, 50))
  keys = ["train/grad_norm", "train/grad_norm_block00", "train/grad_norm_block01",
          "train/param_norm", "train/update_ratio", "train/velocity_cosine", "train/lr",
          "train/loss_t00_25", "train/loss_t25_50", "train/loss_t50_75", "train/loss_t75_100",
          "perf/steps_per_s"]
  for r in train_rows:
    for k in keys:
      assert k in r and np.isfinite(r[k]), (r["step"], k)
    assert 0 < r["train/update_ratio"] < 1
  assert train_rows[-1]["train/velocity_cosine"] > train_rows[0]["train/velocity_cosine"]
  # The buckets tell the times apart: near t = 1 the velocity needs the noise, which x_t has
  # almost forgotten; near t = 0 it needs the target's part the linear map misses.
  last = train_rows[-1]
  assert abs(last["train/loss_t75_100"] - last["train/loss_t00_25"]) > 0.02
  evals = [r for r in rows if "eval/cosine_token" in r]
  assert [r["step"] for r in evals] == [200, 400]
  for r in evals:
    for k in ("baseline/ridge_cosine_token", "baseline/mean_cosine_token",
              "eval/velocity_cosine", "eval/raw_cosine_token"):
      assert k in r, k
  with open(os.path.join(small_run["workdir"], "eval", "200.json")) as f:
    assert "baseline/ridge_mse" in json.load(f)


def test_wandb_logs_offline_when_configured(small_run):
  """The run logged to W&B (config.wandb.project) in offline mode: one run directory whose
  record file holds every logging event's keys (8 training logs, 2 evaluations)."""
  runs = glob.glob(os.path.join(small_run["workdir"], "wandb", "offline-run-*"))
  assert len(runs) == 1, os.listdir(small_run["workdir"])
  records = glob.glob(os.path.join(runs[0], "run-*.wandb"))
  assert len(records) == 1
  with open(records[0], "rb") as f:
    raw = f.read()
  assert b"flowmap-tests" in raw
  for key, events in (("train/loss_t75_100", 8), ("train/grad_norm_block01", 8),
                      ("train/update_ratio", 8), ("eval/cosine_token", 2),
                      ("baseline/ridge_cosine_token", 2)):
    assert raw.count(key.encode()) >= events, key
