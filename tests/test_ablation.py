"""python -m flowmap.ablation: the one-change-at-a-time variants and the reversed sampler."""

import numpy as np
import pytest

from conftest import tiny_config


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def test_each_variant_changes_only_its_keys_and_unknown_keys_are_refused():
  from flowmap import ablation
  from flowmap.workdir import validate_config
  base = tiny_config()
  base.model.prior = "auto"   # the demo's default, which two variants replace
  flat_base = _flat(base.to_dict())
  for name, (_, overrides) in ablation.VARIANTS.items():
    if overrides is None:
      continue
    c = ablation.with_overrides(base, overrides)
    validate_config(c)   # every variant is a valid config
    flat = _flat(c.to_dict())
    changed = {k for k in flat if flat[k] != flat_base[k]}
    assert changed == {k for k, v in overrides.items() if v != flat_base[k]}, name
    assert changed or name == "defaults", name   # every other variant changes something
  with pytest.raises(KeyError, match="flow.time_samplin"):
    ablation.with_overrides(base, {"flow.time_samplin": "uniform"})


def test_the_reversed_sampler_scores_far_below_the_trained_sampler(small_run):
  """The earlier attempts' bug, reproduced on a trained run: integrating the learned
  velocity with time reversed (from data to noise) lands far from the held-out targets that
  the forward sampler, from the same noise and the same weights, gets close to."""
  from flowmap import ablation, evaluate
  config, run_dir = small_run["config"], small_run["workdir"]
  reversed_ = ablation.evaluate_reversed(config, run_dir)
  spec, data_dir, graphdef, mesh, weights = evaluate.restore(config, run_dir)
  evaluator = evaluate.make_evaluator(config, run_dir, data_dir, spec, graphdef, mesh)
  forward = evaluator.evaluate(weights.ema, config.eval.solver, config.eval.steps, 1.0)
  assert forward["cosine_token"] > reversed_["eval/sample/cosine_token"] + 0.2
  assert forward["mse"] < 0.5 * reversed_["eval/sample/mse"]
  assert reversed_["baseline/ridge_cosine_token"] == pytest.approx(
      evaluator.baseline["baseline/ridge_cosine_token"])


def test_ablation_runs_a_variant_and_tabulates_it_next_to_ridge(tmp_path):
  from flowmap import ablation
  c = tiny_config(steps=10)
  row = ablation.run_variant(c, str(tmp_path), "unit_norm")
  assert row["variant"] == "unit_norm"
  assert np.isfinite(row["eval/mean/mse"]) and np.isfinite(row["eval/sample/fd_pooled"])
  assert (tmp_path / "data" / "stats.json").exists()   # one dataset, shared by the variants
  lines = ablation.table([row]).splitlines()
  assert lines[2].startswith("| targets scaled to unit L2 norm |")
  assert lines[3].startswith("| ridge (closed-form linear map) |")
  assert len(lines[2].split("|")) == len(lines[0].split("|")) == len(lines[3].split("|"))
  assert "-" not in lines[3].split("|")[1:-1]
