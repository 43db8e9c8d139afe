"""The preprocessing each encoder's checkpoint prescribes, read from its own library's
settings (a transformers image processor, a timm data config) and reproduced exactly.

It runs in two parts so that the expensive one is shared: the geometric part (``Geometry``:
resize, centre crop) runs on uint8 PIL images in the decoding workers, once for all encoders
with the same geometry; the arithmetic part (``Preprocess.normalize``: rescale, mean/std)
runs on the device. The tests compare both parts with transformers' and timm's own pipelines.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Optional

import numpy as np
import torch


class EncoderError(ValueError):
  """An encoder that cannot be named, loaded or run: a configuration error, not a data one.
  Defined here, the lowest module that raises it (a checkpoint whose preprocessing cannot be
  reproduced); flowmap.encoders raises the same class."""


_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4,
                 "hamming": 5}
_RESAMPLE_NAMES = {v: k for k, v in _PIL_RESAMPLE.items()}


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Resize then centre-crop, on uint8 images, exactly as the reference pipeline does.

  ``resize`` is ("shortest", s, s): shorter side to s keeping the aspect ratio (long side
  truncated, as both transformers and torchvision compute it), ("exact", h, w), or None.
  ``crop_rounding`` is how the crop offset is rounded: "floor" (transformers) or "round"
  (torchvision, which timm uses).
  """
  resize: Optional[tuple]
  resample: int
  crop: Optional[tuple]
  crop_rounding: str = "floor"

  @property
  def output_size(self) -> tuple:
    if self.crop is not None:
      return tuple(self.crop)
    if self.resize is not None and self.resize[0] == "exact":
      return tuple(self.resize[1:])
    raise EncoderError(f"preprocessing {self} gives images of varying size")

  def resized_size(self, width: int, height: int) -> tuple:
    """(width, height) after the resize step."""
    if self.resize is None:
      return width, height
    kind, a, b = self.resize
    if kind == "exact":
      return b, a
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = a, int(a * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)

  def apply(self, image) -> np.ndarray:
    """PIL RGB image -> uint8 array [h, w, 3]."""
    size = self.resized_size(*image.size)
    if size != image.size:
      image = image.resize(size, resample=self.resample)
    array = np.asarray(image)
    if self.crop is not None:
      ch, cw = self.crop
      h, w = array.shape[:2]
      if ch > h or cw > w:
        raise ValueError(f"image of {w}x{h} px is smaller than the crop {cw}x{ch}")
      if self.crop_rounding == "round":
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
      else:
        top, left = (h - ch) // 2, (w - cw) // 2
      array = array[top:top + ch, left:left + cw]
    return np.ascontiguousarray(array)

  def check(self) -> None:
    """Rejects a geometry whose crop can exceed the resized image."""
    out = self.output_size
    if self.crop is not None and self.resize is not None:
      kind, a, b = self.resize
      small = (a, a) if kind == "shortest" else (a, b)
      if small[0] < out[0] or small[1] < out[1]:
        raise EncoderError(f"resize to {self.resize} is smaller than the crop {self.crop}")
    elif self.crop is not None:
      raise EncoderError("a centre crop without a resize depends on the image size")

  def to_json(self) -> dict:
    return {"resize": list(self.resize) if self.resize else None,
            "resample": _RESAMPLE_NAMES.get(self.resample, self.resample),
            "crop": list(self.crop) if self.crop else None, "crop_rounding": self.crop_rounding}


@dataclasses.dataclass(frozen=True)
class Preprocess:
  geometry: Geometry
  rescale: Optional[float]
  mean: Optional[tuple]
  std: Optional[tuple]

  def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, h, w, 3] on the device -> float32 [B, 3, h, w] the network expects."""
    x = pixels.permute(0, 3, 1, 2).to(torch.float32)
    if self.rescale is not None:
      x = x * self.rescale
    if self.mean is not None:
      mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
      std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
      x = (x - mean) / std
    return x

  def to_json(self) -> dict:
    return {**self.geometry.to_json(), "rescale": self.rescale,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None}


def _size_field(size, key):
  if size is None:
    return None
  if isinstance(size, Mapping):
    return size.get(key)
  return getattr(size, key, None)


def preprocess_from_hf_processor(processor) -> Preprocess:
  """The PIL pipeline of a transformers image processor (``backend="pil"``, the one the
  CLIP family was trained with), read from its attributes."""
  size, crop_size = getattr(processor, "size", None), getattr(processor, "crop_size", None)
  if getattr(processor, "do_pad", False):
    raise EncoderError(f"{type(processor).__name__}: padding processors are not supported")
  resize = None
  if getattr(processor, "do_resize", True):
    short, longest = _size_field(size, "shortest_edge"), _size_field(size, "longest_edge")
    height, width = _size_field(size, "height"), _size_field(size, "width")
    if isinstance(size, int):
      short = size
    if short and not longest:
      resize = ("shortest", int(short), int(short))
    elif height and width:
      resize = ("exact", int(height), int(width))
    else:
      raise EncoderError(f"{type(processor).__name__}: unsupported resize size {size}")
  crop = None
  if getattr(processor, "do_center_crop", False):
    ch, cw = _size_field(crop_size, "height"), _size_field(crop_size, "width")
    if isinstance(crop_size, int):
      ch = cw = crop_size
    if not (ch and cw):
      raise EncoderError(f"{type(processor).__name__}: unsupported crop size {crop_size}")
    crop = (int(ch), int(cw))
  resample = getattr(processor, "resample", None)
  resample = 2 if resample is None else int(resample)
  geometry = Geometry(resize, resample, crop, "floor")
  geometry.check()
  rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else None
  mean = std = None
  if getattr(processor, "do_normalize", True):
    mean, std = processor.image_mean, processor.image_std
    mean = tuple(float(v) for v in (mean if isinstance(mean, Iterable) else [mean] * 3))
    std = tuple(float(v) for v in (std if isinstance(std, Iterable) else [std] * 3))
  return Preprocess(geometry, rescale, mean, std)


def preprocess_from_timm_config(config: Mapping) -> Preprocess:
  """timm's evaluation transform (``transforms_imagenet_eval``) for a resolved data config."""
  _, h, w = config["input_size"]
  crop_pct = config.get("crop_pct") or 0.875
  crop_mode = config.get("crop_mode") or "center"
  interpolation = config.get("interpolation", "bilinear")
  if interpolation not in _PIL_RESAMPLE:
    raise EncoderError(f"timm interpolation {interpolation!r} is not supported")
  scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
  if crop_mode == "squash":
    resize = ("exact", *scale)
  elif crop_mode == "center" and scale[0] == scale[1]:
    resize = ("shortest", *scale)
  else:
    raise EncoderError(f"timm crop mode {crop_mode!r} with input size {(h, w)} is not supported")
  geometry = Geometry(resize, _PIL_RESAMPLE[interpolation], (int(h), int(w)), "round")
  geometry.check()
  return Preprocess(geometry, 1.0 / 255.0, tuple(float(v) for v in config["mean"]),
                    tuple(float(v) for v in config["std"]))
