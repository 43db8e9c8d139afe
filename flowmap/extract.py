"""The extraction pipeline behind extract_features.py: images -> a features dataset.

Inputs are webdataset tar shards (members grouped by key: an image as jpg/jpeg/png/webp and
a caption as txt or json) and image folders (recursive; a caption may sit next to an image
as <stem>.txt or <stem>.json). Each tar, and each run of ``images_per_shard`` files of a
folder, is one input shard; input shard i becomes TFRecord shard i of every split this run
writes (``--split``, plus ``validation`` when ``--holdout_fraction`` sends a share of the
images there by a hash of their key).

Work is split by input shard: worker w of n takes shards w, w + n, ... A shard is written
under a temporary name and renamed when complete (flowmap.data.ShardWriter); its
extraction report (``parts/extract/``, counts read, written, skipped and why) is written
last and marks it done, so a rerun of the same command skips it. Batches never span input
shards, so a shard's bytes do not depend on which run or worker wrote it. Whichever worker
completes the last shard writes the metadata, stats.json and manifest.json. An output folder
that cannot be written is refused before any work; a write that fails later (full disk)
discards the shard in progress and stops with one ``OutputError``, keeping the finished ones.

Decoding runs in a thread pool (Pillow releases the GIL while decoding and resizing) ahead
of the device; writing runs in its own thread behind it. A bad item (corrupted or
truncated image, too small, no image) is skipped and counted; an unusual mode (CMYK,
palette, 16-bit, alpha, grayscale) is converted to RGB and counted; nothing about one item
stops the job.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import glob
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile
import uuid
import zlib
from typing import Iterator, Optional, Sequence

import numpy as np
from absl import logging

from flowmap import data as data_lib

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FOLDER_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS + ("bmp", "gif", "tif", "tiff")
CAPTION_EXTENSIONS = ("txt", "json")
JSON_CAPTION_FIELDS = ("caption", "short_caption", "text", "prompt")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
VALIDATION = "validation"
DTYPES = ("float16", "float32")
# Why an item was not written. truncated_tar counts tars, not items: a tar that ended early
# or could not be read keeps what it held up to that point.
SKIP_REASONS = ("corrupt_image", "unsupported_mode", "too_small", "too_large", "no_image",
                "duplicate_key", "nonfinite_features", "truncated_tar")
EXAMPLES_PER_REASON = 20
_SPLIT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_SPEC_FIELDS = ("name", "spec", "layer", "tokens", "cls", "processor")


class ExtractError(ValueError):
  """A configuration that cannot run: missing input, bad flags, an encoder that cannot load,
  an output folder that holds something else. The command line reports it in one line and
  exits with code 2."""


class OutputError(ExtractError):
  """The output folder cannot be written: read-only, not a folder, full disk or quota. Found
  before any work when possible, else when a write fails; either way it is reported like a
  configuration error (one line, exit code 2), the shard in progress is discarded (no
  partial shard ever carries its final name) and the finished ones are kept, so running the
  same command again once the cause is fixed resumes."""


CONFIG_ERRORS = (ExtractError, data_lib.DataError)


@dataclasses.dataclass
class ExtractConfig:
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


# ----------------------------------------------------------------------------- inputs

def _brace_items(body: str) -> Optional[list[str]]:
  m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
  if m:
    a, b = m.groups()
    padded = (len(a.lstrip("-")) > 1 and a.lstrip("-").startswith("0")) or \
             (len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0"))
    width = max(len(a), len(b)) if padded else 0
    lo, hi = int(a), int(b)
    step = 1 if hi >= lo else -1
    return [str(i).zfill(width) for i in range(lo, hi + step, step)]
  if "," in body:
    return body.split(",")
  return None


def expand_braces(pattern: str) -> list[str]:
  """Shell brace expansion: ``{00000..00009}`` (zero padding kept) and ``{a,b,c}``."""
  for m in re.finditer(r"\{([^{}]*)\}", pattern):
    items = _brace_items(m.group(1))
    if items is not None:
      return [out for item in items
              for out in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]
  return [pattern]


@dataclasses.dataclass(frozen=True)
class InputShard:
  """One unit of work: a tar, or a run of files (relative paths) of a folder."""
  kind: str                       # "tar" or "folder"
  path: str
  files: tuple = ()
  start: int = 0

  @property
  def label(self) -> str:
    if self.kind == "tar":
      return self.path
    return f"{self.path}[{self.start}:{self.start + len(self.files)}]"


def list_images(root: str) -> list[str]:
  """Image files under ``root``, recursively, as sorted relative paths (hidden entries and
  symlinked folders are not followed)."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in sorted(filenames):
      ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
      if not name.startswith(".") and ext in FOLDER_IMAGE_EXTENSIONS:
        found.append(os.path.relpath(os.path.join(dirpath, name), root))
  return sorted(found, key=lambda p: p.split(os.sep))


def resolve_inputs(patterns: Sequence[str], images_per_shard: int = 10_000,
                   max_shards: int = 0) -> list[InputShard]:
  """Expands braces and globs, in the order given; every pattern must match something."""
  shards, seen = [], set()
  for pattern in patterns:
    paths = []
    for p in expand_braces(pattern):
      if glob.has_magic(p):
        found = sorted(glob.glob(p, recursive=True))
        if not found:
          raise ExtractError(f"--input {pattern}: {p} matches nothing")
        paths.extend(found)
      elif os.path.exists(p):
        paths.append(p)
      else:
        raise ExtractError(f"--input {pattern}: {p} does not exist")
    for path in paths:
      path = os.path.abspath(path)
      if os.path.isdir(path):
        files = list_images(path)
        if not files:
          raise ExtractError(f"--input {pattern}: folder {path} holds no images "
                             f"({', '.join(FOLDER_IMAGE_EXTENSIONS)})")
        for start in range(0, len(files), images_per_shard):
          shard = InputShard("folder", path, tuple(files[start:start + images_per_shard]),
                             start)
          if shard.label not in seen:
            seen.add(shard.label)
            shards.append(shard)
      elif path.lower().endswith(TAR_SUFFIXES):
        if path not in seen:
          seen.add(path)
          shards.append(InputShard("tar", path))
      else:
        raise ExtractError(f"--input {pattern}: {path} is neither a tar shard "
                           f"({', '.join(TAR_SUFFIXES)}) nor a folder")
  return shards[:max_shards] if max_shards else shards


# ----------------------------------------------------------------------------- samples

@dataclasses.dataclass
class Sample:
  """One image as read from its container, before decoding."""
  key: str
  image: Optional[bytes] = None
  image_path: Optional[str] = None       # folders: read by the decoding worker
  caption: Optional[bytes] = None
  caption_kind: str = ""
  caption_path: Optional[str] = None
  skip: Optional[str] = None


def _clean_text(name: str) -> str:
  """File and member names may hold bytes that are not UTF-8 (surrogate-escaped by Python);
  stored keys are always valid text."""
  return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _split_member(name: str) -> tuple[Optional[str], str]:
  """webdataset naming: the key is the path up to the first dot of the basename."""
  directory, _, base = name.rpartition("/")
  stem, dot, ext = base.partition(".")
  if not dot or not stem:
    return None, ""
  return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _tar_sample(key: str, members: dict) -> Sample:
  image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
  caption_ext = next((e for e in CAPTION_EXTENSIONS if e in members), None)
  return Sample(key=_clean_text(key),
                image=members.get(image_ext) if image_ext else None,
                caption=members.get(caption_ext) if caption_ext else None,
                caption_kind=caption_ext or "",
                skip=None if image_ext else "no_image")


def read_tar(path: str, limit: int, events: collections.Counter) -> Iterator[Sample]:
  """Samples of a webdataset tar in order, reading it as a stream; a tar that ends early
  yields what it held up to the sample in progress and counts one ``truncated_tar``."""
  wanted = set(IMAGE_EXTENSIONS + CAPTION_EXTENSIONS)
  count, key, members = 0, None, {}
  try:
    with tarfile.open(path, mode="r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        member_key, ext = _split_member(member.name)
        if member_key is None:
          continue
        if member_key != key:
          if key is not None:
            yield _tar_sample(key, members)
            count += 1
            if limit and count >= limit:
              return
          key, members = member_key, {}
        if ext in wanted and ext not in members:
          members[ext] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    events["truncated_tar"] += 1
    logging.warning("%s: tar ends early or cannot be read (%s); keeping the %d samples "
                    "before that point", path, e, count)
    return
  if key is not None:
    yield _tar_sample(key, members)


def read_folder(shard: InputShard, limit: int) -> Iterator[Sample]:
  files = shard.files[:limit] if limit else shard.files
  for rel in files:
    stem = rel.rsplit(".", 1)[0]
    caption_path, caption_kind = None, ""
    for ext in CAPTION_EXTENSIONS:
      candidate = os.path.join(shard.path, f"{stem}.{ext}")
      if os.path.isfile(candidate):
        caption_path, caption_kind = candidate, ext
        break
    yield Sample(key=_clean_text(stem.replace(os.sep, "/")),
                 image_path=os.path.join(shard.path, rel),
                 caption_path=caption_path, caption_kind=caption_kind)


def read_samples(shard: InputShard, limit: int, events: collections.Counter
                 ) -> Iterator[Sample]:
  """Samples of one input shard; a key seen before in the shard is marked duplicate."""
  source = read_tar(shard.path, limit, events) if shard.kind == "tar" else \
      read_folder(shard, limit)
  seen = set()
  for sample in source:
    if sample.key in seen:
      sample = Sample(key=sample.key, skip="duplicate_key")
    seen.add(sample.key)
    yield sample


# ----------------------------------------------------------------------------- decoding

class SkipItem(Exception):
  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image):
  """-> (RGB image, the original mode when it was converted, else None).

  Alpha is composited on white (as transformers' convert_rgb does); 16-bit and float
  images are rescaled to 8 bits rather than clipped; palette, grayscale, CMYK and the
  rest go through Pillow's conversion.
  """
  from PIL import Image
  mode = image.mode
  if mode == "RGB":
    return image, None
  try:
    if mode == "P":
      image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode in _SIXTEEN_BIT:
      array = np.asarray(image, dtype=np.float64)
      if mode == "F" and array.size and np.nanmax(array) <= 1.0:
        top = 1.0
      elif mode.startswith("I;16") or (array.size and np.nanmax(array) > 255):
        top = 65535.0
      else:
        top = 255.0
      array = np.nan_to_num(np.clip(array / top * 255.0, 0, 255)).round().astype(np.uint8)
      return Image.fromarray(array, mode="L").convert("RGB"), mode
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
      rgba = image.convert("RGBA")
      white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      return Image.alpha_composite(white, rgba).convert("RGB"), mode
    return image.convert("RGB"), mode
  except (ValueError, OSError) as e:
    raise SkipItem("unsupported_mode") from e


def decode_image(data: bytes, min_size: int):
  """Bytes -> (RGB PIL image, converted mode or None); raises SkipItem."""
  from PIL import Image
  try:
    image = Image.open(io.BytesIO(data))
    if min(image.size) < min_size:
      raise SkipItem("too_small")
    image.load()
  except SkipItem:
    raise
  except Image.DecompressionBombError as e:
    raise SkipItem("too_large") from e
  except Exception as e:  # noqa: BLE001 - whatever a decoder raises, the item is corrupt
    raise SkipItem("corrupt_image") from e
  return to_rgb(image)


@dataclasses.dataclass
class Prepared:
  """One sample, decoded and resized once per geometry the encoders need."""
  key: str
  caption: str = ""
  images: Optional[list] = None          # uint8 [h, w, 3] per geometry
  skip: Optional[str] = None
  converted: Optional[str] = None
  caption_problem: Optional[str] = None


def _caption(sample: Sample) -> tuple[str, Optional[str]]:
  raw = sample.caption
  if raw is None and sample.caption_path:
    try:
      with open(sample.caption_path, "rb") as f:
        raw = f.read()
    except OSError:
      return "", "unreadable"
  if raw is None:
    return "", "missing"
  text = raw.decode("utf-8", "replace")
  if sample.caption_kind != "json":
    return text.strip(), None
  try:
    value = json.loads(text)
  except ValueError:
    return "", "unreadable"
  if isinstance(value, str):
    return value.strip(), None
  if isinstance(value, dict):
    for field in JSON_CAPTION_FIELDS:
      if isinstance(value.get(field), str):
        return value[field].strip(), None
  return "", "missing"


def prepare(sample: Sample, geometries: Sequence, min_size: int) -> Prepared:
  """Decodes one sample for every geometry. Never raises for a bad item."""
  if sample.skip:
    return Prepared(sample.key, skip=sample.skip)
  caption, caption_problem = _caption(sample)
  try:
    data = sample.image
    if data is None:
      try:
        with open(sample.image_path, "rb") as f:
          data = f.read()
      except OSError as e:
        raise SkipItem("corrupt_image") from e
    image, converted = decode_image(data, min_size)
    images = [g.apply(image) for g in geometries]
  except SkipItem as e:
    return Prepared(sample.key, skip=e.reason)
  except Exception:  # noqa: BLE001 - one item never stops the job
    return Prepared(sample.key, skip="corrupt_image")
  return Prepared(sample.key, caption, images, None, converted, caption_problem)


def _prepared_in_order(samples: Iterator[Sample], pool, geometries, min_size: int,
                       ahead: int) -> Iterator[Prepared]:
  """``prepare`` over a pool, at most ``ahead`` items in flight, results in input order."""
  if pool is None:
    for sample in samples:
      yield prepare(sample, geometries, min_size)
    return
  pending = collections.deque()
  try:
    for sample in samples:
      pending.append(pool.submit(prepare, sample, geometries, min_size))
      if len(pending) >= ahead:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    for future in pending:
      future.cancel()


def in_holdout(key: str, fraction: float) -> bool:
  """Whether ``key`` belongs to the held-out share: a hash of the key alone, so the split
  does not depend on order, workers or restarts."""
  if fraction <= 0:
    return False
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < fraction * 2 ** 64


# ----------------------------------------------------------------------------- bookkeeping

def _extract_dir(out: str) -> str:
  return os.path.join(out, "parts", "extract")


def _record_path(out: str, split: str) -> str:
  return os.path.join(_extract_dir(out), f"run-{split}.json")


def _report_path(out: str, split: str, index: int, num_shards: int) -> str:
  return os.path.join(_extract_dir(out), f"{split}-{index:05d}-of-{num_shards:05d}.json")


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"     # every worker of an array writes the run record
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


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
def _writing(out: str):
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


def _discard(writer: data_lib.ShardWriter) -> None:
  """Drops a shard in progress, whatever state a failed write left its writer in."""
  try:
    writer.abort()
  except Exception:  # noqa: BLE001 - the error that got us here is the one to report
    with contextlib.suppress(OSError):
      os.remove(writer.tmp_path)


def _remove_stale_temporaries(out: str, record: dict, indices: Sequence[int]) -> None:
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
    report = _report_path(out, record["split"], index, n)
    stale += glob.glob(glob.escape(report) + ".*.tmp")
  for path in stale:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
  if stale:
    logging.info("removed %d temporary files left by an interrupted run", len(stale))


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _read_records(out: str) -> dict[str, dict]:
  """The settings of every extraction run into ``out``, by the split it was run for."""
  directory = _extract_dir(out)
  if not os.path.isdir(directory):
    return {}
  return {name[len("run-"):-len(".json")]: _read_json(os.path.join(directory, name))
          for name in sorted(os.listdir(directory))
          if name.startswith("run-") and name.endswith(".json")}


def _spec_view(encoders: Sequence[dict]) -> list[dict]:
  return [{k: e.get(k) for k in _SPEC_FIELDS} for e in encoders]


def _describe_specs(specs) -> str:
  return ", ".join(f"{e['name']}={e['spec']}" for e in specs)


def _check_out_dir(out: str, record: dict) -> None:
  """Refuses an output folder that holds another encoder set or, for this split, features
  of other inputs or settings: mixing them would silently corrupt the dataset."""
  records = _read_records(out)
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
      differ = sorted(k for k in ("inputs", "splits", "holdout_fraction", "limit",
                                  "images_per_shard", "min_image_size")
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
    manifest = _read_json(manifest_path)
    theirs = _spec_view(manifest.get("encoders", []))
    if theirs != ours:
      raise ExtractError(f"{out} holds a features dataset of a different encoder set "
                         f"({_describe_specs(theirs) or ', '.join(manifest.get('features', {}))}); "
                         "use another --out")


def _shard_complete(out: str, record: dict, index: int) -> bool:
  n = record["num_shards"]
  return (os.path.exists(_report_path(out, record["split"], index, n)) and
          all(data_lib.shard_done(out, s, index, n) for s in record["splits"]))


# ----------------------------------------------------------------------------- one shard

class _ShardReport:
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


class _OrderedWriter:
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


def _write_batch(out: str, writers, rows) -> None:
  with _writing(out):
    for split, key, caption, features in rows:
      writers[split].add(key, caption, features)


class Progress:
  """A tqdm bar of images read per second, with the run's skip count."""

  def __init__(self, cfg: ExtractConfig):
    from tqdm import tqdm
    self.bar = tqdm(unit="img", desc=f"extract {cfg.worker_index}/{cfg.num_workers}",
                    disable=not cfg.progress, dynamic_ncols=True, smoothing=0.05,
                    mininterval=1.0 if os.isatty(2) else 30.0)
    self.skipped_before = 0

  def update(self, images: int, report: "_ShardReport") -> None:
    self.bar.update(images)
    self.bar.set_postfix(skipped=self.skipped_before + sum(report.skipped.values()),
                         refresh=False)

  def shard_done(self, report: "_ShardReport") -> None:
    self.skipped_before += sum(report.skipped.values())

  def close(self) -> None:
    self.bar.close()


def extract_shard(cfg: ExtractConfig, record: dict, shard: InputShard, index: int, encoders,
                  pool, progress: Optional[Progress] = None) -> dict:
  """Writes TFRecord shard ``index`` of every split from one input shard; returns its
  report (also written to parts/extract/, which marks the shard done)."""
  shapes = encoders.shapes
  num_shards = record["num_shards"]
  report = _ShardReport(shard, record, index)
  events = collections.Counter()
  writers = {}
  background = _OrderedWriter()
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
    background.submit(_write_batch, cfg.out, writers, rows)
    if progress is not None:
      progress.update(len(batch), report)

  try:
    with _writing(cfg.out):
      for split in record["splits"]:
        writers[split] = data_lib.ShardWriter(cfg.out, split, index, num_shards, shapes,
                                              cfg.dtype)
    batch = []
    samples = read_samples(shard, cfg.limit, events)
    for item in _prepared_in_order(samples, pool, encoders.geometries, cfg.min_image_size,
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
    with _writing(cfg.out):
      for writer in writers.values():
        writer.commit()
  except BaseException:
    # A failed write (full disk), an error or an interrupt: the temporary shards go, so the
    # output holds finished shards only and a rerun redoes this one.
    background.close()
    for writer in writers.values():
      _discard(writer)
    raise
  background.close()
  result = report.to_json()
  with _writing(cfg.out):
    _write_json(_report_path(cfg.out, record["split"], index, num_shards), result)
  if progress is not None:
    progress.shard_done(report)
  return result


# ----------------------------------------------------------------------------- the run

def _merge_counts(reports: Sequence[dict]) -> dict:
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
  counts = _merge_counts(reports)
  del counts["written"]       # data.finalize fills it in from the shards themselves
  return {
      "tool": "extract_features.py",
      "encoders": first["encoders"],
      "inputs": {split: rec["inputs"] for split, rec in sorted(records.items())},
      "runs": {split: {k: rec[k] for k in ("splits", "holdout_fraction", "limit",
                                           "images_per_shard", "min_image_size")}
               for split, rec in sorted(records.items())},
      "counts": counts,
      "skip_reasons": list(SKIP_REASONS),
  }


def try_finalize(out: str) -> Optional[dict]:
  """Writes metadata, stats.json and manifest.json when every input shard of every run into
  ``out`` is complete; returns the manifest, or None while shards are missing."""
  records = _read_records(out)
  if not records or any("features" not in r for r in records.values()):
    return None
  reports = []
  for rec in records.values():
    for index in range(rec["num_shards"]):
      if not _shard_complete(out, rec, index):
        return None
      reports.append(_read_json(_report_path(out, rec["split"], index, rec["num_shards"])))
  first = next(iter(records.values()))
  shapes = {name: tuple(shape) for name, shape in first["features"].items()}
  num_shards = {s: rec["num_shards"] for rec in records.values() for s in rec["splits"]}
  manifest = _manifest(records, reports)
  if not data_lib.finalize(out, shapes, list(num_shards), num_shards, first["dtype"],
                           manifest):
    return None
  return _read_json(os.path.join(out, "manifest.json"))


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


def _hide_gpus_from_tensorflow() -> None:
  """TensorFlow only serialises here; keep it off the GPUs torch uses."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    pass


def run(cfg: ExtractConfig) -> Summary:
  """Extracts this worker's share of the input shards, then finalizes if it was last."""
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
  _check_out_dir(cfg.out, record)
  check_writable(cfg.out)
  mine = list(range(cfg.worker_index, len(shards), cfg.num_workers))
  todo = [i for i in mine if not _shard_complete(cfg.out, record, i)]

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
    for split, other in _read_records(cfg.out).items():
      if other.get("features", record["features"]) != record["features"]:
        raise ExtractError(f"{cfg.out} holds features of shapes {other['features']} (split "
                           f"{split}), these encoders give {record['features']}; use another "
                           "--out")
    with _writing(cfg.out):
      os.makedirs(cfg.out, exist_ok=True)
      _write_json(_record_path(cfg.out, cfg.split), record)
      _remove_stale_temporaries(cfg.out, record, todo)
    _hide_gpus_from_tensorflow()
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
                 _format_counts(_merge_counts(reports)))
  else:
    logging.info("worker %d/%d: its %d input shards (of %d) are already extracted",
                 cfg.worker_index, cfg.num_workers, len(mine), len(shards))

  # -- metadata: written by whichever worker completes the dataset
  with _writing(cfg.out):
    manifest = try_finalize(cfg.out)
  if manifest is not None:
    logging.info("dataset %s complete: %s", cfg.out, _format_counts(manifest["counts"]))
  else:
    logging.info("dataset %s: shards of other workers are still missing; the last worker "
                 "to finish writes the metadata", cfg.out)
  return Summary(len(shards), len(mine), len(mine) - len(todo), _merge_counts(reports),
                 manifest)
