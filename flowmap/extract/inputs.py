"""What extraction reads: input patterns, the input shards they name, and their samples.

Inputs are webdataset tar shards (members grouped by key: an image as jpg/jpeg/png/webp and
a caption as txt or json) and image folders (recursive; a caption may sit next to an image
as <stem>.txt or <stem>.json). Each tar, and each run of ``images_per_shard`` files of a
folder, is one input shard. Patterns take shell braces (``{00000..00009}``, ``{a,b}``) and
globs. Reading yields samples still encoded; a tar that ends early keeps what it held.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import tarfile
import zlib
from typing import Iterator, Optional, Sequence

from absl import logging

from flowmap.extract.errors import ExtractError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FOLDER_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS + ("bmp", "gif", "tif", "tiff")
CAPTION_EXTENSIONS = ("txt", "json")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# ----------------------------------------------------------------------------- patterns

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
