"""Files that are either whole or absent: the one atomic JSON writer, and fsync.

Datasets, extraction reports, a run's records (eval/<step>.json, baseline.json, map.json)
all go through ``write_json_atomic``: written under a temporary name of its own (workers that
finish together may write the same file at once), flushed to disk, then renamed, so a reader
or a crash never sees half a file; a failed write removes its temporary file and leaves the
previous file as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid


def write_json_atomic(path: str, obj, *, sort_keys: bool = False) -> None:
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, sort_keys=sort_keys)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def fsync_file(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def read_json(path: str):
  with open(path) as f:
    return json.load(f)
