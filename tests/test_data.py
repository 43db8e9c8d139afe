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


@pytest.mark.parametrize("kind", ["standardize", "l2", "unit", "none"])
def test_normalizer_round_trip(kind):
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(4, 5, 6)).astype(np.float32)
  norm = data_lib.Normalizer(kind, x.reshape(-1, 6).mean(0), x.reshape(-1, 6).std(0),
                             float(np.linalg.norm(x, axis=-1).mean()))
  y = norm.encode(x)
  if kind in ("l2", "unit"):   # l2: unit RMS per element, like the noise; unit: norm 1
    rms = 1.0 if kind == "l2" else 1 / np.sqrt(6)
    np.testing.assert_allclose(np.sqrt((y ** 2).mean(-1)), rms, rtol=1e-4)
    from flowmap.metrics import cosine
    np.testing.assert_allclose(cosine(norm.decode(y), x), 1.0, atol=1e-6)
  else:
    np.testing.assert_allclose(norm.decode(y), x, rtol=1e-5, atol=1e-5)
  assert data_lib.Normalizer.from_json(norm.to_json()).kind == kind


def test_normalizer_takes_stored_half_precision_in_numpy_and_under_jit():
  import jax
  rng = np.random.default_rng(0)
  x = (30 * rng.normal(size=(2, 3, 1024))).astype(np.float16)   # sum of squares > 65504
  for kind in ("standardize", "l2", "unit"):
    norm = data_lib.Normalizer(kind, rng.normal(size=1024), rng.uniform(1, 2, 1024), 5.0)
    want = norm.encode(x.astype(np.float32))
    got = norm.encode(x)
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, want)
    jitted = jax.jit(norm.encode)(jax.numpy.asarray(x))
    assert jitted.dtype == np.float32
    np.testing.assert_allclose(np.asarray(jitted), want, rtol=1e-5, atol=1e-5)


def test_tensorflow_sees_no_gpu():
  assert data_lib.tensorflow().config.get_visible_devices("GPU") == []


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


ROWS, SHARDS = 150, 3


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
  """Rows whose feature ``id`` holds the row's index (exact in float16), written
  round-robin over three shards, beside a random feature ``x``."""
  path = str(tmp_path_factory.mktemp("numbered"))
  rng = np.random.default_rng(0)
  data_lib.write_dataset(path, {"train": [
      {"key": f"{i:04d}", "features": {"id": np.full((2, 3), i), "x": rng.normal(size=(4, 5))}}
      for i in range(ROWS)]}, {"id": (2, 3), "x": (4, 5)}, num_shards=SHARDS)
  return path


def ids(batch):
  return batch["id"][:, 0, 0].astype(int)


ROW_BYTES = (2 * 3 + 4 * 5) * 2   # float16
# always streamed, through a buffer of three windows of 48 rows: several windows an epoch
STREAMED = dict(in_memory_bytes=0, shuffle_buffer_bytes=3 * 48 * ROW_BYTES)


@pytest.mark.parametrize("process_count", [1, 2])
def test_a_streamed_run_resumes_to_the_uninterrupted_batches(numbered, process_count,
                                                             monkeypatch):
  """Over three epochs (9 steps of 16 rows each), resumed inside the first window, at a
  window's start later in the epoch, at an epoch boundary, just after one, and inside a
  later window; each window takes 12 rows from each of 4 streams."""
  monkeypatch.setattr(data_lib, "READ_STREAMS", 4)
  names, steps = ["id", "x"], 27
  for p in range(process_count):
    kw = dict(seed=5, process_index=p, process_count=process_count, **STREAMED)
    full = take(data_lib.train_batches(numbered, "train", names, 16, **kw), steps)
    assert full[0]["id"].shape == (16 // process_count, 2, 3)
    for start in (1, 6, 9, 10, 22):
      resumed = take(data_lib.train_batches(numbered, "train", names, 16, start_step=start,
                                            **kw), steps - start)
      for a, b in zip(full[start:], resumed, strict=True):
        for n in names:
          np.testing.assert_array_equal(a[n], b[n])


def test_streamed_epochs_see_each_row_once_in_a_new_order_mixing_shards(numbered):
  kw = dict(seed=1, process_count=2, **STREAMED)
  per_process = [take(data_lib.train_batches(numbered, "train", ["id"], 16, process_index=p,
                                             **kw), 18) for p in range(2)]
  epochs = [[np.concatenate([ids(b) for b in batches[e * 9:(e + 1) * 9]]) for e in range(2)]
            for batches in per_process]
  for p in range(2):
    first, second = epochs[p]
    assert len(set(first)) == len(first) == 72 and len(set(second)) == 72
    assert not np.array_equal(first, second)
  # each process reads its own half of the split (75 rows), the same half every epoch
  halves = [set(first) | set(second) for first, second in epochs]
  assert len(halves[0]) <= 75 and len(halves[1]) <= 75 and not halves[0] & halves[1]
  # the shard is the id modulo 3 (round-robin writing): one process, every batch mixes them
  batches = take(data_lib.train_batches(numbered, "train", ["id"], 16, seed=1, **STREAMED), 18)
  assert all(len(set(ids(b) % SHARDS)) > 1 for b in batches)


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


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_batches_carry_the_stored_dtype_and_the_stored_values(tmp_path, dtype):
  rng = np.random.default_rng(0)
  data_lib.write_dataset(str(tmp_path), {"train": [
      {"key": f"{i:03d}", "features": {"id": np.full((1, 2), i), "x": rng.normal(size=(3, 4))}}
      for i in range(40)]}, {"id": (1, 2), "x": (3, 4)}, dtype=dtype, num_shards=2)
  raw = data_lib.load_features(str(tmp_path), "train")
  by_id = {int(i): x for i, x in zip(raw["id"][:, 0, 0], raw["x"])}
  for in_memory_bytes in (2 << 30, 0):
    batch = next(data_lib.train_batches(str(tmp_path), "train", ["id", "x"], 8, seed=0,
                                        in_memory_bytes=in_memory_bytes))
    assert str(batch["x"].dtype) == dtype
    for i, x in zip(ids(batch), batch["x"]):
      np.testing.assert_array_equal(x.astype(np.float32), by_id[i])


def test_in_memory_threshold_counts_stored_bytes(numbered, monkeypatch):
  stored = ROWS * ROW_BYTES   # float32 would be twice that

  def no_streaming(*args, **kwargs):
    raise AssertionError("streamed")
  monkeypatch.setattr(data_lib, "_Shuffle", no_streaming)
  next(data_lib.train_batches(numbered, "train", ["id", "x"], 16, in_memory_bytes=stored))
  with pytest.raises(AssertionError, match="streamed"):
    next(data_lib.train_batches(numbered, "train", ["id", "x"], 16, in_memory_bytes=stored - 1))


def test_a_resumed_epoch_reads_only_the_windows_from_its_step(numbered):
  rows = data_lib._Rows(numbered, "train", ["id", "x"])
  order = data_lib._Shuffle(rows, 2, 144, 3 * 2 * ROW_BYTES)
  assert order.window == 2 and order.windows > 3

  def read(first_window):
    pieces, emitted = order.epoch([0, 1, 0], first_window)
    assert len(emitted) == pieces[:, 3].sum()
    return [(f, r) for _, f, first, n in pieces for r in range(first, first + n)]
  whole, resumed = read(0), read(3)
  assert len(whole) == 144 and len(set(whole)) == 144
  assert set(resumed) < set(whole) and len(resumed) == 144 - 3 * order.window


def test_unshuffled_reading_is_file_order_with_a_last_short_batch(numbered):
  ds = data_lib.make_dataset(numbered, "train", ["id"], 32, shuffle=False, repeat=False,
                             limit=70, drop_remainder=False)
  batches = list(data_lib.iterate_numpy(ds))
  assert [len(b["id"]) for b in batches] == [32, 32, 6]
  want = data_lib.load_features(numbered, "train", 70)["id"]
  np.testing.assert_array_equal(np.sort(np.concatenate([ids(b) for b in batches])),
                                np.sort(want[:, 0, 0].astype(int)))


def test_a_split_string_reads_its_rows_across_shards_in_order(numbered):
  # file order: shard 0 holds ids 0, 3, 6, ..., shard 1 ids 1, 4, 7, ... (50 rows each)
  split = "train[2:4]+train[60:63]"
  assert data_lib.split_info(numbered, split).num_examples == 5
  batches = list(data_lib.iterate_split(numbered, split, ["id"], batch_size=4))
  assert [len(b["id"]) for b in batches] == [4, 1]
  assert list(np.concatenate([ids(b) for b in batches])) == [6, 9, 31, 34, 37]
  with pytest.raises(data_lib.DataError, match="no 'test' split"):
    data_lib.split_info(numbered, "train[:3]+test[:3]")


def test_measure_input_reports_positive_figures(numbered):
  figures = data_lib.measure_input(numbered, ["id", "x"], 8, batches=3,
                                   shuffle_buffer_bytes=1 << 16)
  for key in ("first_batch_s", "samples_per_s", "cpu_ms_per_sample", "mib_per_s", "peak_rss_gib"):
    assert figures[key] > 0, key


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


def test_peak_rss_of_a_spawned_reader_is_its_own_not_its_parents():
  """A process spawned by a large parent reports its own peak memory (VmHWM), not the
  parent's that getrusage carries across exec."""
  import multiprocessing
  import concurrent.futures
  ballast = np.ones(600 << 20, np.uint8)   # 600 MiB resident in this process
  spawn = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
    child = pool.submit(data_lib.peak_rss_bytes).result()
  assert ballast.sum() > 0
  assert data_lib.peak_rss_bytes() > 600 << 20
  assert child < 300 << 20, child / 2 ** 20
