"""Samples -> RGB images, resized and cropped once per geometry the encoders need, and
their captions as text.

Decoding runs in a thread pool (Pillow releases the GIL while decoding and resizing) ahead
of the device. A bad item (corrupted or truncated image, too small, no image) is skipped
with its reason; an unusual mode (CMYK, palette, 16-bit, alpha, grayscale) is converted to
RGB and counted; nothing about one item stops the job.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
from typing import Iterator, Optional, Sequence

import numpy as np

from flowmap.extract.inputs import Sample

JSON_CAPTION_FIELDS = ("caption", "short_caption", "text", "prompt")


class SkipItem(Exception):
  """An item that is not written; ``reason`` is the one it is counted under."""

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


def prepared_in_order(samples: Iterator[Sample], pool, geometries, min_size: int,
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
