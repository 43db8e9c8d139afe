"""Mapper: a trained run as a function from raw source features to raw target features.

  from flowmap import Mapper, load_features
  feats = load_features("data/feats", split="validation", limit=256)
  m = Mapper.from_workdir("runs/x")                  # newest checkpoint, EMA weights
  y = m.map(feats["eva"], steps=8, solver="heun")    # np.ndarray in the raw target space

A Mapper reads the run's ``config.json`` and ``normalization.json`` and restores only the
weights it uses from the orbax checkpoint; it never imports TensorFlow or PyTorch. The noise
of row i of a call is drawn on the device from (seed, i), so a row maps to the same output
whatever the batch size, the number of rows in the call, or the number of devices.

``map_dataset`` (``main.py --mode map``) maps every example of a features dataset and writes a
new one with the mapped feature added, one output shard per input shard, resumably.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from flax import nnx

from flowmap import data as data_lib
from flowmap import evaluate as evaluate_lib
from flowmap import metrics as metrics_lib
from flowmap import model as model_lib
from flowmap import sharding


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} is not a flowmap run (no config.json)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def read_normalization(workdir: str) -> dict:
  path = os.path.join(workdir, "normalization.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} is not a flowmap run (no normalization.json)")
  with open(path) as f:
    return json.load(f)


def read_normalizers(workdir: str) -> Optional[dict]:
  """The normalisers the run was trained with, or None for a workdir without them."""
  try:
    info = read_normalization(workdir)
  except FileNotFoundError:
    return None
  return {role: data_lib.Normalizer.from_json(info[f"{role}_normalizer"])
          for role in ("source", "target")}


def abstract_weights(model_cfg: model_lib.ModelConfig, seed: int = 0):
  """(graphdef, parameter shapes) of the model, allocating nothing."""
  return nnx.split(nnx.eval_shape(lambda: model_lib.NextDiT(model_cfg,
                                                             rngs=nnx.Rngs(params=seed))))


def restore_weights(checkpointer, abstract: dict, shardings: dict,
                    step: Optional[int] = None) -> tuple[int, dict]:
  """Restores only the named entries of the train state (e.g. {'ema': shapes}) at ``step``
  (default: newest), each placed with its sharding; the optimizer state stays on disk."""
  import orbax.checkpoint as ocp
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
  if step not in checkpointer.all_steps():
    raise FileNotFoundError(f"no checkpoint for step {step} in {checkpointer.directory}; "
                            f"it has {checkpointer.all_steps()}")
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)
  restored = checkpointer.manager.restore(step, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  return int(step), {k: restored[k] for k in abstract}


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


class Mapper:
  """Maps raw source features [n, tokens, dim] to raw target features with the ODE sampler.

  Attributes users read: ``source``/``target`` (feature names), ``source_shape``,
  ``target_shape``, ``step``, ``ema``, ``config`` (the run's ConfigDict), ``data_dir``.
  """

  def __init__(self, graphdef, params, config, model_cfg, normalizers: dict, mesh,
               step: int, ema: bool, workdir: str = ""):
    self.graphdef, self.params, self.config = graphdef, params, config
    self.model_cfg, self.normalizers, self.mesh = model_cfg, normalizers, mesh
    self.step, self.ema, self.workdir = step, ema, workdir
    self.source, self.target = config.data.source, config.data.target
    self.source_shape = tuple(model_cfg.source_shape)
    self.target_shape = tuple(model_cfg.target_shape)
    self._samplers = {}

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None, ema: bool = True,
                   devices=None) -> "Mapper":
    """The run in ``workdir`` at checkpoint ``step`` (default: newest), with its EMA weights
    (``ema=False``: the raw training weights), replicated over ``devices`` (default: this
    process's devices), batches split between them."""
    from flowmap import checkpoint as checkpoint_lib
    config = read_config(workdir)
    info = read_normalization(workdir)
    model_cfg = model_lib.config_from(config.model, info["source_shape"], info["target_shape"])
    normalizers = {role: data_lib.Normalizer.from_json(info[f"{role}_normalizer"])
                   for role in ("source", "target")}
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}),
                              devices if devices is not None else jax.local_devices())
    graphdef, shapes = abstract_weights(model_cfg, config.get("seed", 0))
    which = "ema" if ema else "params"
    checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
    try:
      step, weights = restore_weights(
          checkpointer, {which: shapes},
          {which: jax.tree.map(lambda _: sharding.replicated(mesh), shapes)}, step)
    finally:
      checkpointer.close()
    return cls(graphdef, weights[which], config, model_cfg, normalizers, mesh, step, ema,
               workdir)

  @property
  def data_dir(self) -> str:
    """The features dataset the run was trained on (the demo's lives in the workdir)."""
    return self.config.data.dir or os.path.join(self.workdir, "data")

  def __repr__(self) -> str:
    return (f"Mapper({self.source} {self.source_shape} -> {self.target} {self.target_shape}, "
            f"step {self.step}, {'EMA' if self.ema else 'raw'} weights, "
            f"{self.mesh.devices.size} device(s))")

  def _sampler(self, solver: str, evaluations: int, guidance: float):
    key = (solver, evaluations, guidance)
    if key not in self._samplers:
      self._samplers[key] = evaluate_lib.make_row_sampler(
          self.graphdef, self.target_shape, solver, evaluations, guidance)
    return self._samplers[key]

  def check_guidance(self, guidance: float) -> None:
    if guidance != 1.0 and not self.config.flow.get("cond_dropout", 0.0) > 0:
      raise ValueError(f"guidance {guidance} needs the unconditional velocity, but this run "
                       "was trained with flow.cond_dropout = 0; use guidance=1")

  def map(self, x, steps: Optional[int] = None, solver: Optional[str] = None,
          guidance: Optional[float] = None, seed: int = 0, batch_size: int = 256,
          first_row: int = 0) -> np.ndarray:
    """Raw target features [n, *target_shape] (float32) for raw source features
    [n, *source_shape] (one [*source_shape] row gives one [*target_shape] row).

    ``steps`` counts model evaluations, as ``eval.steps`` does (heun: 2 per step, so even);
    ``steps``, ``solver`` and ``guidance`` default to the run's ``eval`` config. The noise of
    row i depends only on (seed, first_row + i), so mapping an array in pieces (passing
    each piece's ``first_row``) equals mapping it whole; ``batch_size`` only trades memory
    for speed. Each batch shape compiles once and is reused.
    """
    e = self.config.eval
    solver = solver or e.solver
    evaluations = int(steps or e.steps)
    guidance = float(e.guidance if guidance is None else guidance)
    self.check_guidance(guidance)
    x = np.asarray(x, np.float32)
    single = x.ndim == len(self.source_shape)
    if single:
      x = x[None]
    if x.shape[1:] != self.source_shape:
      raise ValueError(f"expected raw {self.source} features of shape [n, "
                       f"{', '.join(map(str, self.source_shape))}], got {list(x.shape)}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= seed < 2 ** 31:
      raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    if not 0 <= first_row or first_row + len(x) >= 2 ** 31:
      raise ValueError(f"first_row must be in [0, 2**31 - n), got {first_row}")
    n = len(x)
    out = np.empty((n, *self.target_shape), np.float32)
    if n == 0:
      return out[0] if single else out
    fn = self._sampler(solver, evaluations, guidance)
    rows_per_batch = _round_up(min(batch_size, n), self.mesh.devices.size)
    batch = sharding.batch_sharding(self.mesh)
    pending = None

    def collect(start, real, y):
      out[start:start + real] = np.asarray(y)[:real]

    for start in range(0, n, rows_per_batch):
      src = np.asarray(self.normalizers["source"].encode(x[start:start + rows_per_batch]),
                       np.float32)
      real = len(src)
      if real < rows_per_batch:
        src = np.concatenate([src, np.repeat(src[-1:], rows_per_batch - real, 0)])
      rows = np.arange(first_row + start, first_row + start + rows_per_batch, dtype=np.int32)
      y = fn(self.params, jax.device_put(src, batch), jax.device_put(rows, batch),
             np.int32(seed))
      if pending is not None:   # copy the previous batch out while this one runs
        collect(*pending)
      pending = (start, real, y)
    collect(*pending)
    out = np.asarray(self.normalizers["target"].decode(out), np.float32)
    return out[0] if single else out


def load_features(data_dir: str, split: str = "validation", limit: int = 0, names=None):
  """Raw features of the first ``limit`` examples of a split: name -> float32 array
  [n, tokens, dim], plus ``key``. Reading TFRecords needs TensorFlow (imported here only)."""
  return data_lib.load_features(data_dir, split, limit, names)


# ----------------------------------------------------------------------------- --mode map

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
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")   # reading only: leave the accelerators to JAX
  except RuntimeError:   # TensorFlow already initialised its devices (an earlier shard)
    pass
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
  import hashlib
  digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _map_record(config, workdir: str, mapper: Mapper, out_name: str) -> dict:
  e = config.eval
  return {"workdir": os.path.abspath(workdir), "step": mapper.step,
          "weights": "ema" if mapper.ema else "raw", "source": mapper.source,
          "target": mapper.target, "feature": out_name, "solver": e.solver,
          "evaluations": int(e.steps), "guidance": float(e.guidance), "seed": int(config.seed),
          "input": os.path.abspath(config.map.input)}


def map_dataset(config, workdir: str) -> dict:
  """--mode map: every example of ``config.map.input`` through the run in ``workdir`` into
  ``config.map.output``: the input's features, key and caption, plus the mapped feature
  ``<target><config.map.suffix>``. One output shard per input shard; finished shards are
  skipped, so the same command resumes an interrupted export."""
  from tqdm import tqdm
  from flowmap import train
  m = config.map
  if not m.input or not m.output:
    raise train.ConfigError("--mode map needs --config.map.input=<features dataset> and "
                            "--config.map.output=<directory to write>")
  if os.path.abspath(m.input) == os.path.abspath(m.output):
    raise train.ConfigError("config.map.output must differ from config.map.input")
  if not data_lib.is_complete(m.input):
    raise train.ConfigError(f"config.map.input {m.input!r} is not a complete features "
                            "dataset (extract one with extract_features.py)")
  try:
    mapper = Mapper.from_workdir(workdir, ema=m.get("ema", True))
  except FileNotFoundError as e:
    raise train.ConfigError(f"{e}; train a run in --workdir first") from None
  mapper.check_guidance(float(config.eval.guidance))
  stats = data_lib.load_stats(m.input)
  in_shapes = {k: tuple(v["shape"]) for k, v in stats["features"].items()}
  if mapper.source not in in_shapes:
    raise train.ConfigError(f"{m.input} has no feature {mapper.source!r} (the run's source); "
                            f"it holds {sorted(in_shapes)}")
  if in_shapes[mapper.source] != mapper.source_shape:
    raise train.ConfigError(f"feature {mapper.source!r} in {m.input} has shape "
                            f"{in_shapes[mapper.source]}, the run expects {mapper.source_shape}")
  out_name = mapper.target + m.suffix
  if out_name in in_shapes:
    raise train.ConfigError(f"{m.input} already holds a feature {out_name!r}; choose another "
                            "--config.map.suffix")
  dtype = stats["features"][mapper.source].get("dtype", "float16")
  shapes = {**in_shapes, out_name: mapper.target_shape}
  shards = input_shards(m.input)
  record = _map_record(config, workdir, mapper, out_name)
  os.makedirs(m.output, exist_ok=True)
  record_path = os.path.join(m.output, "map.json")
  if os.path.exists(record_path):
    with open(record_path) as f:
      previous = json.load(f)
    if previous != record:
      changed = sorted(k for k in record if previous.get(k) != record[k])
      raise train.ConfigError(f"{m.output} holds an export made with different settings "
                              f"({', '.join(changed)}); use a new --config.map.output")
  elif jax.process_index() == 0:
    evaluate_lib.write_json_atomic(record_path, record)

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
                            batch_size=m.batch_size)
        offset += n
        if mapper.target in batch:
          cos = metrics_lib.cosine(mapped, batch[mapper.target].astype(np.float32))
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
      with open(manifest_path) as f:
        manifest = json.load(f)
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

