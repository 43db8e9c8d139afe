"""Features datasets: writer, stats, reader, normalisation, and the training order."""

import itertools
import json
import os

import numpy as np
import pytest

from flowmap import data as data_lib


def test_stats_match_numpy_on_the_train_split(demo_data):
  feats = data_lib.load_features(demo_data, "train")
  stats = data_lib.load_stats(demo_data)
  for name in ("source_enc", "target_enc"):
    x = feats[name].astype(np.float64).reshape(-1, feats[name].shape[-1])
    f = stats["features"][name]
    assert f["count"] == len(feats[name]) and f["shape"] == list(feats[name].shape[1:])
    np.testing.assert_allclose(f["mean"], x.mean(0), atol=1e-6)
    np.testing.assert_allclose(f["std"], x.std(0, ddof=1), rtol=1e-5)


def test_moments_merge_like_one_pass():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, size=(1000, 5))
  whole, parts = data_lib.Moments(5), [data_lib.Moments(5) for _ in range(3)]
  whole.add(x)
  for part, chunk in zip(parts, np.array_split(x, 3)):
    part.add(chunk)
  merged = data_lib.Moments(5)
  for part in parts:
    merged.merge(data_lib.Moments.from_json(json.loads(json.dumps(part.to_json()))))
  np.testing.assert_allclose(merged.mean, whole.mean)
  np.testing.assert_allclose(merged.m2, whole.m2)


def test_writer_rejects_bad_examples_naming_the_key(tmp_path):
  w = data_lib.ShardWriter(str(tmp_path), "train", 0, 1, {"a": (2, 3)})
  with pytest.raises(ValueError, match="k1: feature 'a' has shape"):
    w.add("k1", "", {"a": np.zeros((3, 3))})
  with pytest.raises(ValueError, match="k2: feature 'a' has non-finite"):
    w.add("k2", "", {"a": np.full((2, 3), np.inf)})
  with pytest.raises(ValueError, match="k3: feature 'a' has non-finite"):
    w.add("k3", "", {"a": np.full((2, 3), 1e6)})   # overflows float16
  w.add("k4", "", {"a": np.ones((2, 3))})
  assert w.commit() == 1


@pytest.mark.parametrize("kind", ["standardize", "l2", "none"])
def test_normalizer_round_trip(kind):
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(4, 5, 6)).astype(np.float32)
  norm = data_lib.Normalizer(kind, x.reshape(-1, 6).mean(0), x.reshape(-1, 6).std(0),
                             float(np.linalg.norm(x, axis=-1).mean()))
  y = norm.encode(x)
  if kind == "l2":   # unit RMS per element, like the noise, not unit norm
    np.testing.assert_allclose(np.sqrt((y ** 2).mean(-1)), 1.0, rtol=1e-4)
    from flowmap.metrics import cosine
    np.testing.assert_allclose(cosine(norm.decode(y), x), 1.0, atol=1e-6)
  else:
    np.testing.assert_allclose(norm.decode(y), x, rtol=1e-5, atol=1e-5)
  assert data_lib.Normalizer.from_json(norm.to_json()).kind == kind


def take(it, n):
  return list(itertools.islice(it, n))


def test_training_order_is_a_function_of_seed_and_step(demo_data):
  names = ["source_enc", "target_enc"]
  full = take(data_lib.train_batches(demo_data, "train", names, 64, seed=3), 9)
  resumed = take(data_lib.train_batches(demo_data, "train", names, 64, seed=3, start_step=5), 4)
  for a, b in zip(full[5:], resumed):
    np.testing.assert_array_equal(a["source_enc"], b["source_enc"])
  other = take(data_lib.train_batches(demo_data, "train", names, 64, seed=4), 1)
  assert not np.array_equal(other[0]["source_enc"], full[0]["source_enc"])
  # epochs (4 steps of 64 over 256 rows) visit every row once, in a new order each time
  epoch0 = np.concatenate([b["source_enc"][:, 0, 0] for b in full[:4]])
  epoch1 = np.concatenate([b["source_enc"][:, 0, 0] for b in full[4:8]])
  np.testing.assert_array_equal(np.sort(epoch0), np.sort(epoch1))
  assert not np.array_equal(epoch0, epoch1)


@pytest.mark.parametrize("in_memory_bytes", [2 << 30, 0])
def test_process_slices_make_up_the_global_batch(demo_data, in_memory_bytes):
  names = ["source_enc"]
  kw = dict(seed=1, in_memory_bytes=in_memory_bytes)
  one = take(data_lib.train_batches(demo_data, "train", names, 32, **kw), 3)
  two = [take(data_lib.train_batches(demo_data, "train", names, 32, process_index=p,
                                     process_count=2, **kw), 3) for p in range(2)]
  for step in range(3):
    assert two[0][step]["source_enc"].shape[0] == 16
    if in_memory_bytes:   # in memory: the same global batches whatever the process count
      np.testing.assert_array_equal(
          np.concatenate([two[0][step]["source_enc"], two[1][step]["source_enc"]]),
          one[step]["source_enc"])


def test_streaming_resume_replays_the_epoch(demo_data):
  names = ["source_enc"]
  kw = dict(seed=2, in_memory_bytes=0, shuffle_buffer=64)
  full = take(data_lib.train_batches(demo_data, "train", names, 32, **kw), 11)
  resumed = take(data_lib.train_batches(demo_data, "train", names, 32, start_step=9, **kw), 2)
  for a, b in zip(full[9:], resumed):
    np.testing.assert_array_equal(a["source_enc"], b["source_enc"])


def test_too_small_split_is_a_clear_error(demo_data):
  with pytest.raises(data_lib.DataError, match="fewer than one batch"):
    next(data_lib.train_batches(demo_data, "validation", ["source_enc"], 1024))


def test_failed_json_write_leaves_no_temporary_and_keeps_the_old_file(tmp_path):
  path = str(tmp_path / "stats.json")
  data_lib._write_json_atomic(path, {"a": 1})
  with pytest.raises(TypeError):
    data_lib._write_json_atomic(path, {"a": 2, "b": object()})   # fails half way through
  assert os.listdir(tmp_path) == ["stats.json"]
  with open(path) as f:
    assert json.load(f) == {"a": 1}


def test_a_shard_is_on_disk_before_it_gets_its_final_name(tmp_path, monkeypatch):
  events = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
    return real_fsync(fd)

  def replace(src, dst):
    events.append(("replace", os.path.basename(src)))
    return real_replace(src, dst)
  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(os, "replace", replace)
  w = data_lib.ShardWriter(str(tmp_path), "train", 0, 1, {"a": (2, 3)})
  w.add("k0", "", {"a": np.zeros((2, 3), np.float32)})
  w.commit()
  tmp_name = os.path.basename(w.tmp_path)
  assert events.index(("fsync", tmp_name)) < events.index(("replace", tmp_name))
