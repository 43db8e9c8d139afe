"""Features datasets: the one writer (extraction and the demo share it), the reader, and the
normalisation statistics.

On disk a features dataset is a directory that ``tfds.builder_from_directory`` reads:

  flowmap_features-<split>.tfrecord-<i>-of-<n>   TFRecord shards of tf.train.Example
  dataset_info.json, features.json                tfds metadata
  stats.json                                      per feature: shape, count, mean, std
  manifest.json                                   encoders, inputs, counts written/skipped
  parts/<split>-<i>-of-<n>.json                   per-shard count and moments (for merging)

Each example holds every feature as raw float16 (or bfloat16, float32) bytes plus ``key``
and ``caption``. A shard is written under a temporary name and renamed when complete, so a
reader never sees a partial shard. TensorFlow is imported lazily, through ``tensorflow()``:
sampling code that only needs ``Normalizer`` or ``load_stats`` does not pay for it.

Training reads features in their stored dtype and leaves normalisation to the jitted step:
half the bytes of float32 on the host and on the way to the device.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import resource
import sys
import time
import uuid
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from flowmap.config import NORMALIZATIONS, DataError

DATASET_NAME = "flowmap_features"
STATS_SPLIT = "train"

_TF = None


def tensorflow():
  """TensorFlow, imported on first use with every GPU hidden from it.

  flowmap uses TensorFlow only to read and write files on the host; a TensorFlow that sees
  the GPUs reserves their memory before JAX can. Every TensorFlow use goes through here.
  """
  global _TF
  if _TF is None:
    import tensorflow as tf
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:   # TensorFlow already placed work on its devices in this process
      logging.warning("TensorFlow was initialised before flowmap.data.tensorflow() could "
                      "hide the GPUs from it; it may hold GPU memory")
    _TF = tf
  return _TF


def _tfds():
  tensorflow()   # first, so that tensorflow_datasets' own import finds the GPUs hidden
  import tensorflow_datasets as tfds
  return tfds


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
  tfds = _tfds()
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
    tf = tensorflow()
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
  tfds = _tfds()
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
  data far below the noise scale); decoding rescales to the mean raw token norm. unit: every
  token scaled to norm 1, the earlier attempts' and BLIP3-o's choice, kept for comparison
  (``python -m flowmap.ablation``): each coordinate is about 1/sqrt(dim) of the noise's.
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
    """Raw features (numpy or jax, any float dtype) -> the model's space, in at least
    float32. Training calls it inside the jitted step on the stored float16/bfloat16 batch:
    the statistics are float32 constants, and the l2 sum of squares of 1024 float16
    values would overflow float16."""
    if np.dtype(x.dtype).itemsize < 4:
      x = x.astype(np.float32)
    if self.kind == "standardize":
      return (x - self.mean) / self.std
    if self.kind in ("l2", "unit"):
      norm = (x * x).sum(-1, keepdims=True) ** 0.5
      return x / (norm + 1e-6) * (math.sqrt(x.shape[-1]) if self.kind == "l2" else 1.0)
    return x

  def decode(self, y):
    if self.kind == "standardize":
      return y * self.std + self.mean
    if self.kind == "l2":
      return y * (self.mean_norm / math.sqrt(y.shape[-1]))
    if self.kind == "unit":
      return y * self.mean_norm
    return y


def _builder(data_dir: str):
  if not is_complete(data_dir):
    raise DataError(f"{data_dir} is not a complete features dataset (missing "
                    "dataset_info.json, stats.json or manifest.json)")
  return _tfds().builder_from_directory(data_dir)


def split_info(data_dir: str, split: str):
  """tfds' SplitInfo of a split or of a split string (``train[:100]``,
  ``train[10:20]+train[500:510]``): its ``num_examples`` and the file instructions that
  say which records it holds."""
  splits = _builder(data_dir).info.splits
  for name in {part.split("[")[0] for part in split.split("+")}:
    if name not in splits:
      raise DataError(f"{data_dir} has no {name!r} split; it has {list(splits)}")
  return splits[split]


def split_size(data_dir: str, split: str) -> int:
  return split_info(data_dir, split).num_examples


def _subsplit(builder, split: str, limit: int) -> str:
  """``split[:limit]``; a limit at or beyond the split's size means the whole split."""
  if limit <= 0 or limit >= builder.info.splits[split].num_examples:
    return split
  return f"{split}[:{limit}]"


# ----------------------------------------------------------------------------- the reader
#
# The reader works on serialised records and decodes only what a batch needs. A process's
# rows are a list of segments (file, first record, records) in file order; reading a
# segment opens its file and skips to the first record. TFRecord has no index, so a skip
# reads every record header before it: with the read buffer off (rows of 64 KiB and more),
# that is 12 bytes a record, where a buffer smaller than a record would refill itself, 256
# KiB, for every record skipped.

DEFAULT_SHUFFLE_BUFFER_MB = 512
READ_STREAMS = 64       # places of a process's rows that every shuffle window draws from
PARALLEL_READS = 8      # of those, read at once
_UNBUFFERED_ROW_BYTES = 64 << 10
# The shuffle holds about this many windows at once: the one batches are gathered from, the
# next one (prefetched, so an epoch boundary or a slow file never stalls the step), and the
# records being read into the one after.
_WINDOWS_HELD = 3


class _Rows:
  """One process's rows of a split (or split string), and how to decode them."""

  def __init__(self, data_dir: str, split: str, names: Sequence[str], limit: int = 0,
               process_index: int = 0, process_count: int = 1):
    info = split_info(data_dir, split)
    stats = load_stats(data_dir)
    self.names = list(names)
    self.shapes = {n: feature_shape(stats, n) for n in self.names}
    self.dtypes = {n: stats["features"][n].get("dtype", "float16") for n in self.names}
    self.row_bytes = row_bytes(stats, self.names)
    self.split_rows = info.num_examples if limit <= 0 else min(limit, info.num_examples)
    self.count = self.split_rows // process_count   # every process the same (tfds' even split)
    first = process_index * self.count
    instructions = info.file_instructions
    self.files = [fi.filename for fi in instructions]
    segments, start = [], 0
    for i, fi in enumerate(instructions):   # this process's [first, first + count) rows
      lo, hi = max(first, start), min(first + self.count, start + fi.take)
      if lo < hi:
        segments.append((i, fi.skip + lo - start, hi - lo))
      start += fi.take
    self.segments = np.asarray(segments, np.int64).reshape(-1, 3)

  def records(self, pieces: np.ndarray):
    """A tf.data.Dataset of the serialised records of ``pieces`` ([n, 3]: file index, first
    record, records; a tensor or an array), in that order."""
    tf = tensorflow()
    files = tf.constant(self.files)
    buffer = 0 if self.row_bytes >= _UNBUFFERED_ROW_BYTES else None

    def piece(f, first, count):
      return tf.data.TFRecordDataset(tf.gather(files, f), buffer_size=buffer).skip(
          first).take(count)
    return tf.data.Dataset.from_tensor_slices(
        (pieces[:, 0], pieces[:, 1], pieces[:, 2])).flat_map(piece)

  def decoder(self):
    """[batch] serialised records -> {name: [batch, tokens, dim] in the stored dtype}. A
    whole batch at a time: one parse, one copy per feature."""
    tf = tensorflow()
    spec = {n: tf.io.FixedLenFeature([], tf.string) for n in self.names}
    dtypes = {n: tf.as_dtype(d) for n, d in self.dtypes.items()}

    def decode(records):
      examples = tf.io.parse_example(records, spec)
      return {n: tf.reshape(tf.io.decode_raw(examples[n], dtypes[n]), [-1, *self.shapes[n]])
              for n in self.names}
    return decode


def _itemsize(dtype: str) -> int:
  return np.dtype({"bfloat16": "uint16"}.get(dtype, dtype)).itemsize


def row_bytes(stats: dict, names: Sequence[str]) -> int:
  """Bytes one row of these features takes in the stored dtype."""
  return sum(int(np.prod(feature_shape(stats, n)))
             * _itemsize(stats["features"][n].get("dtype", "float16")) for n in names)


class _Shuffle:
  """The geometry of the streamed training order, for one process.

  Each epoch permutes the process's blocks (its segments, or pieces of them when it has
  few files) with the epoch's seed and lays them end to end; the first ``epoch_records``
  rows of that sequence are cut into ``streams`` runs of near-equal length, read in
  parallel front to back. Window k takes rows [k * take, (k + 1) * take) of every run and
  is cut into whole batches in an order drawn for (epoch, k): every batch mixes up to
  ``streams`` places of the split, every row is seen once an epoch, and a run resumed at
  step s of an epoch starts each stream at window s * batch // window, reading one window
  before its first batch.

  A window holds whole batches (at least one, however small the buffer), so that batches
  are gathered from it in one copy, never assembled record by record.
  """

  def __init__(self, rows: _Rows, batch: int, epoch_records: int, buffer_bytes: int):
    wanted = max(1, buffer_bytes // (_WINDOWS_HELD * max(rows.row_bytes, 1)))
    self.streams = min(READ_STREAMS, wanted)
    unit = batch // math.gcd(self.streams, batch)   # takes of this many make whole batches
    self.take = max(unit, wanted // self.streams // unit * unit)
    self.window = self.streams * self.take
    self.epoch_records = epoch_records
    self.lengths = np.diff(np.arange(self.streams + 1) * epoch_records // self.streams)
    self.windows = -(-int(self.lengths.max()) // self.take)
    blocks = rows.segments
    if len(blocks) < 2 * self.streams:   # few files: cut them, so that epochs mix
      size = max(1, -(-rows.count // (2 * self.streams)))
      blocks = np.asarray([(f, s + a, min(size, n - a)) for f, s, n in blocks
                           for a in range(0, n, size)], np.int64).reshape(-1, 3)
    self.blocks = blocks

  def window_sizes(self, first: int) -> np.ndarray:
    k = np.arange(first, self.windows)[:, None]
    return np.clip(self.lengths[None] - k * self.take, 0, self.take).sum(1)

  def epoch(self, key: Sequence[int], first_window: int):
    """(pieces [n, 4]: stream, file, first record, records; the emission order of every
    window from ``first_window`` on, concatenated) for the epoch that ``key`` (seed,
    epoch, process) names. Each window draws from a seed of its own, so that a resumed
    epoch skips the earlier windows without drawing them."""
    blocks = self.blocks[np.random.default_rng(key).permutation(len(self.blocks))]
    ends = np.cumsum(blocks[:, 2])
    pieces = []
    for i, length in enumerate(self.lengths):
      lo = i * self.epoch_records // self.streams
      at, hi = lo + min(first_window * self.take, length), lo + length
      j = int(np.searchsorted(ends, at, side="right"))
      while at < hi:
        f, first, n = blocks[j]
        skip = at - (ends[j] - n)
        count = min(n - skip, hi - at)
        pieces.append((i, f, first + skip, count))
        at += count
        j += 1
    order = np.concatenate([np.random.default_rng([*key, k]).permutation(int(n)) for k, n in
                            enumerate(self.window_sizes(first_window), first_window)])
    return np.asarray(pieces, np.int64).reshape(-1, 4), order.astype(np.int64)


def _options():
  tf = tensorflow()
  options = tf.data.Options()
  options.deterministic = True   # the training order is a function of (seed, step)
  return options


def make_dataset(data_dir: str, split: str, names: Sequence[str], batch_size: int, *,
                 shuffle: bool = True, repeat: bool = True, seed: int = 0, limit: int = 0,
                 start_step: int = 0, process_index: int = 0, process_count: int = 1,
                 drop_remainder: bool = True,
                 shuffle_buffer_bytes: int = DEFAULT_SHUFFLE_BUFFER_MB << 20):
  """A tf.data pipeline of this process's batches: dicts name -> [batch, tokens, dim] in
  the stored dtype.

  Every process reads its own even part of the first ``limit`` rows (all when 0).
  Unshuffled, the rows come in file order. Shuffled, they come in epochs of
  ``rows // (batch_size * process_count)`` batches, in an order that is a function of
  (``seed``, epoch) only (see ``_Shuffle``), held in about ``shuffle_buffer_bytes`` of
  serialised records (at least three batches), always whole batches; ``start_step`` is the
  first batch (the training step), reached by skipping serialised records.
  ``repeat=False`` ends after one pass (shuffled: the epoch of ``start_step``).
  """
  tf = tensorflow()
  rows = _Rows(data_dir, split, names, limit, process_index, process_count)
  if shuffle:
    global_batch = batch_size * process_count
    steps_per_epoch = rows.split_rows // global_batch
    if steps_per_epoch == 0:
      raise DataError(f"the {split!r} split has {rows.split_rows} rows, fewer than one "
                      f"batch of {global_batch}")
    order = _Shuffle(rows, batch_size, steps_per_epoch * batch_size, shuffle_buffer_bytes)
    first_epoch, step = divmod(start_step, steps_per_epoch)
    first_window, skip = divmod(step * batch_size, order.window)

    def plan(epoch):
      epoch = int(epoch)
      return order.epoch([seed, epoch, process_index],
                         first_window if epoch == first_epoch else 0)

    def epoch_plan(epoch):
      # numpy, once an epoch; Dataset.from_generator in its place doubled the CPU time a
      # row costs downstream
      pieces, emission = tf.numpy_function(plan, [epoch], (tf.int64, tf.int64),
                                           stateful=False)
      return tf.ensure_shape(pieces, [None, 4]), tf.ensure_shape(emission, [None])

    def windows(pieces, emission):
      def stream(i):
        return rows.records(tf.boolean_mask(pieces[:, 1:], pieces[:, 0] == i))
      records = tf.data.Dataset.range(order.streams).interleave(
          stream, cycle_length=order.streams, block_length=order.take,
          num_parallel_calls=min(order.streams, PARALLEL_READS), deterministic=True)
      return tf.data.Dataset.zip(records.batch(order.window).prefetch(1),
                                 tf.data.Dataset.range(order.windows)).flat_map(
          lambda window, j: batches(window, emission[j * order.window:]))

    def batches(window, emission):
      return tf.data.Dataset.range(tf.shape(window, tf.int64)[0] // batch_size).map(
          lambda b: tf.gather(window, emission[b * batch_size:][:batch_size]))

    epochs = tf.data.Dataset.range(first_epoch, first_epoch + 1 if not repeat else 1 << 62)
    ds = epochs.map(epoch_plan).flat_map(windows).skip(skip // batch_size)
  else:
    ds = rows.records(rows.segments)
    if repeat:
      ds = ds.repeat()
    ds = ds.skip(start_step * batch_size).batch(batch_size, drop_remainder=drop_remainder)
  # Decoded in a thread of its own, one batch ahead of the consumer: a batch decoding takes
  # three times its size for a moment (records, parsed bytes, arrays), so no more at once.
  ds = ds.map(rows.decoder(), num_parallel_calls=1, deterministic=True)
  return ds.with_options(_options())


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def read_rows(data_dir: str, split: str, names: Sequence[str], rows: int = 0) -> dict:
  """The first ``rows`` rows (all when 0) of a split or split string, name -> [rows, tokens,
  dim] in the stored dtype, filled in place (no float32 copy, no list of batches)."""
  rows = rows or split_info(data_dir, split).num_examples
  out = None
  at = 0
  for batch in iterate_numpy(make_dataset(data_dir, split, names, 256, shuffle=False,
                                          repeat=False, limit=rows, drop_remainder=False)):
    if out is None:
      out = {n: np.empty((rows, *b.shape[1:]), b.dtype) for n, b in batch.items()}
    n = len(next(iter(batch.values())))
    for name, b in batch.items():
      out[name][at:at + n] = b
    at += n
  return out


def train_batches(data_dir: str, split: str, names: Sequence[str], global_batch: int, *,
                  seed: int = 0, limit: int = 0, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, in_memory_bytes: int = 2 << 30,
                  shuffle_buffer_bytes: int = DEFAULT_SHUFFLE_BUFFER_MB << 20) -> Iterator[dict]:
  """Endless training batches for this process: dicts name -> [local, tokens, dim] in the
  stored dtype (float16 or bfloat16), raw; the train step normalises them on the device.

  The order is a function of (seed, step) only, so a resumed run gets the batches the
  uninterrupted run would have had. Training is organised in epochs of
  ``rows // global_batch`` steps, each with its own seed.

  * A split (or ``limit`` rows of it) up to ``in_memory_bytes`` (stored dtype) is held in
    memory by every process; each epoch draws one global permutation and process p takes
    its slice of each global batch. The batches are then identical whatever the process
    count, and resuming is free.
  * A larger split streams (``make_dataset``): each process reads its own part, shuffled in
    windows of serialised records that take ``shuffle_buffer_bytes`` together. Resuming
    reads one window and the record headers before the step, not the epoch.
  """
  if global_batch % process_count:
    raise DataError(f"global batch {global_batch} does not split over {process_count} processes")
  local = global_batch // process_count
  rows = _Rows(data_dir, split, names, limit)
  if rows.split_rows < global_batch:
    raise DataError(f"the {split!r} split has {rows.split_rows} rows, fewer than one batch "
                    f"of {global_batch}")
  if rows.split_rows * rows.row_bytes <= in_memory_bytes:
    return _in_memory_batches(read_rows(data_dir, split, names, rows.split_rows),
                              rows.split_rows, global_batch, seed, start_step,
                              process_index, local)
  return iterate_numpy(make_dataset(
      data_dir, split, names, local, seed=seed, limit=limit, start_step=start_step,
      process_index=process_index, process_count=process_count,
      shuffle_buffer_bytes=shuffle_buffer_bytes))


def _in_memory_batches(arrays: dict, rows: int, global_batch: int, seed: int,
                       start_step: int, process_index: int, local: int) -> Iterator[dict]:
  steps_per_epoch = rows // global_batch
  epoch, offset = divmod(start_step, steps_per_epoch)
  while True:
    order = np.random.default_rng(_epoch_seed(seed, epoch)).permutation(rows)
    for step in range(offset, steps_per_epoch):
      idx = order[step * global_batch + process_index * local:][:local]
      yield {n: a[idx] for n, a in arrays.items()}
    epoch, offset = epoch + 1, 0


def iterate_numpy(ds) -> Iterator[dict]:
  return iter(_tfds().as_numpy(ds))


def iterate_split(data_dir: str, split: str, names: Sequence[str],
                  batch_size: int = 64) -> Iterator[dict]:
  """numpy batches (stored dtype, the last one short) of a split or split string, in its
  order: one bounded pass, e.g. over rows spread across the shards."""
  return iterate_numpy(make_dataset(data_dir, split, names, batch_size, shuffle=False,
                                    repeat=False, drop_remainder=False))


def load_features(data_dir: str, split: str = "validation", limit: int = 0,
                  names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
  """Raw features of the first ``limit`` examples of a split (all when 0), name -> float32
  array [n, tokens, dim], plus ``key`` as an array of str. For notebooks."""
  stats = load_stats(data_dir)
  names = list(names or stats["features"])
  for n in names:
    feature_shape(stats, n)
  tfds = _tfds()
  split_info(data_dir, split)
  builder = _builder(data_dir)
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


# ----------------------------------------------------------------------------- measuring

def measure_input(data_dir: str, names: Sequence[str], batch: int, *, batches: int = 20,
                  split: str = "train", seed: int = 0,
                  shuffle_buffer_bytes: int = DEFAULT_SHUFFLE_BUFFER_MB << 20) -> dict:
  """The streamed input path's figures on a dataset, as a training process sees them:
  ``first_batch_s`` (building the pipeline and filling the first window),
  ``samples_per_s`` and ``mib_per_s`` over ``batches`` batches after the first,
  ``cpu_ms_per_sample`` (all threads: what a rate costs in cores, on a shared machine the
  steadier figure), and
  ``peak_rss_gib``, this process's peak resident memory so far (so run it in a process of
  its own, or early, to read the pipeline's share)."""
  start = time.perf_counter()
  stream = train_batches(data_dir, split, names, batch, seed=seed, in_memory_bytes=0,
                         shuffle_buffer_bytes=shuffle_buffer_bytes)
  next(stream)
  first = time.perf_counter() - start
  start, cpu = time.perf_counter(), _cpu_s()
  for _ in range(batches):
    next(stream)
  rate = batches * batch / (time.perf_counter() - start)
  cpu_ms = (_cpu_s() - cpu) * 1e3 / (batches * batch)
  peak_bytes = peak_rss_bytes()
  return {"first_batch_s": first, "samples_per_s": rate, "cpu_ms_per_sample": cpu_ms,
          "mib_per_s": rate * _Rows(data_dir, split, names).row_bytes / 2 ** 20,
          "peak_rss_gib": peak_bytes / 2 ** 30, "batch": batch, "batches": batches,
          "shuffle_buffer_mb": shuffle_buffer_bytes / 2 ** 20}


def peak_rss_bytes() -> int:
  """This process's peak resident memory. Linux's VmHWM (the high-water mark of this
  program's own memory) where there is one: getrusage's ru_maxrss carries the peak of the
  process that was replaced by exec, so a child spawned by a large parent would report the
  parent's size."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) << 10
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
  return peak if sys.platform == "darwin" else peak << 10


def _cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime
