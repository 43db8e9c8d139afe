"""The embedded demo dataset: two seeded "encoders" whose features are related non-locally.

Each image is a grid of independent latent tokens. The source encoder sees them through a
fixed nonlinear per-token map; the target encoder mixes every token with its 3 x 3
neighbourhood and with the image's global mean before a nonlinearity. A per-token linear map
(the ridge baseline) therefore recovers only a fraction of the target, while a model that
attends across the source grid can recover nearly all of it. A small amount of independent
target noise keeps the conditional distribution from being a point mass.
"""

from __future__ import annotations

import numpy as np

from flowmap import data as data_lib

SOURCE, TARGET = "source_enc", "target_enc"


class PairedEncoders:
  """A fixed pair of feature maps: parameters are a function of ``world_seed`` only."""

  def __init__(self, grid: int = 4, latent_dim: int = 32, source_dim: int = 48,
               target_dim: int = 32, noise: float = 0.05, world_seed: int = 0):
    rng = np.random.default_rng(world_seed)
    self.grid, self.latent_dim, self.noise = grid, latent_dim, noise
    self.source_dim, self.target_dim = source_dim, target_dim
    L = latent_dim
    self.source_proj = rng.normal(size=(L, source_dim)) / np.sqrt(L)
    self.source_mix = rng.normal(size=(L, source_dim)) / np.sqrt(L)
    self.source_mean = rng.normal(size=(source_dim,)) * 0.5
    self.centre = rng.normal(size=(L, L)) / np.sqrt(L)
    self.neighbours = rng.normal(size=(L, L)) / np.sqrt(L)
    self.global_ = rng.normal(size=(L, L)) / np.sqrt(L)
    self.readout = rng.normal(size=(L, target_dim)) / np.sqrt(L)
    self.skip = rng.normal(size=(L, target_dim)) / np.sqrt(L)
    self.target_mean = rng.normal(size=(target_dim,)) * 0.5

  def latents(self, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, self.grid, self.grid, self.latent_dim))

  def source(self, z: np.ndarray) -> np.ndarray:
    s = z @ self.source_proj + 0.5 * np.tanh(z @ self.source_mix) + self.source_mean
    return s.reshape(len(z), -1, self.source_dim)

  def target(self, z: np.ndarray, seed: int) -> np.ndarray:
    padded = np.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0)))
    g = self.grid
    neighbourhood = sum(padded[:, 1 + dy:1 + dy + g, 1 + dx:1 + dx + g]
                        for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
    global_mean = z.mean(axis=(1, 2), keepdims=True)
    h = z @ self.centre + (neighbourhood / 8.0 * 2.0) @ self.neighbours + \
        (global_mean * 3.0) @ self.global_
    y = np.tanh(h) @ self.readout + 0.3 * z @ self.skip + self.target_mean
    y = y + self.noise * np.random.default_rng(seed + 1).normal(size=y.shape)
    return y.reshape(len(z), -1, self.target_dim)

  def pairs(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    z = self.latents(n, seed)
    return self.source(z), self.target(z, seed)


def write_demo_dataset(out_dir: str, train_size: int = 4096, validation_size: int = 512,
                       seed: int = 0, **encoder_kwargs) -> str:
  """Writes the demo features dataset (same writer and layout as extraction); idempotent."""
  if data_lib.is_complete(out_dir):
    return out_dir
  encoders = PairedEncoders(**encoder_kwargs)
  splits = {}
  for split, size, split_seed in (("train", train_size, seed * 2 + 10),
                                  ("validation", validation_size, seed * 2 + 11)):
    src, tgt = encoders.pairs(size, split_seed)
    splits[split] = [
        {"key": f"{split}-{i:06d}", "caption": "",
         "features": {SOURCE: src[i], TARGET: tgt[i]}}
        for i in range(size)]
  feature_shapes = {SOURCE: (encoders.grid ** 2, encoders.source_dim),
                    TARGET: (encoders.grid ** 2, encoders.target_dim)}
  manifest = {"encoders": {
      SOURCE: {"spec": "synthetic:source", "layer": "n/a", "tokens": "patch"},
      TARGET: {"spec": "synthetic:target", "layer": "n/a", "tokens": "patch"}},
      "inputs": [f"synthetic(seed={seed})"]}
  data_lib.write_dataset(out_dir, splits, feature_shapes, manifest=manifest)
  return out_dir
