"""Tiny encoders and webdataset inputs for the extraction tests, built offline.

The inputs hold every kind of bad item extraction must survive; ``EXPECTED`` says how each
is counted.
"""

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

import flowmap.encoders  # noqa: F401  (first: it makes torchvision, hence timm, importable)

CLIP_SIZE = 32
EVA_SIZE = 32


def build_clip(directory: str, width: int = 32, image_size: int = CLIP_SIZE,
               projection_dim: int = 16) -> str:
  """A 2-block CLIP vision tower (patch 8 on 32 px: 16 patches + CLS) with its projection
  and image processor, saved as transformers does."""
  import torch
  from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
  torch.manual_seed(0)
  config = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                            patch_size=8, projection_dim=projection_dim)
  CLIPVisionModelWithProjection(config).eval().save_pretrained(directory)
  CLIPImageProcessor(size={"shortest_edge": image_size},
                     crop_size={"height": image_size, "width": image_size}
                     ).save_pretrained(directory)
  return directory


def build_eva(directory: str, width: int = 32, image_size: int = EVA_SIZE,
              head_dim: int = 16) -> str:
  """A 2-block EVA02 (rotary embeddings, SwiGLU, CLS pooling, 16-d head standing in for the
  CLIP projection), saved for ``timm:local-dir:``. Its data config keeps eva02's crop_pct
  0.9, so its geometry differs from the CLIP one."""
  import timm
  import torch
  from timm.models import save_for_hf
  torch.manual_seed(1)
  model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=image_size,
                            patch_size=8, embed_dim=width, depth=2, num_heads=2,
                            num_classes=head_dim, global_pool="token")
  save_for_hf(model.eval(), directory, safe_serialization=True)
  return directory


def picture(seed: int, width: int = 48, height: int = 40) -> Image.Image:
  """A smooth random RGB image (gradients plus noise), so resizing matters."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  channels = [np.sin(x / rng.uniform(3, 9) + rng.uniform(0, 6)) +
              np.cos(y / rng.uniform(3, 9) + rng.uniform(0, 6)) for _ in range(3)]
  array = (np.stack(channels, -1) * 60 + 128 + rng.normal(0, 10, (height, width, 3)))
  return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB")


def encoded(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue()


def grayscale16(seed: int) -> Image.Image:
  array = (np.asarray(picture(seed).convert("L"), np.uint16) * 257).astype(np.uint16)
  return Image.fromarray(array)


def palette_with_transparency(seed: int) -> Image.Image:
  image = picture(seed).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
  image.info["transparency"] = 0
  return image


def rgba(seed: int) -> Image.Image:
  image = picture(seed).convert("RGBA")
  alpha = np.full(image.size[::-1], 255, np.uint8)
  alpha[:, : image.size[0] // 2] = 60
  image.putalpha(Image.fromarray(alpha))
  return image


def truncated_jpeg(seed: int) -> bytes:
  data = encoded(picture(seed), "JPEG")
  return data[: len(data) // 2]


def write_tar(path: str, members) -> None:
  """members: (name, bytes), in order."""
  with tarfile.open(path, "w") as tar:
    for name, payload in members:
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      info.mtime = 0
      tar.addfile(info, io.BytesIO(payload))


def caption(text: str) -> bytes:
  return text.encode()


def build_inputs(root: str) -> dict:
  """Three webdataset shards and a folder under ``root``; returns their paths."""
  shards = os.path.join(root, "shards")
  os.makedirs(shards, exist_ok=True)
  write_tar(os.path.join(shards, "00000.tar"), [
      ("a/s0000.jpg", encoded(picture(0), "JPEG")), ("a/s0000.txt", caption("a red thing")),
      ("a/s0001.jpg", encoded(picture(1, 40, 48), "JPEG")),
      ("a/s0001.json", json.dumps({"caption": "json caption", "url": "x"}).encode()),
      ("a/s0002.jpg", truncated_jpeg(2)), ("a/s0002.txt", caption("corrupted")),
      ("a/s0003.jpg", encoded(picture(3).convert("CMYK"), "JPEG")),
      ("a/s0003.txt", caption("cmyk")),
      ("a/s0004.png", encoded(picture(4, 61, 37), "PNG")), ("a/s0004.txt", caption("png")),
      ("a/s0005.webp", encoded(picture(5), "WEBP")), ("a/s0005.txt", caption("webp")),
  ])
  write_tar(os.path.join(shards, "00001.tar"), [
      ("s0100.png", encoded(picture(100).convert("L"), "PNG")),
      ("s0100.txt", caption("grayscale")),
      ("s0101.png", encoded(picture(101).resize((1, 1)), "PNG")),
      ("s0101.txt", caption("one pixel")),
      ("s0102.txt", caption("no image at all")),
      ("s0103.jpg", encoded(picture(103, 33, 47), "JPEG")),
      ("s0104.png", encoded(palette_with_transparency(104), "PNG")),
      ("s0104.txt", caption("palette")),
      ("s0105.jpeg", encoded(picture(105), "JPEG")), ("s0105.txt", caption("jpeg")),
  ])
  members = []
  for i in range(6):
    members += [(f"s02{i:02d}.jpg", encoded(picture(200 + i), "JPEG")),
                (f"s02{i:02d}.txt", caption(f"sample {i}"))]
  # Cut inside the fifth image, as a killed download would: four samples survive.
  sizes = [512 + (len(p) + 511) // 512 * 512 for _, p in members]
  cut = sum(sizes[:8]) + 512 + len(members[8][1]) // 2
  write_tar(os.path.join(shards, "00002.tar"), members)
  with open(os.path.join(shards, "00002.tar"), "rb") as f:
    data = f.read()
  with open(os.path.join(shards, "00002.tar"), "wb") as f:
    f.write(data[:cut])
  folder = os.path.join(root, "folder")
  os.makedirs(os.path.join(folder, "x", "y"), exist_ok=True)
  picture(300).save(os.path.join(folder, "x", "f0.jpg"))
  with open(os.path.join(folder, "x", "f0.txt"), "w") as f:
    f.write("folder caption")
  grayscale16(301).save(os.path.join(folder, "x", "y", "f1.png"))
  rgba(302).save(os.path.join(folder, "f2.png"))
  picture(303, 50, 50).save(os.path.join(folder, "f3.bmp"))
  with open(os.path.join(folder, "notes.md"), "w") as f:
    f.write("not an image")
  return {"shards": shards, "folder": folder,
          "tar_glob": os.path.join(shards, "*.tar"),
          "tar_braces": os.path.join(shards, "{00000..00002}.tar")}


# How the inputs above are counted (keys as stored).
EXPECTED = {
    "read": 6 + 6 + 4 + 4,
    "skipped": {"corrupt_image": 1, "too_small": 1, "no_image": 1, "truncated_tar": 1},
    "converted": {"CMYK": 1, "L": 1, "P": 1, "RGBA": 1, "I;16": 1},
    "captions": {"missing": 4},   # s0103 and the three folder images without a .txt
    "written_keys": sorted(
        ["a/s0000", "a/s0001", "a/s0003", "a/s0004", "a/s0005",
         "s0100", "s0103", "s0104", "s0105",
         "s0200", "s0201", "s0202", "s0203",
         "x/f0", "x/y/f1", "f2", "f3"]),
}
