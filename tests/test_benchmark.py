"""The benchmark: the CLI's JSON at the tiny size, the analytic FLOP count against XLA's, and
no host round-trips in the compiled train step and sampler (a transfer guard)."""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowmap import benchmark
from flowmap import benchmark_peer
from flowmap import platform as platform_lib
from flowmap import model as M
from flowmap import sharding
from flowmap import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  from configs import bench
  return bench.get_config("tiny")


def _finite_positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_cli_prints_the_contract_keys_with_positive_finite_figures(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, "-m", "flowmap.benchmark", "--config",
       os.path.join(ROOT, "configs", "bench.py") + ":tiny", "--out", str(out),
       f"--config.bench.profile_dir={tmp_path / 'profile'}", "--config.bench.profile_steps=1"],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout)
  for d in ("float32", "bfloat16"):   # a trace per compute dtype, as TensorBoard reads it
    assert result["profile_dirs"][d] == str(tmp_path / "profile" / d)
    assert list((tmp_path / "profile" / d).glob("plugins/profile/*/*.xplane.pb")), d
  assert json.loads(out.read_text()) == result
  for key in ("train_samples_per_s", "train_tflops", "mfu", "peak_tflops",
              "input_samples_per_s", "batch"):
    assert _finite_positive(result[key]), key
  assert set(result["compile_s"]) >= {"train_step", "sampler"}
  assert all(_finite_positive(v) for v in result["compile_s"].values())
  assert set(result["sample_samples_per_s"]) == {"euler", "heun"}
  for rates in result["sample_samples_per_s"].values():
    assert rates and all(_finite_positive(v) for v in rates.values())
  assert result["model"]["dim"] == 64 and result["model"]["depth"] == 2
  assert result["model"]["heads"] == 4
  assert result["source_shape"] == [16, 32] and result["target_shape"] == [16, 24]
  assert isinstance(result["device"], str) and result["device"]
  if result["device_info"]["platform"] == "cpu":   # the vector features, named
    assert platform_lib.describe_cpu() in result["device"]
    assert set(result["device_info"]["cpu_features"]) == platform_lib.cpu_features()
    assert set(platform_lib.cpu_xla_flags()) <= set(result["device_info"]["xla_flags"].split())
  assert set(result["flowmap_by_dtype"]) == {"float32", "bfloat16"}
  for d, figures in result["flowmap_by_dtype"].items():
    assert _finite_positive(figures["train_samples_per_s"]), d
    assert _finite_positive(figures["mfu_bfloat16_peak"]), d
    assert _finite_positive(figures["sample_samples_per_s"]["euler"]["2"]), d
  assert set(result["peak_tflops_by_dtype"]) == {"float32", "bfloat16"}
  quality = result["at_flow50_quality"]   # the tiny config times Euler at 2 evaluations
  assert quality["flowmap_evaluations"] == 2
  assert quality["flowmap_samples_per_s"] == result["sample_samples_per_s"]["euler"]["2"]
  load = result["host_load"]
  if os.path.exists("/proc/stat"):
    assert load["rounds"] > 0
    for key in ("other_cores", "steal_cores", "load1"):
      assert 0 <= load[key]["min"] <= load[key]["mean"] <= load[key]["max"], key
  for key in ("first_batch_s", "cpu_ms_per_sample", "mib_per_s", "peak_rss_gib"):
    assert _finite_positive(result["input"][key]), key
  assert result["input"]["samples_per_s"] == result["input_samples_per_s"]
  assert _finite_positive(result["input_cores_at_train_rate"])
  assert 0.8 < result["flops_check"] < 1.3
  assert "train step" in proc.stderr and "samples/s" in proc.stderr   # the table


def test_missing_shapes_is_one_line_and_exit_code_2():
  proc = subprocess.run(
      [sys.executable, "-m", "flowmap.benchmark", "--config",
       os.path.join(ROOT, "configs", "default.py"),
       "--config.data.source=a", "--config.data.target=b"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 2
  assert "source_shape" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("cfg", [
    M.ModelConfig(source_shape=(16, 24), target_shape=(16, 12), dim=64, depth=1, heads=4,
                  kv_heads=2),
    M.ModelConfig(source_shape=(4, 24), target_shape=(9, 12), dim=32, depth=1, heads=2,
                  kv_heads=2, aligned_conditioning=False),
])
def test_analytic_flops_match_xla_at_depth_one(cfg):
  """At depth 1 XLA's cost analysis sees every matmul once; the analytic count leaves out
  only elementwise work (norms, softmax, RoPE), a few percent at these sizes."""
  model = M.NextDiT(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  b = 3
  x = jnp.zeros((b, *cfg.target_shape))
  s = jnp.zeros((b, *cfg.source_shape))
  t = jnp.zeros((b,))
  fwd = jax.jit(lambda st, x, t, s: nnx.merge(graphdef, st)(x, t, s)).lower(
      state, x, t, s).compile()
  xla = benchmark._cost_flops(fwd)
  analytic = b * M.flops(cfg)["forward"]
  assert 0.95 < xla / analytic < 1.15


def test_train_step_and_sampler_make_no_host_transfers():
  config = tiny_config()
  source_shape, target_shape = benchmark.feature_shapes(config)
  model_cfg = M.config_from(config.model, source_shape, target_shape)
  fm = benchmark.Flowmap(config, model_cfg, sample_batch=4)
  fm.run_steps(1)   # the first call may transfer constants; later ones must not
  sample, _ = fm.sampler("heun", 2)
  sample()
  with jax.transfer_guard("disallow"):
    fm.run_steps(2)
    sample()
  assert int(fm.state["step"]) == 3


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                    reason="the peer needs requirements-bench.txt")
def test_peer_trains_and_samples_at_the_matched_size():
  config = tiny_config()
  config.data.target_shape = (16, 24)
  source_shape, target_shape = benchmark.feature_shapes(config)
  model_cfg = M.config_from(config.model, source_shape, target_shape)
  peer = benchmark_peer.LuminaPeer(config, model_cfg, sample_batch=2)
  blocks = peer.model.layers
  assert len(blocks) == model_cfg.depth
  assert peer.model.config.hidden_size == model_cfg.dim
  assert peer.model.config.num_attention_heads == model_cfg.heads
  assert peer.model.config.cross_attention_dim == source_shape[1]
  before = [p.detach().clone() for p in peer.params]
  peer.train_steps(1, "float32")
  assert any(not np.allclose(a.numpy(), b.detach().numpy())
             for a, b in zip(before, peer.params))
  peer.euler(2, "bf16_autocast")
  flops = peer.flops_per_example()   # counted by PyTorch, next to flowmap's analytic count
  assert 2.5 * flops["forward"] < flops["train"] < 3.5 * flops["forward"]
  assert 0.5 < flops["forward"] / M.flops(model_cfg)["forward"] < 3.0


def test_samples_at_the_flow50_quality_against_the_guided_peer():
  """flowmap's Euler rate at bench.quality_evaluations next to the peer's guided 30-step
  Euler loop (60 evaluations), extrapolated from its best measured seconds per evaluation;
  nothing when that evaluation count was not timed."""
  s = benchmark.settings(tiny_config())
  s.quality_evaluations, s.peer_guided_steps = 2, 30
  rates = {"euler": {"2": 10.0, "8": 3.0}}
  q = benchmark.at_flow50_quality(s, rates, {"float32": 0.02, "bf16_autocast": 0.01}, 4)
  assert q["flowmap_samples_per_s"] == 10.0 and q["peer_evaluations"] == 60
  assert q["peer_samples_per_s"] == pytest.approx(4 / (0.01 * 60))
  assert q["ratio"] == pytest.approx(10.0 / (4 / 0.6))
  assert "peer_samples_per_s" not in benchmark.at_flow50_quality(s, rates, {}, 4)
  s.quality_evaluations = 1
  assert benchmark.at_flow50_quality(s, rates, {}, 4) is None
