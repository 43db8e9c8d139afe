"""Features datasets: the one writer (extraction and the demo share it), the reader, and the
normalisation statistics.

On disk a features dataset is a directory that ``tfds.builder_from_directory`` reads:

  flowmap_features-<split>.tfrecord-<i>-of-<n>   TFRecord shards of tf.train.Example
  dataset_info.json, features.json                tfds metadata
  stats.json                                      per feature: shape, count, mean, std
  manifest.json                                   encoders, inputs, counts written/skipped
  parts/<split>-<i>-of-<n>.json                   per-shard count and moments (for merging)

Each example holds every feature as raw float16 (or float32) bytes plus ``key`` and
``caption``. A shard is written under a temporary name and renamed when complete, so a
reader never sees a partial shard. TensorFlow is imported lazily: sampling code that only
needs ``Normalizer`` or ``load_stats`` does not pay for it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import uuid
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from flowmap.config import NORMALIZATIONS, DataError

DATASET_NAME = "flowmap_features"
STATS_SPLIT = "train"


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{DATASET_NAME}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def _part_path(out_dir: str, split: str, index: int, num_shards: int) -> str:
  return os.path.join(out_dir, "parts", f"{split}-{index:05d}-of-{num_shards:05d}.json")


def _write_json_atomic(path: str, obj) -> None:
  # A temporary name of its own: workers that finish together may finalize at once.
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):   # a failed write leaves neither a temporary file nor a half file
      os.remove(tmp)
    raise


def _fsync_file(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def features_spec(feature_shapes: Mapping[str, Sequence[int]], dtype: str = "float16"):
  """The tfds FeaturesDict of a features dataset: raw bytes of every feature + key + caption."""
  import tensorflow_datasets as tfds
  spec = {"key": tfds.features.Text(), "caption": tfds.features.Text()}
  for name, shape in feature_shapes.items():
    spec[name] = tfds.features.Tensor(shape=tuple(shape), dtype=np.dtype(dtype),
                                      encoding=tfds.features.Encoding.BYTES)
  return tfds.features.FeaturesDict(spec)


class Moments:
  """Per-dimension count, mean and M2 in float64, mergeable across shards (Chan et al.)."""

  def __init__(self, dim: int):
    self.count = 0
    self.mean = np.zeros(dim, np.float64)
    self.m2 = np.zeros(dim, np.float64)
    self.norm_sum = 0.0

  def add(self, x: np.ndarray) -> None:
    x = np.asarray(x, np.float64).reshape(-1, self.mean.shape[0])
    other = Moments(self.mean.shape[0])
    other.count = x.shape[0]
    other.mean = x.mean(0)
    other.m2 = ((x - other.mean) ** 2).sum(0)
    other.norm_sum = float(np.linalg.norm(x, axis=-1).sum())
    self.merge(other)

  def merge(self, other: "Moments") -> None:
    if other.count == 0:
      return
    n = self.count + other.count
    delta = other.mean - self.mean
    self.mean = self.mean + delta * other.count / n
    self.m2 = self.m2 + other.m2 + delta ** 2 * self.count * other.count / n
    self.norm_sum += other.norm_sum
    self.count = n

  def to_json(self) -> dict:
    return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist(),
            "norm_sum": self.norm_sum}

  @classmethod
  def from_json(cls, d: dict) -> "Moments":
    m = cls(len(d["mean"]))
    m.count, m.norm_sum = int(d["count"]), float(d["norm_sum"])
    m.mean, m.m2 = np.asarray(d["mean"], np.float64), np.asarray(d["m2"], np.float64)
    return m


class ShardWriter:
  """Writes one TFRecord shard of one split atomically, with its moments in a sidecar.

  ``add`` validates each example (shape, finiteness) and raises ``ValueError`` naming the key
  for a bad one, leaving the shard usable; ``commit`` renames the shard into place.
  """

  def __init__(self, out_dir: str, split: str, index: int, num_shards: int,
               feature_shapes: Mapping[str, Sequence[int]], dtype: str = "float16"):
    import tensorflow as tf
    os.makedirs(os.path.join(out_dir, "parts"), exist_ok=True)
    self.out_dir, self.split, self.index, self.num_shards = out_dir, split, index, num_shards
    self.shapes = {k: tuple(v) for k, v in feature_shapes.items()}
    self.dtype = np.dtype(dtype)
    self.spec = features_spec(self.shapes, dtype)
    from tensorflow_datasets.core import example_serializer
    self._serializer = example_serializer.ExampleSerializer(self.spec.get_serialized_info())
    self.path = os.path.join(out_dir, shard_name(split, index, num_shards))
    self.tmp_path = self.path + ".incomplete"
    self.writer = tf.io.TFRecordWriter(self.tmp_path)
    self.moments = {k: Moments(shape[-1]) for k, shape in self.shapes.items()}
    self.count = 0

  def add(self, key: str, caption: str, features: Mapping[str, np.ndarray]) -> None:
    if set(features) != set(self.shapes):
      raise ValueError(f"{key}: features {sorted(features)} != dataset's {sorted(self.shapes)}")
    cast = {}
    for name, x in features.items():
      x = np.asarray(x)
      if x.shape != self.shapes[name]:
        raise ValueError(f"{key}: feature {name!r} has shape {x.shape}, "
                         f"expected {self.shapes[name]}")
      stored = x.astype(self.dtype)
      if not np.all(np.isfinite(stored)):
        raise ValueError(f"{key}: feature {name!r} has non-finite values "
                         f"(after casting to {self.dtype})")
      cast[name] = stored
    # Deterministic: protobuf writes map fields (the features) in an order that differs
    # from one process to the next, and a resumed run must give the same bytes.
    example = self._serializer.get_tf_example(self.spec.encode_example(
        {"key": key, "caption": caption or "", **cast}))
    self.writer.write(example.SerializeToString(deterministic=True))
    for name, x in cast.items():
      self.moments[name].add(x)
    self.count += 1

  def commit(self) -> int:
    self.writer.close()
    part = {"split": self.split, "index": self.index, "num_shards": self.num_shards,
            "count": self.count, "num_bytes": os.path.getsize(self.tmp_path),
            "moments": {k: m.to_json() for k, m in self.moments.items()}}
    _fsync_file(self.tmp_path)   # on disk before its final name appears (a crash after the
    os.replace(self.tmp_path, self.path)   # rename never leaves a named, truncated shard)
    _write_json_atomic(_part_path(self.out_dir, self.split, self.index, self.num_shards), part)
    return self.count

  def abort(self) -> None:
    self.writer.close()
    if os.path.exists(self.tmp_path):
      os.remove(self.tmp_path)


def shard_done(out_dir: str, split: str, index: int, num_shards: int) -> bool:
  return (os.path.exists(os.path.join(out_dir, shard_name(split, index, num_shards))) and
          os.path.exists(_part_path(out_dir, split, index, num_shards)))


def read_parts(out_dir: str) -> list[dict]:
  parts_dir = os.path.join(out_dir, "parts")
  if not os.path.isdir(parts_dir):
    return []
  parts = []
  for name in sorted(os.listdir(parts_dir)):
    if name.endswith(".json"):
      with open(os.path.join(parts_dir, name)) as f:
        parts.append(json.load(f))
  return parts


def finalize(out_dir: str, feature_shapes: Mapping[str, Sequence[int]],
             splits: Sequence[str], num_shards: int | Mapping[str, int],
             dtype: str = "float16", manifest: Optional[dict] = None) -> bool:
  """Writes tfds metadata, stats.json and manifest.json once every shard of every split is
  in place; returns False (writing nothing) while shards from other workers are missing.
  ``num_shards`` may differ per split (a mapping), e.g. when separate extraction runs
  wrote train and validation into one directory."""
  import tensorflow_datasets as tfds
  shards = (dict(num_shards) if isinstance(num_shards, Mapping)
            else {s: num_shards for s in splits})
  parts = {(p["split"], p["index"]): p for p in read_parts(out_dir)
           if p["num_shards"] == shards.get(p["split"])}
  missing = [(s, i) for s in splits for i in range(shards[s]) if (s, i) not in parts]
  if missing:
    return False
  split_infos, moments = [], {}
  for split in splits:
    lengths = [parts[(split, i)]["count"] for i in range(shards[split])]
    size = sum(parts[(split, i)]["num_bytes"] for i in range(shards[split]))
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=size))
    moments[split] = {k: Moments(shape[-1]) for k, shape in feature_shapes.items()}
    for i in range(shards[split]):
      for name, m in parts[(split, i)]["moments"].items():
        moments[split][name].merge(Moments.from_json(m))
  stats_split = STATS_SPLIT if STATS_SPLIT in moments else splits[0]
  stats = {"split": stats_split, "features": {}}
  for name, shape in feature_shapes.items():
    m = moments[stats_split][name]
    tokens = max(m.count, 1)
    stats["features"][name] = {
        "shape": list(shape), "dtype": str(np.dtype(dtype)),
        "count": m.count // shape[0], "tokens": m.count,
        "mean": m.mean.tolist(),
        "std": np.sqrt(m.m2 / max(m.count - 1, 1)).tolist(),
        "mean_norm": m.norm_sum / tokens}
  counts = {s: sum(parts[(s, i)]["count"] for i in range(shards[s])) for s in splits}
  present = [s for s in splits if counts[s] > 0] or list(splits)
  tfds.folder_dataset.write_metadata(
      data_dir=out_dir, features=features_spec(feature_shapes, dtype),
      split_infos=[s for s in split_infos if s.name in present], check_data=False,
      description="flowmap features dataset")
  _write_json_atomic(os.path.join(out_dir, "stats.json"), stats)
  manifest = dict(manifest or {})
  manifest["counts"] = {**manifest.get("counts", {}), "written": counts}
  manifest["features"] = {k: list(v) for k, v in feature_shapes.items()}
  manifest["dtype"] = str(np.dtype(dtype))
  manifest["num_shards"] = num_shards if isinstance(num_shards, int) else dict(shards)
  _write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)
  return True


def write_dataset(out_dir: str, splits: Mapping[str, Iterable[dict]],
                  feature_shapes: Mapping[str, Sequence[int]], dtype: str = "float16",
                  num_shards: int = 1, manifest: Optional[dict] = None) -> None:
  """Writes whole splits of in-memory examples ({key, caption, features}) round-robin into
  ``num_shards`` shards each; the demo and the tests use it."""
  os.makedirs(out_dir, exist_ok=True)
  for split, examples in splits.items():
    writers = [ShardWriter(out_dir, split, i, num_shards, feature_shapes, dtype)
               for i in range(num_shards)]
    for j, ex in enumerate(examples):
      writers[j % num_shards].add(ex["key"], ex.get("caption", ""), ex["features"])
    for w in writers:
      w.commit()
  if not finalize(out_dir, feature_shapes, list(splits), num_shards, dtype, manifest):
    raise DataError(f"{out_dir}: shards missing after writing")


def is_complete(data_dir: str) -> bool:
  return all(os.path.exists(os.path.join(data_dir, f))
             for f in ("dataset_info.json", "stats.json", "manifest.json"))


# ----------------------------------------------------------------------------- reading

def load_stats(data_dir: str) -> dict:
  path = os.path.join(data_dir, "stats.json")
  if not os.path.exists(path):
    raise DataError(f"{data_dir} is not a features dataset (no stats.json); "
                    "write one with extract_features.py")
  with open(path) as f:
    return json.load(f)


def feature_shape(stats: dict, name: str) -> tuple[int, int]:
  feats = stats["features"]
  if name not in feats:
    raise DataError(f"feature {name!r} is not in the dataset; it holds {sorted(feats)}")
  return tuple(feats[name]["shape"])


class Normalizer:
  """Maps raw features to the model's space and back; works on numpy and jax arrays.

  standardize: per-dimension (x - mean) / std from stats.json. l2: every token scaled to norm
  sqrt(dim), i.e. unit RMS per element like the noise (not unit norm, which would put the
  data far below the noise scale); decoding rescales to the mean raw token norm.
  """

  def __init__(self, kind: str, mean=None, std=None, mean_norm: float = 1.0):
    if kind not in NORMALIZATIONS:
      raise ValueError(f"unknown normalisation {kind!r}; expected one of {NORMALIZATIONS}")
    self.kind = kind
    self.mean = None if mean is None else np.asarray(mean, np.float32)
    self.std = None if std is None else np.maximum(np.asarray(std, np.float32), 1e-6)
    self.mean_norm = float(mean_norm)

  @classmethod
  def from_stats(cls, stats: dict, name: str, kind: str) -> "Normalizer":
    f = stats["features"][name]
    return cls(kind, f["mean"], f["std"], f.get("mean_norm", 1.0))

  def to_json(self) -> dict:
    return {"kind": self.kind, "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
            "mean_norm": self.mean_norm}

  @classmethod
  def from_json(cls, d: dict) -> "Normalizer":
    return cls(d["kind"], d["mean"], d["std"], d["mean_norm"])

  def encode(self, x):
    if self.kind == "standardize":
      return (x - self.mean) / self.std
    if self.kind == "l2":
      norm = (x * x).sum(-1, keepdims=True) ** 0.5
      return x / (norm + 1e-6) * math.sqrt(x.shape[-1])
    return x

  def decode(self, y):
    if self.kind == "standardize":
      return y * self.std + self.mean
    if self.kind == "l2":
      return y * (self.mean_norm / math.sqrt(y.shape[-1]))
    return y


def _subsplit(builder, split: str, limit: int) -> str:
  """``split[:limit]``; a limit at or beyond the split's size means the whole split."""
  if limit <= 0 or limit >= builder.info.splits[split].num_examples:
    return split
  return f"{split}[:{limit}]"


def _builder(data_dir: str):
  import tensorflow_datasets as tfds
  if not is_complete(data_dir):
    raise DataError(f"{data_dir} is not a complete features dataset (missing "
                    "dataset_info.json, stats.json or manifest.json)")
  return tfds.builder_from_directory(data_dir)


def split_size(data_dir: str, split: str) -> int:
  info = _builder(data_dir).info
  if split not in info.splits:
    raise DataError(f"{data_dir} has no {split!r} split; it has {list(info.splits)}")
  return info.splits[split].num_examples


def make_dataset(data_dir: str, split: str, names: Sequence[str], batch_size: int, *,
                 normalizers: Optional[Mapping[str, Normalizer]] = None,
                 shuffle: bool = True, repeat: bool = True, seed: int = 0,
                 limit: int = 0, cache_subset: bool = False, process_index: int = 0,
                 process_count: int = 1, skip_batches: int = 0, drop_remainder: bool = True,
                 shuffle_buffer: int = 10_000):
  """A tf.data pipeline of dicts name -> float32 [batch, tokens, dim] for this process.

  Every process reads its own even part of the split. The order is a function of ``seed``
  alone (deterministic shuffles), so ``skip_batches`` resumes a run on the batches it would
  have seen. ``limit`` > 0 keeps the first ``limit`` examples of the split (with
  ``cache_subset``: held in memory, as the overfitting check wants).
  """
  import tensorflow as tf
  import tensorflow_datasets as tfds
  builder = _builder(data_dir)
  if split not in builder.info.splits:
    raise DataError(f"{data_dir} has no {split!r} split; it has {list(builder.info.splits)}")
  sub = _subsplit(builder, split, limit)
  if process_count > 1:
    sub = tfds.even_splits(sub, n=process_count, drop_remainder=True)[process_index]
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = max(os.cpu_count() or 1, 1)
  read_config = tfds.ReadConfig(shuffle_seed=seed, options=options,
                                interleave_cycle_length=4 if shuffle else 1)
  ds = builder.as_dataset(split=sub, shuffle_files=shuffle and limit <= 0,
                          read_config=read_config,
                          decoders=tfds.decode.PartialDecoding({n: True for n in names}))
  normalizers = normalizers or {}

  def convert(ex):
    out = {}
    for n in names:
      x = tf.cast(ex[n], tf.float32)
      norm = normalizers.get(n)
      if norm is not None and norm.kind == "l2":   # tf tensors have no .sum()
        x = tf.math.l2_normalize(x, -1) * math.sqrt(x.shape[-1])
      elif norm is not None:
        x = norm.encode(x)
      out[n] = x
    return out

  ds = ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if cache_subset:
    ds = ds.cache()
  if repeat:
    ds = ds.repeat()
  if shuffle:
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if skip_batches:
    ds = ds.skip(skip_batches)
  return ds.prefetch(tf.data.AUTOTUNE)


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def train_batches(data_dir: str, split: str, names: Sequence[str], global_batch: int, *,
                  normalizers: Optional[Mapping[str, Normalizer]] = None, seed: int = 0,
                  limit: int = 0, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, shuffle_buffer: int = 10_000,
                  in_memory_bytes: int = 2 << 30) -> Iterator[dict]:
  """Endless training batches for this process: dicts name -> float32 [local, tokens, dim].

  The order is a function of (seed, step) only, so a resumed run gets the batches the
  uninterrupted run would have had. Training is organised in epochs of
  ``rows // global_batch`` steps, each with its own seed.

  * A split (or ``limit`` rows of it) under ``in_memory_bytes`` is held in memory by every
    process; each epoch draws one global permutation and process p takes its slice of each
    global batch. The batches are then identical whatever the process count, and resuming
    is free.
  * A larger split streams: each process reads its own even part of the files, shuffled per
    epoch (file order and a ``shuffle_buffer`` window, both seeded by the epoch). Resuming
    replays the current epoch up to the step, reading at most one epoch.
  """
  if global_batch % process_count:
    raise DataError(f"global batch {global_batch} does not split over {process_count} processes")
  local = global_batch // process_count
  builder = _builder(data_dir)
  if split not in builder.info.splits:
    raise DataError(f"{data_dir} has no {split!r} split; it has {list(builder.info.splits)}")
  rows = builder.info.splits[split].num_examples
  if limit > 0:
    rows = min(rows, limit)
  stats = load_stats(data_dir)
  row_bytes = sum(4 * int(np.prod(feature_shape(stats, n))) for n in names)
  if rows < global_batch:
    raise DataError(f"the {split!r} split has {rows} rows, fewer than one batch of "
                    f"{global_batch}")
  steps_per_epoch = rows // global_batch
  epoch, offset = divmod(start_step, steps_per_epoch)
  normalizers = normalizers or {}

  if rows * row_bytes <= in_memory_bytes:
    feats = load_features(data_dir, split, rows, names)
    arrays = {}
    for n in names:
      x = feats[n]
      norm = normalizers.get(n)
      arrays[n] = np.asarray(norm.encode(x) if norm is not None else x, np.float32)
    while True:
      order = np.random.default_rng(_epoch_seed(seed, epoch)).permutation(rows)
      for step in range(offset, steps_per_epoch):
        idx = order[step * global_batch + process_index * local:][:local]
        yield {n: a[idx] for n, a in arrays.items()}
      epoch, offset = epoch + 1, 0

  while True:
    ds = make_dataset(data_dir, split, names, local, normalizers=normalizers,
                      shuffle=True, repeat=False, seed=_epoch_seed(seed, epoch), limit=limit,
                      process_index=process_index, process_count=process_count,
                      shuffle_buffer=shuffle_buffer, skip_batches=offset)
    yield from itertools.islice(iterate_numpy(ds), steps_per_epoch - offset)
    epoch, offset = epoch + 1, 0


def iterate_numpy(ds) -> Iterator[dict]:
  import tensorflow_datasets as tfds
  return iter(tfds.as_numpy(ds))


def load_features(data_dir: str, split: str = "validation", limit: int = 0,
                  names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
  """Raw features of the first ``limit`` examples of a split (all when 0), name -> float32
  array [n, tokens, dim], plus ``key`` as an array of str. For notebooks."""
  stats = load_stats(data_dir)
  names = list(names or stats["features"])
  for n in names:
    feature_shape(stats, n)
  import tensorflow_datasets as tfds
  builder = _builder(data_dir)
  if split not in builder.info.splits:
    raise DataError(f"{data_dir} has no {split!r} split; it has {list(builder.info.splits)}")
  sub = _subsplit(builder, split, limit)
  ds = builder.as_dataset(split=sub, shuffle_files=False,
                          decoders=tfds.decode.PartialDecoding(
                              {**{n: True for n in names}, "key": True}))
  cols = {n: [] for n in names}
  keys = []
  for ex in tfds.as_numpy(ds):
    for n in names:
      cols[n].append(ex[n].astype(np.float32))
    keys.append(ex["key"].decode())
  out = {n: np.stack(v) if v else np.zeros((0, *feature_shape(stats, n)), np.float32)
         for n, v in cols.items()}
  out["key"] = np.asarray(keys)
  return out
