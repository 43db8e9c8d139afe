"""--mode map: a features dataset in, the same dataset with the mapped feature added out.

Every example of ``config.map.input`` goes through the run's Mapper into
``config.map.output``: the input's features, key and caption, plus the mapped feature
``<target><config.map.suffix>``, in the layout extraction writes. One output shard per input
shard, each written under a temporary name and renamed when complete; finished shards are
skipped, so the same command resumes an interrupted export, and ``map.json`` refuses to mix
exports made with other settings.
"""

from __future__ import annotations

import hashlib
import os
import re
import time

import jax
import numpy as np

from flowmap import data as data_lib
from flowmap.config import ConfigError
from flowmap.fileio import read_json, write_json_atomic
from flowmap.mapper import Mapper
from flowmap.metrics import cosine


_SHARD_RE = re.compile(re.escape(data_lib.DATASET_NAME) +
                       r"-(?P<split>[^.]+)\.tfrecord-(?P<index>\d{5})-of-(?P<num>\d{5})$")


def input_shards(data_dir: str) -> dict[str, int]:
  """split -> number of shards of a features dataset, from its shard file names."""
  shards = {}
  for name in os.listdir(data_dir):
    m = _SHARD_RE.match(name)
    if m:
      num = int(m["num"])
      if shards.setdefault(m["split"], num) != num:
        raise data_lib.DataError(f"{data_dir}: split {m['split']!r} has shards of two "
                                 "different counts")
  return shards


def read_shard(path: str, shapes: dict, dtype: str, batch_size: int):
  """Batches of one TFRecord shard in file order: dicts of numpy arrays (features in their
  stored dtype) plus ``key`` and ``caption`` as str arrays."""
  tf = data_lib.tensorflow()
  spec = data_lib.features_spec(shapes, dtype)
  ds = tf.data.TFRecordDataset(path).map(spec.deserialize_example,
                                         num_parallel_calls=tf.data.AUTOTUNE,
                                         deterministic=True)
  for batch in ds.batch(batch_size).prefetch(2).as_numpy_iterator():
    batch["key"] = np.asarray([k.decode() for k in batch["key"]])
    batch["caption"] = np.asarray([c.decode() for c in batch["caption"]])
    yield batch


def shard_seed(seed: int, split: str, index: int) -> int:
  """The noise seed of one shard: a function of (seed, split, shard), so a resumed or
  re-run shard draws the same noise and no two shards share it."""
  digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _map_record(config, workdir: str, mapper: Mapper, out_name: str) -> dict:
  e = config.eval
  return {"workdir": os.path.abspath(workdir), "step": mapper.step,
          "weights": "ema" if mapper.ema else "raw", "source": mapper.source,
          "target": mapper.target, "feature": out_name, "mode": config.map.mode,
          "solver": e.solver,
          "evaluations": int(e.steps), "guidance": float(e.guidance), "seed": int(config.seed),
          "input": os.path.abspath(config.map.input)}


def map_dataset(config, workdir: str) -> dict:
  """--mode map: every example of ``config.map.input`` through the run in ``workdir`` into
  ``config.map.output``: the input's features, key and caption, plus the mapped feature
  ``<target><config.map.suffix>``. One output shard per input shard; finished shards are
  skipped, so the same command resumes an interrupted export."""
  from tqdm import tqdm
  m = config.map
  if not m.input or not m.output:
    raise ConfigError("--mode map needs --config.map.input=<features dataset> and "
                            "--config.map.output=<directory to write>")
  if os.path.abspath(m.input) == os.path.abspath(m.output):
    raise ConfigError("config.map.output must differ from config.map.input")
  if not data_lib.is_complete(m.input):
    raise ConfigError(f"config.map.input {m.input!r} is not a complete features "
                            "dataset (extract one with extract_features.py)")
  try:
    mapper = Mapper.from_workdir(workdir, ema=m.get("ema", True))
  except FileNotFoundError as e:
    raise ConfigError(f"{e}; train a run in --workdir first") from None
  mapper.check_guidance(float(config.eval.guidance))
  stats = data_lib.load_stats(m.input)
  in_shapes = {k: tuple(v["shape"]) for k, v in stats["features"].items()}
  if mapper.source not in in_shapes:
    raise ConfigError(f"{m.input} has no feature {mapper.source!r} (the run's source); "
                            f"it holds {sorted(in_shapes)}")
  if in_shapes[mapper.source] != mapper.source_shape:
    raise ConfigError(f"feature {mapper.source!r} in {m.input} has shape "
                            f"{in_shapes[mapper.source]}, the run expects {mapper.source_shape}")
  out_name = mapper.target + m.suffix
  if out_name in in_shapes:
    raise ConfigError(f"{m.input} already holds a feature {out_name!r}; choose another "
                            "--config.map.suffix")
  dtype = stats["features"][mapper.source].get("dtype", "float16")
  shapes = {**in_shapes, out_name: mapper.target_shape}
  shards = input_shards(m.input)
  record = _map_record(config, workdir, mapper, out_name)
  os.makedirs(m.output, exist_ok=True)
  record_path = os.path.join(m.output, "map.json")
  if os.path.exists(record_path):
    previous = read_json(record_path)
    if previous != record:
      changed = sorted(k for k in record if previous.get(k) != record[k])
      raise ConfigError(f"{m.output} holds an export made with different settings "
                              f"({', '.join(changed)}); use a new --config.map.output")
  elif jax.process_index() == 0:
    write_json_atomic(record_path, record)

  pc, pi = jax.process_count(), jax.process_index()
  todo = [(s, i, n) for s, n in sorted(shards.items()) for i in range(n) if i % pc == pi]
  counts = {(p["split"], p["index"]): p["count"] for p in data_lib.read_parts(m.input)}
  total = sum(counts.get((s, i), 0) for s, i, _ in todo) or None
  written = skipped = rows = nonfinite = 0
  cos_sum, cos_tokens = 0.0, 0
  start_time = time.perf_counter()
  bar = tqdm(total=total, desc="map", unit="row", dynamic_ncols=True, mininterval=2,
             disable=pi != 0)
  for split, index, num in todo:
    if data_lib.shard_done(m.output, split, index, num):
      skipped += 1
      bar.update(counts.get((split, index), 0))
      continue
    writer = data_lib.ShardWriter(m.output, split, index, num, shapes, dtype)
    try:
      seed = shard_seed(int(config.seed), split, index)
      path = os.path.join(m.input, data_lib.shard_name(split, index, num))
      offset = 0
      for batch in read_shard(path, in_shapes, dtype, m.batch_size):
        n = len(batch["key"])
        # Rows are numbered from the shard's start: the noise is a function of
        # (shard, row), however the shard is read in batches.
        mapped = mapper.map(batch[mapper.source], seed=seed, first_row=offset,
                            mode=m.mode,
                            batch_size=m.batch_size)
        offset += n
        if mapper.target in batch:
          cos = cosine(mapped, batch[mapper.target].astype(np.float32))
          cos_sum, cos_tokens = cos_sum + float(np.nansum(cos)), cos_tokens + cos.size
        for j in range(n):
          feats = {k: batch[k][j] for k in in_shapes}
          feats[out_name] = mapped[j]
          try:
            writer.add(batch["key"][j], batch["caption"][j], feats)
            rows += 1
          except ValueError:   # a non-finite mapped row: counted, never written
            nonfinite += 1
        bar.update(n)
      writer.commit()
      written += 1
    except BaseException:
      writer.abort()
      raise
  bar.close()
  if pc > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("map-done")
  if pi == 0:
    manifest = {}
    manifest_path = os.path.join(m.input, "manifest.json")
    if os.path.exists(manifest_path):
      manifest = read_json(manifest_path)
    manifest["mapped"] = {**manifest.get("mapped", {}), out_name: record}
    if not data_lib.finalize(m.output, shapes, sorted(shards), shards, dtype, manifest):
      raise data_lib.DataError(f"{m.output}: shards missing after mapping")
  seconds = time.perf_counter() - start_time
  result = {"map/rows": float(rows), "map/shards_written": float(written),
            "map/shards_skipped": float(skipped), "map/nonfinite_rows": float(nonfinite),
            "map/rows_per_s": rows / seconds if seconds > 0 else 0.0}
  if cos_tokens:
    result["map/cosine_token"] = cos_sum / cos_tokens
  if pi == 0:
    print(f"mapped {rows} rows ({written} shards written, {skipped} already done) into "
          f"{os.path.abspath(m.output)} as {out_name!r}")
  return result

