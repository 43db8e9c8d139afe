"""The extraction run: its settings, one input shard through decoding, the encoders and the
writer, and the run over this worker's share of the shards.

Work is split by input shard: worker w of n takes shards w, w + n, ... Batches never span
input shards, so a shard's bytes do not depend on which run or worker wrote it. Decoding
threads run ahead of the device and writing runs behind it, one input shard at a time. A
share of the images (``--holdout_fraction``) goes to ``validation`` by a hash of their key.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
import re
from typing import Optional, Sequence

import numpy as np
from absl import logging

from flowmap import data as data_lib
from flowmap.extract.decoding import Prepared, prepared_in_order
from flowmap.extract.errors import ExtractError
from flowmap.extract.inputs import InputShard, read_samples, resolve_inputs
from flowmap.extract.output import (BackgroundWriter, ShardReport, check_out_dir,
                                    check_writable, discard_shard, merge_counts, read_records,
                                    record_path, remove_stale_temporaries, report_path,
                                    shard_complete, try_finalize, write_batch, write_json,
                                    writing)

VALIDATION = "validation"
DTYPES = ("float16", "float32")
_SPLIT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclasses.dataclass
class ExtractConfig:
  """The settings of one extraction: a field per flag of extract_features.py, named alike
  (``inputs`` and ``encoders`` collect the repeated --input and --encoder), same defaults."""
  inputs: Sequence[str]
  encoders: Sequence[str]
  out: str
  split: str = "train"
  holdout_fraction: float = 0.0
  batch_size: int = 64
  dtype: str = "float16"
  device: str = "auto"
  precision: str = "auto"
  trust_remote_code: bool = False
  num_workers: int = 1
  worker_index: int = 0
  max_shards: int = 0
  limit: int = 0
  decode_workers: int = -1
  images_per_shard: int = 10_000
  min_image_size: int = 16
  progress: bool = True

  def validate(self) -> None:
    problems = []
    if not self.inputs:
      problems.append("no --input given")
    if not self.encoders:
      problems.append("no --encoder given")
    if not self.out:
      problems.append("no --out given")
    if not _SPLIT_RE.match(self.split or ""):
      problems.append(f"--split {self.split!r} must be a name such as train or validation")
    if not 0.0 <= self.holdout_fraction < 1.0:
      problems.append("--holdout_fraction must be in [0, 1)")
    if self.holdout_fraction > 0 and self.split == VALIDATION:
      problems.append("--holdout_fraction sends images to validation; it cannot be used "
                      "with --split validation")
    if self.batch_size < 1:
      problems.append("--batch_size must be at least 1")
    if self.dtype not in DTYPES:
      problems.append(f"--dtype must be one of {DTYPES}")
    if self.num_workers < 1 or not 0 <= self.worker_index < self.num_workers:
      problems.append(f"--worker_index {self.worker_index} must be in [0, --num_workers "
                      f"{self.num_workers})")
    if self.max_shards < 0 or self.limit < 0:
      problems.append("--max_shards and --limit must be >= 0 (0: no limit)")
    if self.images_per_shard < 1:
      problems.append("--images_per_shard must be at least 1")
    if problems:
      raise ExtractError("; ".join(problems))

  @property
  def splits(self) -> list[str]:
    return [self.split] + ([VALIDATION] if self.holdout_fraction > 0 else [])


def in_holdout(key: str, fraction: float) -> bool:
  """Whether ``key`` belongs to the held-out share: a hash of the key alone, so the split
  does not depend on order, workers or restarts."""
  if fraction <= 0:
    return False
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < fraction * 2 ** 64


class Progress:
  """A tqdm bar of images read per second, with the run's skip count."""

  def __init__(self, cfg: ExtractConfig):
    from tqdm import tqdm
    self.bar = tqdm(unit="img", desc=f"extract {cfg.worker_index}/{cfg.num_workers}",
                    disable=not cfg.progress, dynamic_ncols=True, smoothing=0.05,
                    mininterval=1.0 if os.isatty(2) else 30.0)
    self.skipped_before = 0

  def update(self, images: int, report: ShardReport) -> None:
    self.bar.update(images)
    self.bar.set_postfix(skipped=self.skipped_before + sum(report.skipped.values()),
                         refresh=False)

  def shard_done(self, report: ShardReport) -> None:
    self.skipped_before += sum(report.skipped.values())

  def close(self) -> None:
    self.bar.close()


# ----------------------------------------------------------------------------- one shard

def extract_shard(cfg: ExtractConfig, record: dict, shard: InputShard, index: int, encoders,
                  pool, progress: Optional[Progress] = None) -> dict:
  """Writes TFRecord shard ``index`` of every split from one input shard; returns its
  report (also written to parts/extract/, which marks the shard done)."""
  shapes = encoders.shapes
  num_shards = record["num_shards"]
  report = ShardReport(shard, record, index)
  events = collections.Counter()
  writers = {}
  background = BackgroundWriter()
  decode_ahead = max(2 * cfg.batch_size, 8)
  stored_dtype = np.dtype(cfg.dtype)

  def flush(batch: list[Prepared]) -> None:
    stacked = [np.stack([item.images[g] for item in batch])
               for g in range(len(encoders.geometries))]
    features = encoders.encode(stacked)
    finite = np.ones(len(batch), bool)
    bad_names = [[] for _ in batch]
    for name, x in features.items():
      ok = np.isfinite(x.astype(stored_dtype)).reshape(len(batch), -1).all(axis=1)
      for i in np.flatnonzero(~ok):
        bad_names[i].append(name)
      finite &= ok
    rows = []
    for i, item in enumerate(batch):
      if not finite[i]:
        logging.warning("%s: rejecting %r: non-finite values in %s (as %s)", shard.label,
                        item.key, ", ".join(bad_names[i]), cfg.dtype)
        report.skip(item.key, "nonfinite_features")
        continue
      split = VALIDATION if in_holdout(item.key, cfg.holdout_fraction) else cfg.split
      report.written[split] += 1
      rows.append((split, item.key, item.caption,
                   {name: x[i] for name, x in features.items()}))
    background.submit(write_batch, cfg.out, writers, rows)
    if progress is not None:
      progress.update(len(batch), report)

  try:
    with writing(cfg.out):
      for split in record["splits"]:
        writers[split] = data_lib.ShardWriter(cfg.out, split, index, num_shards, shapes,
                                              cfg.dtype)
    batch = []
    samples = read_samples(shard, cfg.limit, events)
    for item in prepared_in_order(samples, pool, encoders.geometries, cfg.min_image_size,
                                  decode_ahead):
      report.read += 1
      if item.skip:
        report.skip(item.key, item.skip)
        if progress is not None:
          progress.update(1, report)
        continue
      if item.converted:
        report.converted[item.converted] += 1
      if item.caption_problem:
        report.captions[item.caption_problem] += 1
      batch.append(item)
      if len(batch) == cfg.batch_size:
        flush(batch)
        batch = []
    if batch:
      flush(batch)
    background.drain()
    for reason, n in events.items():
      report.skipped[reason] += n
    with writing(cfg.out):
      for writer in writers.values():
        writer.commit()
  except BaseException:
    # A failed write (full disk), an error or an interrupt: the temporary shards go, so the
    # output holds finished shards only and a rerun redoes this one.
    background.close()
    for writer in writers.values():
      discard_shard(writer)
    raise
  background.close()
  result = report.to_json()
  with writing(cfg.out):
    write_json(report_path(cfg.out, record["split"], index, num_shards), result)
  if progress is not None:
    progress.shard_done(report)
  return result


# ----------------------------------------------------------------------------- the run

def _format_counts(counts: dict) -> str:
  parts = [f"read {counts['read']}"]
  written = counts.get("written", {})
  if written:
    parts.append(f"written {sum(written.values())} (" +
                 ", ".join(f"{s} {n}" for s, n in written.items()) + ")")
  for field in ("skipped", "converted"):
    values = counts.get(field, {})
    if values:
      parts.append(f"{field} {sum(values.values())} (" +
                   ", ".join(f"{k} {n}" for k, n in values.items()) + ")")
  return "; ".join(parts)


@dataclasses.dataclass
class Summary:
  shards: int                      # input shards in the whole run
  assigned: int                    # of which this worker's
  done_before: int                 # already complete when this worker started
  counts: dict                     # this worker's counts, from the shards it wrote now
  manifest: Optional[dict]         # set when this worker completed the dataset


def run(cfg: ExtractConfig) -> Summary:
  """Extracts this worker's share of the input shards, then finalizes if it was last."""
  # flowmap.encoders loads PyTorch: only once a run starts, so --help and a bad flag stay quick
  from flowmap import encoders as encoders_lib

  # -- configuration: whatever can be wrong is found before any work
  cfg.validate()
  try:
    specs = [encoders_lib.EncoderSpec.parse(text) for text in cfg.encoders]
    encoders_lib.check_unique(specs)
  except encoders_lib.EncoderError as e:
    raise ExtractError(str(e)) from None
  shards = resolve_inputs(cfg.inputs, cfg.images_per_shard, cfg.max_shards)
  record = {"split": cfg.split, "splits": cfg.splits, "dtype": cfg.dtype,
            "num_shards": len(shards), "inputs": [s.label for s in shards],
            "holdout_fraction": cfg.holdout_fraction, "limit": cfg.limit,
            "images_per_shard": cfg.images_per_shard, "min_image_size": cfg.min_image_size,
            "encoders": [s.to_json() for s in specs]}
  check_out_dir(cfg.out, record)
  check_writable(cfg.out)
  mine = list(range(cfg.worker_index, len(shards), cfg.num_workers))
  todo = [i for i in mine if not shard_complete(cfg.out, record, i)]

  # -- encoders: loaded only when this worker has shards left
  reports = []
  if todo:
    try:
      device = encoders_lib.resolve_device(cfg.device)
      autocast = encoders_lib.resolve_precision(cfg.precision, device)
      encoders = encoders_lib.load_encoders(specs, device, autocast, cfg.trust_remote_code)
    except encoders_lib.EncoderError as e:
      raise ExtractError(str(e)) from None
    record["encoders"] = encoders.describe()
    record["features"] = {name: list(shape) for name, shape in encoders.shapes.items()}
    for split, other in read_records(cfg.out).items():
      if other.get("features", record["features"]) != record["features"]:
        raise ExtractError(f"{cfg.out} holds features of shapes {other['features']} (split "
                           f"{split}), these encoders give {record['features']}; use another "
                           "--out")
    with writing(cfg.out):
      os.makedirs(cfg.out, exist_ok=True)
      write_json(record_path(cfg.out, cfg.split), record)
      remove_stale_temporaries(cfg.out, record, todo)
    data_lib.tensorflow()   # TensorFlow only serialises here: keep it off the GPUs torch uses
    logging.info("worker %d/%d: %d of its %d input shards (of %d) left; encoders on %s, %s: "
                 "%s", cfg.worker_index, cfg.num_workers, len(todo), len(mine), len(shards),
                 device, str(autocast or "float32").replace("torch.", ""),
                 ", ".join(f"{n} {list(s)}" for n, s in encoders.shapes.items()))

    # -- extraction: decoding threads ahead of the device, one input shard at a time
    workers = cfg.decode_workers if cfg.decode_workers >= 0 else min(8, os.cpu_count() or 1)
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decode") \
        if workers > 0 else None
    progress = Progress(cfg)
    try:
      for index in todo:
        reports.append(extract_shard(cfg, record, shards[index], index, encoders, pool,
                                     progress))
    finally:
      progress.close()
      if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
    logging.info("worker %d/%d: %s", cfg.worker_index, cfg.num_workers,
                 _format_counts(merge_counts(reports)))
  else:
    logging.info("worker %d/%d: its %d input shards (of %d) are already extracted",
                 cfg.worker_index, cfg.num_workers, len(mine), len(shards))

  # -- metadata: written by whichever worker completes the dataset
  with writing(cfg.out):
    manifest = try_finalize(cfg.out)
  if manifest is not None:
    logging.info("dataset %s complete: %s", cfg.out, _format_counts(manifest["counts"]))
  else:
    logging.info("dataset %s: shards of other workers are still missing; the last worker "
                 "to finish writes the metadata", cfg.out)
  return Summary(len(shards), len(mine), len(mine) - len(todo), merge_counts(reports),
                 manifest)
