"""The errors that stop an extraction: a configuration that cannot run, an output folder
that cannot be written. ``CONFIG_ERRORS`` is what extract_features.py turns into one line and
exit code 2 (a dataset problem from flowmap.data included).
"""

from __future__ import annotations

from flowmap import data as data_lib


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
