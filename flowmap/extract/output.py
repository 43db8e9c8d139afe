"""What extraction leaves in --out besides the shards' own bytes, and how it writes them.

Input shard i becomes TFRecord shard i of every split of the run; a background thread writes
it under a temporary name, renamed when complete (flowmap.data.ShardWriter). Its
report (``parts/extract/``: counts read, written, skipped and why) is written last and marks
it done, so a rerun of the same command skips it. Each run also leaves its settings there
(``run-<split>.json``): an output folder holding another encoder set, or this split from
other inputs or settings, is refused. Whichever worker completes the last shard writes the
metadata, stats.json and manifest.json.

An output folder that cannot be written is refused before any work; a write that fails
later (full disk) becomes one ``OutputError``, the shard in progress is discarded and the
finished ones are kept.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import glob
import os
import sys
import tempfile
from typing import Optional, Sequence

from absl import logging

from flowmap import data as data_lib
from flowmap.extract.errors import ExtractError, OutputError
from flowmap.extract.inputs import InputShard
from flowmap.fileio import read_json, write_json_atomic

# Why an item was not written. truncated_tar counts tars, not items: a tar that ended early
# or could not be read keeps what it held up to that point.
SKIP_REASONS = ("corrupt_image", "unsupported_mode", "too_small", "too_large", "no_image",
                "duplicate_key", "nonfinite_features", "truncated_tar")
EXAMPLES_PER_REASON = 20
_SPEC_FIELDS = ("name", "spec", "layer", "tokens", "cls", "processor")
# The settings of a run, besides its inputs, that its shards depend on.
_RUN_SETTINGS = ("splits", "holdout_fraction", "limit", "images_per_shard", "min_image_size")


# ----------------------------------------------------------------------------- files

def _extract_dir(out: str) -> str:
  return os.path.join(out, "parts", "extract")


def record_path(out: str, split: str) -> str:
  return os.path.join(_extract_dir(out), f"run-{split}.json")


def report_path(out: str, split: str, index: int, num_shards: int) -> str:
  return os.path.join(_extract_dir(out), f"{split}-{index:05d}-of-{num_shards:05d}.json")


def write_json(path: str, obj) -> None:
  """Every worker of an array writes the run record, so each write is atomic (fileio)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  write_json_atomic(path, obj, sort_keys=True)


def read_records(out: str) -> dict[str, dict]:
  """The settings of every extraction run into ``out``, by the split it was run for."""
  directory = _extract_dir(out)
  if not os.path.isdir(directory):
    return {}
  return {name[len("run-"):-len(".json")]: read_json(os.path.join(directory, name))
          for name in sorted(os.listdir(directory))
          if name.startswith("run-") and name.endswith(".json")}


# ----------------------------------------------------------------------------- write failures

# errno values that mean "the disk is full"; TensorFlow's writers raise their own error types,
# with an empty message for a full disk.
_FULL = (errno.ENOSPC, errno.EDQUOT)
_TF_REASONS = {"ResourceExhaustedError": f"{os.strerror(errno.ENOSPC)} (or over quota)",
               "PermissionDeniedError": os.strerror(errno.EACCES)}


def _write_failure(out: str, e: BaseException) -> Optional[OutputError]:
  """The OutputError for ``e`` raised while writing under ``out``, or None when ``e`` is not
  an I/O error (OSError, or one of TensorFlow's, which TFRecordWriter raises)."""
  if isinstance(e, OutputError):
    return e
  if isinstance(e, OSError):
    reason = e.strerror or str(e) or type(e).__name__
    full = e.errno in _FULL
    where = f" ({e.filename})" if e.filename else ""
  else:
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(e, tf.errors.OpError):
      return None
    name = type(e).__name__
    message = (getattr(e, "message", "") or "").strip().splitlines()
    reason = _TF_REASONS.get(name) or (message[0] if message else name)
    full = name == "ResourceExhaustedError"
    where = ""
  hint = ("free some space (or choose another --out), then run the same command again: "
          "finished shards are kept" if full else
          "choose an --out you can write to (finished shards, if any, are kept)")
  return OutputError(f"cannot write to --out {out}: {reason}{where}; {hint}")


@contextlib.contextmanager
def writing(out: str):
  """Turns an I/O error of the output folder into one OutputError."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - only I/O errors are converted, the rest re-raised
    failure = _write_failure(out, e)
    if failure is None or failure is e:
      raise
    raise failure from e


def check_writable(out: str) -> None:
  """Fails with an OutputError, before any work and leaving nothing behind, when ``out``
  cannot be created or written. Tries a real write (a temporary folder in ``out`` or its
  nearest existing ancestor): permission bits say nothing when running as root."""
  path = os.path.abspath(out)
  existing = path
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise OutputError(f"cannot write to --out {out}: {existing} is not a folder; choose an "
                      "--out you can write to")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".flowmap-write-test-", dir=existing))
  except OSError as e:   # named after the folder, not the probe's temporary name
    raise _write_failure(out, OSError(e.errno, e.strerror, existing)) from None


# ----------------------------------------------------------------------------- the output folder

def _spec_view(encoders: Sequence[dict]) -> list[dict]:
  return [{k: e.get(k) for k in _SPEC_FIELDS} for e in encoders]


def _describe_specs(specs) -> str:
  return ", ".join(f"{e['name']}={e['spec']}" for e in specs)


def check_out_dir(out: str, record: dict) -> None:
  """Refuses an output folder that holds another encoder set or, for this split, features
  of other inputs or settings: mixing them would silently corrupt the dataset."""
  records = read_records(out)
  ours = _spec_view(record["encoders"])
  for split, other in records.items():
    theirs = _spec_view(other["encoders"])
    if theirs != ours:
      raise ExtractError(f"{out} holds features of a different encoder set "
                         f"({_describe_specs(theirs)}), not ({_describe_specs(ours)}); "
                         "use another --out")
    if other["dtype"] != record["dtype"]:
      raise ExtractError(f"{out} holds {other['dtype']} features, not {record['dtype']}; "
                         "use another --out")
    if split == record["split"]:
      differ = sorted(k for k in ("inputs",) + _RUN_SETTINGS
                      if other.get(k) != record.get(k))
      if differ:
        raise ExtractError(f"{out} already holds split {split!r} extracted with other "
                           f"{', '.join(differ)}; use another --out")
    else:
      overlap = sorted(set(other["splits"]) & set(record["splits"]))
      if overlap:
        raise ExtractError(f"split {', '.join(overlap)} of {out} was written by the "
                           f"--split {split} run; use another --out")
  manifest_path = os.path.join(out, "manifest.json")
  if not records and os.path.exists(manifest_path):
    manifest = read_json(manifest_path)
    theirs = _spec_view(manifest.get("encoders", []))
    if theirs != ours:
      raise ExtractError(f"{out} holds a features dataset of a different encoder set "
                         f"({_describe_specs(theirs) or ', '.join(manifest.get('features', {}))}); "
                         "use another --out")


def shard_complete(out: str, record: dict, index: int) -> bool:
  n = record["num_shards"]
  return (os.path.exists(report_path(out, record["split"], index, n)) and
          all(data_lib.shard_done(out, s, index, n) for s in record["splits"]))


def remove_stale_temporaries(out: str, record: dict, indices: Sequence[int]) -> None:
  """Removes what a killed run left of shards this worker is about to write again: the
  temporary shards and any temporary JSON of their reports. Only this worker ever writes
  these shards, so nothing another worker is writing can be touched."""
  n = record["num_shards"]
  stale = []
  for index in indices:
    for split in record["splits"]:
      shard = os.path.join(out, data_lib.shard_name(split, index, n)) + ".incomplete"
      part = data_lib._part_path(out, split, index, n)   # noqa: SLF001 - same package
      if os.path.exists(shard):
        stale.append(shard)
      stale += glob.glob(glob.escape(part) + ".*.tmp")
    report = report_path(out, record["split"], index, n)
    stale += glob.glob(glob.escape(report) + ".*.tmp")
  for path in stale:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
  if stale:
    logging.info("removed %d temporary files left by an interrupted run", len(stale))


# ----------------------------------------------------------------------------- one shard

class ShardReport:
  """What one input shard gave: images read, written per split, skipped by reason (with a
  few keys each), converted by mode, caption problems. Written last, it marks the shard done."""

  def __init__(self, shard: InputShard, record: dict, index: int):
    self.shard, self.record, self.index = shard, record, index
    self.read = 0
    self.written = collections.Counter({s: 0 for s in record["splits"]})
    self.skipped = collections.Counter()
    self.converted = collections.Counter()
    self.captions = collections.Counter()
    self.examples = collections.defaultdict(list)

  def skip(self, key: str, reason: str) -> None:
    self.skipped[reason] += 1
    if len(self.examples[reason]) < EXAMPLES_PER_REASON:
      self.examples[reason].append(key)

  def to_json(self) -> dict:
    return {"input": self.shard.label, "split": self.record["split"], "index": self.index,
            "num_shards": self.record["num_shards"], "read": self.read,
            "written": dict(sorted(self.written.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "converted": dict(sorted(self.converted.items())),
            "captions": dict(sorted(self.captions.items())),
            "examples": {k: v for k, v in sorted(self.examples.items())}}


class BackgroundWriter:
  """Runs the writes of a shard in one background thread, in submission order, with a
  bounded backlog; the first failure is raised in the caller."""

  def __init__(self, backlog: int = 4):
    self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="write")
    self.pending = collections.deque()
    self.backlog = backlog

  def submit(self, fn, *args) -> None:
    self.pending.append(self.pool.submit(fn, *args))
    while len(self.pending) > self.backlog:
      self.pending.popleft().result()

  def drain(self) -> None:
    while self.pending:
      self.pending.popleft().result()

  def close(self) -> None:
    self.pool.shutdown(wait=True, cancel_futures=True)


def write_batch(out: str, writers, rows) -> None:
  with writing(out):
    for split, key, caption, features in rows:
      writers[split].add(key, caption, features)


def discard_shard(writer: data_lib.ShardWriter) -> None:
  """Drops a shard in progress, whatever state a failed write left its writer in."""
  try:
    writer.abort()
  except Exception:  # noqa: BLE001 - the error that got us here is the one to report
    with contextlib.suppress(OSError):
      os.remove(writer.tmp_path)


# ----------------------------------------------------------------------------- the dataset

def merge_counts(reports: Sequence[dict]) -> dict:
  """The counts of many shard reports, with up to 5 * EXAMPLES_PER_REASON skipped keys per
  reason, each named with its input."""
  totals = {"read": 0, "written": collections.Counter(), "skipped": collections.Counter(),
            "converted": collections.Counter(), "captions": collections.Counter()}
  examples = collections.defaultdict(list)
  for r in reports:
    totals["read"] += r["read"]
    for field in ("written", "skipped", "converted", "captions"):
      totals[field].update(r[field])
    for reason, keys in r.get("examples", {}).items():
      room = 5 * EXAMPLES_PER_REASON - len(examples[reason])
      examples[reason].extend(f"{r['input']}: {k}" for k in keys[:max(room, 0)])
  out = {k: (dict(sorted(v.items())) if isinstance(v, collections.Counter) else v)
         for k, v in totals.items()}
  out["skipped_examples"] = dict(sorted(examples.items()))
  return out


def _manifest(records: dict[str, dict], reports: Sequence[dict]) -> dict:
  first = next(iter(records.values()))
  counts = merge_counts(reports)
  del counts["written"]       # data.finalize fills it in from the shards themselves
  return {
      "tool": "extract_features.py",
      "encoders": first["encoders"],
      "inputs": {split: rec["inputs"] for split, rec in sorted(records.items())},
      "runs": {split: {k: rec[k] for k in _RUN_SETTINGS}
               for split, rec in sorted(records.items())},
      "counts": counts,
      "skip_reasons": list(SKIP_REASONS),
  }


def try_finalize(out: str) -> Optional[dict]:
  """Writes metadata, stats.json and manifest.json when every input shard of every run into
  ``out`` is complete; returns the manifest, or None while shards are missing."""
  records = read_records(out)
  if not records or any("features" not in r for r in records.values()):
    return None
  reports = []
  for rec in records.values():
    for index in range(rec["num_shards"]):
      if not shard_complete(out, rec, index):
        return None
      reports.append(read_json(report_path(out, rec["split"], index, rec["num_shards"])))
  first = next(iter(records.values()))
  shapes = {name: tuple(shape) for name, shape in first["features"].items()}
  num_shards = {s: rec["num_shards"] for rec in records.values() for s in rec["splits"]}
  manifest = _manifest(records, reports)
  if not data_lib.finalize(out, shapes, list(num_shards), num_shards, first["dtype"],
                           manifest):
    return None
  return read_json(os.path.join(out, "manifest.json"))
