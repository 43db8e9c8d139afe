"""The Mapper API and --mode map: rows that do not depend on batching, one compile per
shape, no TensorFlow or PyTorch for sampling, and a resumable export of mapped features."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_main
from flowmap import Mapper, baselines, data, evaluate, export, metrics
from flowmap.config import ConfigError


@pytest.fixture(scope="module")
def mapper(small_run):
  return Mapper.from_workdir(small_run["workdir"])


@pytest.fixture(scope="module")
def validation(small_run):
  return data.load_features(small_run["data_dir"], "validation", 64)


def row_tolerance(mapper) -> float:
  """How far one row may move with the batch it is mapped in: float32 rounding, or in
  bfloat16 (model.dtype=auto on CPUs with native bfloat16) the matmuls' blocking, which
  depends on the batch's shape (up to ~2e-3 measured on features of scale 1). A row given
  the wrong noise moves by O(1)."""
  return 1e-5 if mapper.dtype == "float32" else 1e-2


def test_a_row_maps_alike_whatever_the_call_or_batch(mapper, validation):
  x = validation["source_enc"]
  tol = row_tolerance(mapper)
  full = mapper.map(x, seed=3)
  assert full.shape == (64, 16, 32) and full.dtype == np.float32
  for rows in (1, 7):
    np.testing.assert_allclose(mapper.map(x[:rows], seed=3), full[:rows], atol=tol)
  for batch_size in (2, 7):
    np.testing.assert_allclose(mapper.map(x, seed=3, batch_size=batch_size), full, atol=tol)
  # A piece of a larger array, told where it starts, maps as it did in the whole.
  np.testing.assert_allclose(mapper.map(x[20:27], seed=3, first_row=20), full[20:27],
                             atol=tol)
  # Another row's noise is far outside the tolerance, so the checks above can fail.
  assert np.abs(mapper.map(x[:1], seed=3, first_row=1) - full[:1]).max() > 10 * tol
  single = mapper.map(x[0], seed=3)
  assert single.shape == (16, 32)
  np.testing.assert_allclose(single, full[0], atol=tol)
  assert not np.allclose(mapper.map(x[:7], seed=4), full[:7], atol=1e-3)


def test_the_mean_and_several_samples(mapper, validation):
  """mode="mean" estimates E[target | source]: closer pointwise than a sample, with less
  spread; num_samples=K gives K samples per row (the first is the one-sample map) and the
  per-token spread."""
  x, true = validation["source_enc"], validation["target_enc"]
  mean = mapper.map(x, mode="mean")
  sample = mapper.map(x, seed=3)
  scored = {name: metrics.score(y, true) for name, y in (("mean", mean), ("sample", sample))}
  assert scored["mean"]["mse"] < scored["sample"]["mse"]
  assert scored["mean"]["variance_ratio"] < scored["sample"]["variance_ratio"]
  tol = row_tolerance(mapper)
  np.testing.assert_allclose(mapper.map(x[:5], mode="mean"), mean[:5], atol=tol)
  samples, spread = mapper.map(x[:6], seed=3, num_samples=3)
  assert samples.shape == (6, 3, 16, 32) and spread.shape == (6, 16)
  np.testing.assert_allclose(samples[:, 0], sample[:6], atol=tol)
  assert not np.allclose(samples[:, 1], samples[:, 0], atol=10 * tol)
  np.testing.assert_allclose(spread, np.sqrt(samples.var(1, ddof=1).mean(-1)), rtol=1e-5)
  assert (spread > 0).all()
  with pytest.raises(ValueError, match="mode"):
    mapper.map(x[:2], mode="median")


def test_the_mapped_mean_is_at_least_the_linear_map_and_samples_keep_the_spread(
    mapper, validation, small_run):
  """Pointwise, the fair comparison with the ridge map is the mean mode: with the linear
  prior it starts as that map and training only adds to it (a model without the prior is
  below the map at this budget: 0.9205 against 0.9285). The samples are spread like the
  truth: about twice the mean's squared error, as a perfect sampler has."""
  mean = metrics.score(mapper.map(validation["source_enc"], mode="mean"),
                       validation["target_enc"])
  sample = metrics.score(mapper.map(validation["source_enc"], steps=16, solver="heun"),
                         validation["target_enc"])
  ridge = baselines.read_baseline(small_run["workdir"])["metrics"]
  assert mean["cosine_token"] > ridge["baseline/ridge_cosine_token"] - 0.003
  assert mean["mse"] < 1.02 * ridge["baseline/ridge_mse"]
  assert 1.6 < sample["mse"] / mean["mse"] < 2.4
  assert 0.85 < sample["variance_ratio"] < 1.15


def test_each_batch_shape_compiles_once(small_run, validation):
  # A Mapper of its own: the module's one has compiled the (default) Euler sampler for
  # other batch shapes already, which made this count 6 once euler became the default.
  mapper = Mapper.from_workdir(small_run["workdir"])
  x = validation["source_enc"]
  mapper.map(x, steps=4, solver="euler", batch_size=16)
  fn = mapper._samplers[("euler", 1.0, "sample", 0)]
  assert fn._cache_size() == 1
  mapper.map(x[:40], steps=4, solver="euler", batch_size=16)   # 16 + 16 + 8 padded to 16
  mapper.map(x, steps=4, solver="euler", batch_size=16)
  mapper.map(x, steps=16, solver="euler", batch_size=16)     # the step count is traced
  assert fn._cache_size() == 1
  mapper.map(x[:5], steps=4, solver="euler", batch_size=16)    # one batch of 5: a new shape
  assert fn._cache_size() == 2


def test_weights_steps_and_errors(small_run, mapper, validation):
  assert mapper.step == 400 and mapper.ema
  assert "step 400, EMA weights" in repr(mapper)
  assert mapper.data_dir == small_run["data_dir"]
  x = validation["source_enc"][:4]
  raw = Mapper.from_workdir(small_run["workdir"], ema=False)
  earlier = Mapper.from_workdir(small_run["workdir"], step=200)
  assert earlier.step == 200
  ema_out = mapper.map(x)
  assert not np.allclose(raw.map(x), ema_out, atol=1e-4)
  assert not np.allclose(earlier.map(x), ema_out, atol=1e-4)
  with pytest.raises(ValueError, match=r"shape \[n, 16, 48\]"):
    mapper.map(x[:, :, :40])
  with pytest.raises(ValueError, match="even"):
    mapper.map(x, steps=3, solver="heun")
  mapper.map(x, guidance=2.0)   # trained with cond_dropout 0.1
  no_dropout = mapper.config.copy_and_resolve_references()
  no_dropout.flow.cond_dropout = 0.0
  with pytest.raises(ValueError, match="cond_dropout"):
    Mapper(mapper.graphdef, mapper.params, no_dropout, mapper.spec, mapper.mesh, mapper.step,
           mapper.ema).map(x, guidance=2.0)
  with pytest.raises(FileNotFoundError, match="step 123"):
    Mapper.from_workdir(small_run["workdir"], step=123)
  assert mapper.map(x[:0]).shape == (0, 16, 32)


def test_sampling_needs_no_tensorflow_or_torch_on_any_device_count(mapper, validation,
                                                                   small_run, tmp_path):
  """In a fresh process with 3 devices: `import flowmap` and Mapper sampling import neither
  TensorFlow nor PyTorch, 7 rows (not divisible by 3) map as on one device, and the
  evaluation figures of 64 rows equal the one-device figures."""
  x = validation["source_enc"][:7]
  np.save(tmp_path / "x.npy", x)
  np.save(tmp_path / "source.npy", validation["source_enc"])
  np.save(tmp_path / "target.npy", validation["target_enc"])
  script = f"""
import json
import sys
import numpy as np
import flowmap
from flowmap import Mapper, evaluate
m = Mapper.from_workdir({small_run['workdir']!r})
assert m.mesh.devices.size == 3, m.mesh
np.save('y.npy', m.map(np.load('x.npy'), seed=3, batch_size=4))
ev = evaluate.Evaluator(m.graphdef, m.mesh, m.spec, np.load('source.npy'),
                        np.load('target.npy'), batch_size=16, seed=5)
figures = ev.evaluate(m.params, 'heun', 4)
figures['velocity_cosine'] = ev.velocity_cosine(m.params)
print('FIGURES', json.dumps(figures))
heavy = sorted(n for n in sys.modules if n.split('.')[0] in ('tensorflow', 'torch',
               'tensorflow_datasets', 'keras'))
print('HEAVY', heavy)
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "HEAVY []" in result.stdout, result.stdout
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), mapper.map(x, seed=3), atol=1e-5)
  three = json.loads(result.stdout.split("FIGURES ")[1].splitlines()[0])
  ev = evaluate.Evaluator(mapper.graphdef, mapper.mesh, mapper.spec, validation["source_enc"],
                          validation["target_enc"], batch_size=64, seed=5)
  one = {**ev.evaluate(mapper.params, "heun", 4),
         "velocity_cosine": ev.velocity_cosine(mapper.params)}
  for k, v in one.items():
    assert three[k] == pytest.approx(v, abs=2e-6), k


# ----------------------------------------------------------------------------- --mode map

@pytest.fixture(scope="module")
def three_shard_input(small_run, validation, tmp_path_factory):
  """The 64 validation rows as a features dataset of 3 shards (22 + 21 + 21 rows)."""
  path = str(tmp_path_factory.mktemp("map_input"))
  examples = [{"key": str(k), "caption": f"caption {i}",
               "features": {"source_enc": validation["source_enc"][i],
                            "target_enc": validation["target_enc"][i]}}
              for i, k in enumerate(validation["key"])]
  data.write_dataset(path, {"validation": examples}, {"source_enc": (16, 48),
                                                      "target_enc": (16, 32)},
                     num_shards=3, manifest={"encoders": {"source_enc": {}, "target_enc": {}}})
  return path


def _map_config(small_run, input_dir, output_dir):
  c = small_run["config"].copy_and_resolve_references()
  c.map.input, c.map.output, c.map.batch_size = input_dir, output_dir, 16
  return c


def test_map_dataset_adds_the_mapped_feature_and_resumes(small_run, mapper, validation,
                                                         three_shard_input, tmp_path):
  out = str(tmp_path / "mapped")
  config = _map_config(small_run, three_shard_input, out)
  result = export.map_dataset(config, small_run["workdir"])
  assert result["map/rows"] == 64 and result["map/shards_written"] == 3
  assert result["map/shards_skipped"] == 0 and result["map/nonfinite_rows"] == 0
  assert result["map/cosine_token"] > 0.8
  names = sorted(os.listdir(out))
  assert [n for n in names if ".tfrecord-" in n] == [
      data.shard_name("validation", i, 3) for i in range(3)]
  stats = data.load_stats(out)
  assert stats["features"]["target_enc_mapped"]["shape"] == [16, 32]
  with open(os.path.join(out, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["mapped"]["target_enc_mapped"]["step"] == 400
  assert manifest["encoders"] == {"source_enc": {}, "target_enc": {}}

  feats = data.load_features(out, "validation")   # shard by shard, in the input's order
  source = data.load_features(three_shard_input, "validation")
  np.testing.assert_array_equal(feats["key"], source["key"])
  np.testing.assert_array_equal(feats["source_enc"], source["source_enc"])
  np.testing.assert_array_equal(feats["target_enc"], source["target_enc"])
  # The first shard (examples 0, 3, 6, ... in file order) is exactly Mapper.map with that
  # shard's seed, whatever batches it was read in (stored as float16).
  row_of = {k: i for i, k in enumerate(feats["key"])}
  first = [row_of[k] for k in validation["key"][::3]]
  expected = mapper.map(validation["source_enc"][::3],
                        seed=export.shard_seed(config.seed, "validation", 0))
  np.testing.assert_allclose(feats["target_enc_mapped"][first], expected, atol=2e-2,
                             rtol=2e-3)

  # Interrupted after two shards: only the missing one is mapped again, identically.
  shard = os.path.join(out, data.shard_name("validation", 1, 3))
  before = data.load_features(out, "validation")["target_enc_mapped"]
  os.remove(shard)
  again = export.map_dataset(config, small_run["workdir"])
  assert again["map/shards_written"] == 1 and again["map/shards_skipped"] == 2
  assert again["map/rows"] == 21
  np.testing.assert_array_equal(data.load_features(out, "validation")["target_enc_mapped"],
                                before)


def test_map_dataset_refuses_bad_requests(small_run, three_shard_input, tmp_path):
  out = str(tmp_path / "mapped")
  with pytest.raises(ConfigError, match="map.input"):
    export.map_dataset(_map_config(small_run, "", out), small_run["workdir"])
  with pytest.raises(ConfigError, match="not a complete features dataset"):
    export.map_dataset(_map_config(small_run, str(tmp_path), out), small_run["workdir"])
  with pytest.raises(ConfigError, match="train a run"):
    export.map_dataset(_map_config(small_run, three_shard_input, out), str(tmp_path))
  config = _map_config(small_run, three_shard_input, out)
  os.makedirs(out)
  with open(os.path.join(out, "map.json"), "w") as f:
    json.dump({"step": 1}, f)
  with pytest.raises(ConfigError, match="different settings"):
    export.map_dataset(config, small_run["workdir"])


def test_map_mode_on_the_command_line(small_run, three_shard_input, tmp_path):
  out = tmp_path / "cli"
  result = run_main(["--config", small_run["config_file"], "--workdir", small_run["workdir"],
                     "--mode", "map", f"--config.map.input={three_shard_input}",
                     f"--config.map.output={out}"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mapped 64 rows (3 shards written, 0 already done)" in result.stdout
  assert "map/rows=64.0000" in result.stdout
  assert "map:" in result.stderr          # the progress bar
  assert data.is_complete(str(out))
