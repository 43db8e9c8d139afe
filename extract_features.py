r"""Images -> a features dataset (TFRecords) that training reads through config.data.dir.

  python extract_features.py --input 'shards/{00000..00009}.tar' --input images_dir/ \
      --encoder clip=hf:openai/clip-vit-large-patch14 \
      --encoder eva=timm:eva02_large_patch14_clip_224.merged2b \
      --out data/feats --holdout_fraction 0.01

Run the same command again to resume: finished shards are skipped. Split the work over a
SLURM array with --num_workers $SLURM_ARRAY_TASK_COUNT --worker_index $SLURM_ARRAY_TASK_ID.
A configuration that cannot run (missing input, an encoder that cannot load, an output
folder holding other features or that cannot be written) stops before any work with one line
and exit code 2; so does a write that fails later (full disk), keeping the finished shards.
"""

import logging as std_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # TensorFlow only writes TFRecords here

from absl import app, flags  # noqa: E402

from flowmap import extract  # noqa: E402

_INPUT = flags.DEFINE_multi_string(
    "input", None, "webdataset tar shards (globs and brace ranges such as "
    "'shards/{00000..00099}.tar') or image folders (searched recursively); repeatable")
_ENCODER = flags.DEFINE_multi_string(
    "encoder", None, "NAME=SOURCE[,layer=L][,tokens=patch|pooled][,cls=drop|keep]"
    "[,processor=ID], SOURCE hf:<hub id or dir> or timm:<model name or local-dir:PATH>; "
    "repeatable (all run on the same decoded image)")
_OUT = flags.DEFINE_string("out", None, "output features dataset directory")
_SPLIT = flags.DEFINE_string("split", "train", "split this run writes")
_HOLDOUT = flags.DEFINE_float(
    "holdout_fraction", 0.0, "share of images sent to 'validation', by a hash of their key")
_BATCH = flags.DEFINE_integer("batch_size", 64, "images per forward pass")
_DTYPE = flags.DEFINE_string("dtype", "float16", "stored feature dtype: float16 | float32")
_DEVICE = flags.DEFINE_string("device", "auto", "auto | cpu | cuda")
_PRECISION = flags.DEFINE_string(
    "precision", "auto", "auto (bfloat16, else float16, autocast on GPU; float32 on CPU) | "
    "float32 | bfloat16 | float16")
_TRUST = flags.DEFINE_bool(
    "trust_remote_code", False, "allow hf: checkpoints that ship their own model code "
    "(e.g. BAAI/EVA-CLIP-8B) to run it")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "processes sharing the input shards")
_WORKER_INDEX = flags.DEFINE_integer("worker_index", 0, "this process's index, 0-based")
_MAX_SHARDS = flags.DEFINE_integer("max_shards", 0, "use only the first N input shards (0: all)")
_LIMIT = flags.DEFINE_integer("limit", 0, "read at most N samples of each input shard (0: all)")
_DECODE_WORKERS = flags.DEFINE_integer(
    "decode_workers", -1, "image decoding threads (-1: min(8, CPUs); 0: decode inline)")
_IMAGES_PER_SHARD = flags.DEFINE_integer(
    "images_per_shard", 10_000, "images of a folder per input (and output) shard")
_MIN_SIZE = flags.DEFINE_integer(
    "min_image_size", 16, "skip images whose shorter side is below this many pixels")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar (images/s)")


def fail(message: str):
  message = " ".join(str(message).splitlines())   # one line, whatever a path or error holds
  print(f"extract_features.py: error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, but a bad flag is one line and exit code 2 like every other error."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).strip().splitlines()[-1] if str(e).strip() else repr(e))


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}")
  std_logging.getLogger("timm").setLevel(std_logging.WARNING)
  config = extract.ExtractConfig(
      inputs=_INPUT.value or [], encoders=_ENCODER.value or [], out=_OUT.value or "",
      split=_SPLIT.value, holdout_fraction=_HOLDOUT.value, batch_size=_BATCH.value,
      dtype=_DTYPE.value, device=_DEVICE.value, precision=_PRECISION.value,
      trust_remote_code=_TRUST.value, num_workers=_NUM_WORKERS.value,
      worker_index=_WORKER_INDEX.value, max_shards=_MAX_SHARDS.value, limit=_LIMIT.value,
      decode_workers=_DECODE_WORKERS.value, images_per_shard=_IMAGES_PER_SHARD.value,
      min_image_size=_MIN_SIZE.value, progress=_PROGRESS.value)
  try:
    extract.run(config)
  except extract.CONFIG_ERRORS as e:
    fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
