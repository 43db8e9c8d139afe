"""The embedded demo dataset, and a family of synthetic evaluation tasks.

The demo: two seeded "encoders" whose features are related non-locally.

Each image is a grid of independent latent tokens. The source encoder sees them through a
fixed nonlinear per-token map; the target encoder mixes every token with its 3 x 3
neighbourhood and with the image's global mean before a nonlinearity. A per-token linear map
(the ridge baseline) therefore recovers only a fraction of the target, while a model that
attends across the source grid can recover nearly all of it. A small amount of independent
target noise keeps the conditional distribution from being a point mass.

The task family (``TASKS``, ``make_task``, ``write_task``): seeded encoder pairs on the token
layouts users have (equal grids, a finer or coarser source grid, patch tokens to a pooled
embedding, pooled to pooled) and tasks whose target spreads around a source-determined centre,
each with its true conditional mean and, where it spreads, its spread directions, so that an
evaluation can say how far a map is from the best possible one and whether samples keep the
spread.
"""

from __future__ import annotations

import inspect
import json
import os
import zlib

import numpy as np

from flowmap import data as data_lib

SOURCE, TARGET = "source_enc", "target_enc"


class PairedEncoders:
  """A fixed pair of feature maps: parameters are a function of ``world_seed`` only."""

  def __init__(self, grid: int = 4, latent_dim: int = 32, source_dim: int = 48,
               target_dim: int = 32, noise: float = 0.05, world_seed: int = 0,
               target_scale: float = 1.0):
    rng = np.random.default_rng(world_seed)
    self.target_scale = float(target_scale)   # every target value times this (raw scale)
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
    return (self.target_scale * y).reshape(len(z), -1, self.target_dim)

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


# ----------------------------------------------------------------------------- the task family
#
# Each task is a seeded pair of "encoders" over a grid of independent latent tokens z
# [rows, grid, grid, latent]. The source sees the latents through an injective nonlinear map
# (an invertible mixing plus a contraction, with extra dimensions that carry a nonlinear
# function of the same latents), so the source determines z exactly and the noiseless target
# is the true E[target | source]. Tasks differ in the two token layouts and, for the spread
# tasks, in what the source does not determine.

CONDITIONAL_MEAN = "conditional_mean"   # rows() key of E[target | source]
TARGET_NOISE = 0.05                     # independent noise on every target coordinate
MODES = 4                               # the spread_modes task's discrete modes


def _space_to_depth(z: np.ndarray, grid: int) -> np.ndarray:
  """[n, G, G, d] -> [n, grid, grid, (G / grid)^2 d]: each coarse cell holds its fine latents."""
  n, g, _, d = z.shape
  f = g // grid
  cells = z.reshape(n, grid, f, grid, f, d).transpose(0, 1, 3, 2, 4, 5)
  return cells.reshape(n, grid, grid, f * f * d)


def _block_mean(x: np.ndarray, grid: int) -> np.ndarray:
  """[n, G, G, d] -> [n, grid, grid, d], each coarse token the mean of its fine block."""
  n, g, _, d = x.shape
  f = g // grid
  return x.reshape(n, grid, f, grid, f, d).mean(axis=(2, 4))


def _neighbour_mean(z: np.ndarray) -> np.ndarray:
  """Mean of the 8 neighbours of every grid token (zero outside the grid)."""
  g = z.shape[1]
  padded = np.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0)))
  total = sum(padded[:, 1 + dy:1 + dy + g, 1 + dx:1 + dx + g]
              for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
  return total / 8.0


def _linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """x [..., d] @ w [d, e] as one 2-D matmul (BLAS); numpy's stacked matmul over the small
  trailing dimensions of a [rows, grid, grid, d] array is many times slower."""
  return np.tensordot(x, w, axes=1)


def _orthonormal_rows(rng: np.random.Generator, k: int, dim: int) -> np.ndarray:
  q, _ = np.linalg.qr(rng.normal(size=(dim, k)))
  return q.T


class GridPair:
  """A source and a target encoder over one latent grid; parameters depend on
  (``world_seed``, ``name``) only, rows on the seed given to ``rows``.

  The latents live on the finer of the two grids (``latent_grid``). A source token is an
  injective map of the latents of its cell (several fine latents when the source grid is the
  coarser). A target token reads a nonlinear mix of each latent with its 3 x 3 neighbourhood
  and with the image's global mean, averaged over its cell when the target grid is the coarser
  (then, with ``head`` > 0, through a second nonlinear layer of that gain, as an encoder's head
  reads its pooled features), plus a linear skip of the same latents and a small independent
  noise.
  """

  directions = None   # [k, dim] or [k, tokens, dim]: where the target spreads (SpreadPair)

  def __init__(self, name: str, source_grid: int, target_grid: int, latent_dim: int,
               source_dim: int, target_dim: int, neighbour_weight: float = 1.5,
               global_weight: float = 1.5, skip: float = 0.3, head: float = 0.0,
               world_seed: int = 0):
    self.name = name
    self.source_grid, self.target_grid = source_grid, target_grid
    self.latent_grid = max(source_grid, target_grid)
    self.latent_dim, self.source_dim, self.target_dim = latent_dim, source_dim, target_dim
    self.neighbour_weight, self.global_weight, self.skip = neighbour_weight, global_weight, skip
    self.head = head
    rng = np.random.default_rng([world_seed, zlib.crc32(name.encode())])
    cell = latent_dim * (self.latent_grid // source_grid) ** 2
    if source_dim < cell:
      raise ValueError(f"{name}: source_dim {source_dim} cannot hold a cell's {cell} latents")
    L = latent_dim
    contraction = rng.normal(size=(cell, cell))
    self.contraction = contraction * 1.5 / np.linalg.norm(contraction, 2)
    self.source_mix = rng.normal(size=(cell, cell)) / np.sqrt(cell)
    basis = _orthonormal_rows(rng, source_dim, source_dim)
    self.source_visible, self.source_extra = basis[:cell], basis[cell:]
    self.source_extra_mix = rng.normal(size=(cell, source_dim - cell)) / np.sqrt(cell)
    self.source_mean = rng.normal(size=(source_dim,)) * 0.5
    self.centre = rng.normal(size=(L, L)) / np.sqrt(L)
    self.neighbours = rng.normal(size=(L, L)) / np.sqrt(L)
    self.global_ = rng.normal(size=(L, L)) / np.sqrt(L)
    self.readout = rng.normal(size=(L, target_dim)) / np.sqrt(L)
    self.skip_map = rng.normal(size=(L, target_dim)) / np.sqrt(L)
    self.target_mean = rng.normal(size=(target_dim,)) * 0.5
    self.head_map = rng.normal(size=(L, L)) / np.sqrt(L)

  @property
  def source_shape(self) -> tuple[int, int]:
    return (self.source_grid ** 2, self.source_dim)

  @property
  def target_shape(self) -> tuple[int, int]:
    return (self.target_grid ** 2, self.target_dim)

  def latents(self, n: int, seed: int) -> np.ndarray:
    g = self.latent_grid
    return np.random.default_rng([seed, 0]).normal(size=(n, g, g, self.latent_dim))

  def source(self, z: np.ndarray) -> np.ndarray:
    """u + 0.5 tanh(u A) with ||A|| = 1.5 is injective (the tanh term is a contraction), the
    mixing is invertible, and the extra dimensions are orthogonal to it: z is determined."""
    u = _space_to_depth(z, self.source_grid)
    visible = _linear(u + 0.5 * np.tanh(_linear(u, self.contraction)),
                      self.source_mix @ self.source_visible)
    extra = _linear(0.5 * np.tanh(_linear(u, self.source_extra_mix)), self.source_extra)
    return (visible + extra + self.source_mean).reshape(len(z), -1, self.source_dim)

  def conditional_mean(self, z: np.ndarray) -> np.ndarray:
    """E[target | source]: the noiseless target. Neighbourhood and global means are scaled to
    unit variance before their weights, so the mix reads the same on every grid size."""
    tokens = self.latent_grid ** 2
    h = (_linear(z, self.centre)
         + _linear(self.neighbour_weight * np.sqrt(8.0) * _neighbour_mean(z), self.neighbours)
         + _linear(self.global_weight * np.sqrt(tokens) * z.mean(axis=(1, 2), keepdims=True),
                   self.global_))
    features = _block_mean(np.tanh(h), self.target_grid)
    if self.head:
      features = np.tanh(_linear(self.head * features, self.head_map))
    y = (_linear(features, self.readout)
         + _linear(self.skip * _block_mean(z, self.target_grid), self.skip_map)
         + self.target_mean)
    return y.reshape(len(z), -1, self.target_dim)

  def target(self, z: np.ndarray, seed: int) -> np.ndarray:
    """One draw from the target's conditional distribution given the source."""
    return self._draw(self.conditional_mean(z), seed)

  def _draw(self, mean: np.ndarray, seed: int) -> np.ndarray:
    return mean + TARGET_NOISE * np.random.default_rng([seed, 1]).normal(size=mean.shape)

  def rows(self, n: int, seed: int) -> dict:
    """n rows: {SOURCE, TARGET, CONDITIONAL_MEAN: [n, tokens, dim] float64}."""
    z = self.latents(n, seed)
    mean = self.conditional_mean(z)
    return {SOURCE: self.source(z), TARGET: self._draw(mean, seed), CONDITIONAL_MEAN: mean}


class SpreadPair(GridPair):
  """A 4 x 4 grid pair whose target spreads around the source-determined centre along a few
  ``directions`` that the source does not show, with unit variance along each.

  The centre is the grid pair's conditional mean with its component along the directions
  removed, so along them the conditional mean does not vary at all: there a regressor's
  variance ratio is 0 (up to the noise) and a faithful sampler's 1.
  """

  def __init__(self, name: str, spread: str, world_seed: int = 0):
    super().__init__(name, source_grid=4, target_grid=4, latent_dim=16, source_dim=32,
                     target_dim=32, world_seed=world_seed)
    self.spread = spread
    rng = np.random.default_rng([world_seed, zlib.crc32(name.encode()), 1])
    k = 3 if spread == "sphere" else 2
    tokens, dim = self.target_shape
    if spread == "shared_mapped":
      self.directions = _orthonormal_rows(rng, k, tokens * dim).reshape(k, tokens, dim)
    else:
      self.directions = _orthonormal_rows(rng, k, dim)

  def _along(self, coefficients: np.ndarray) -> np.ndarray:
    """Coefficients on the directions -> the displacement [n, tokens, dim]: [n, k] or
    [n, tokens, k] for per-token directions [k, dim], [n, k] for whole-array ones."""
    if self.directions.ndim == 3:
      return np.tensordot(coefficients, self.directions, axes=1)
    if coefficients.ndim == 2:
      coefficients = np.repeat(coefficients[:, None, :], self.target_shape[0], axis=1)
    return _linear(coefficients, self.directions)

  def conditional_mean(self, z: np.ndarray) -> np.ndarray:
    mean = super().conditional_mean(z)
    if self.directions.ndim == 3:
      return mean - self._along(np.tensordot(mean, self.directions, axes=((1, 2), (1, 2))))
    return mean - _linear(_linear(mean, self.directions.T), self.directions)

  def spread_coefficients(self, n: int, seed: int) -> np.ndarray:
    """Each row's coefficients on the directions, independent of the source, mean 0 and unit
    variance per direction."""
    rng = np.random.default_rng([seed, 2])
    k = len(self.directions)
    if self.spread == "modes":
      angle = 2 * np.pi * (rng.integers(0, MODES, size=n) + 0.5) / MODES
      return np.sqrt(2.0) * np.stack([np.cos(angle), np.sin(angle)], -1)
    if self.spread == "sphere":
      g = rng.normal(size=(n, k))
      return np.sqrt(k) * g / np.linalg.norm(g, axis=-1, keepdims=True)
    if self.spread == "per_token":
      return rng.normal(size=(n, self.target_shape[0], k))
    scale = np.sqrt(self.target_shape[0]) if self.spread == "shared_mapped" else 1.0
    return scale * rng.normal(size=(n, k))

  def _draw(self, mean: np.ndarray, seed: int) -> np.ndarray:
    return super()._draw(mean, seed) + self._along(self.spread_coefficients(len(mean), seed))


def grid_equal(world_seed: int = 0) -> GridPair:
  """4 x 4 source (32-d) -> 4 x 4 target (32-d). Each target token is a nonlinear function of
  its own latent, its 3 x 3 neighbourhood and the image's global mean: a per-token linear map
  sees only its own token, and only linearly; a model that attends over the source grid can
  recover the whole conditional mean."""
  return GridPair("grid_equal", 4, 4, latent_dim=16, source_dim=32, target_dim=32,
                  world_seed=world_seed)


def grid_finer_source(world_seed: int = 0) -> GridPair:
  """8 x 8 source (32-d) -> 4 x 4 target (32-d), like EVA-CLIP at 448 px against CLIP at
  336 px, or BLIP3-o's 16 x 16 against its pooled 8 x 8. A target token reads a nonlinear
  function of the four fine latents under it (and their neighbours and the global mean): area
  pooling the source before a linear map averages them away; attention over the fine source
  tokens keeps them apart."""
  return GridPair("grid_finer_source", 8, 4, latent_dim=16, source_dim=32, target_dim=32,
                  world_seed=world_seed)


def grid_coarser_source(world_seed: int = 0) -> GridPair:
  """4 x 4 source (64-d: each token holds its 2 x 2 cell of fine latents) -> 8 x 8 target
  (32-d). Each of the four target tokens under a source token reads a different fine latent
  from it: a linear map shared by positions over the upsampled source cannot tell the four
  apart, a model that knows the target position and attends over the source can."""
  return GridPair("grid_coarser_source", 4, 8, latent_dim=16, source_dim=64, target_dim=32,
                  world_seed=world_seed)


def grid_to_pooled(world_seed: int = 0) -> GridPair:
  """8 x 8 source (32-d) -> one pooled target token (32-d), like patch tokens to an image
  embedding. The target is a nonlinear head over the mean of nonlinear token features (with
  neighbourhood and global context): the mean of the source tokens, all that a pooled linear
  map sees, does not determine it."""
  return GridPair("grid_to_pooled", 8, 1, latent_dim=16, source_dim=32, target_dim=32,
                  head=2.0, world_seed=world_seed)


def pooled_to_pooled(world_seed: int = 0) -> GridPair:
  """One pooled source token (48-d) -> one pooled target token (48-d), like EVA-CLIP's image
  embedding to CLIP L/14's. The target is a saturating nonlinear readout of the 32 latents
  that the source encodes: a linear map recovers its linear part, a nonlinear regressor most
  of the rest."""
  return GridPair("pooled_to_pooled", 1, 1, latent_dim=32, source_dim=48, target_dim=48,
                  world_seed=world_seed)


def spread_modes(world_seed: int = 0) -> SpreadPair:
  """4 x 4 -> 4 x 4; every token of an image moves by one of four discrete modes (a square
  in a 2-d plane of the token space, chosen per image, independent of the source) around the
  source-determined centre. A regressor outputs the centre, between the modes, where the
  target never is; a sampler can put each image in one mode."""
  return SpreadPair("spread_modes", "modes", world_seed)


def spread_sphere(world_seed: int = 0) -> SpreadPair:
  """4 x 4 -> 4 x 4; every token of an image moves by one point drawn uniformly on a sphere
  (3-d subspace of the token space, radius sqrt(3)) around the centre: a continuum of
  directions, no mode, and the centre itself is never the target."""
  return SpreadPair("spread_sphere", "sphere", world_seed)


def spread_per_token(world_seed: int = 0) -> SpreadPair:
  """4 x 4 -> 4 x 4; each token moves on its own (independent Gaussian, unit variance) along
  two directions of the token space: a per-token spread that a sampler reproduces token by
  token and a regressor removes."""
  return SpreadPair("spread_per_token", "per_token", world_seed)


def spread_shared(world_seed: int = 0) -> SpreadPair:
  """4 x 4 -> 4 x 4; every token of an image moves by the same Gaussian displacement along
  two directions of the token space: the spread is correlated across tokens, so a sampler
  has to draw one displacement per image, not per token."""
  return SpreadPair("spread_shared", "shared", world_seed)


def spread_shared_mapped(world_seed: int = 0) -> SpreadPair:
  """4 x 4 -> 4 x 4; one Gaussian displacement per image (2-d) reaches each token through an
  arbitrary position-specific linear map (orthonormal directions of the whole [tokens, dim]
  array): the known hard case, where a sampler has to tie every token's spread to one
  shared draw through a different map at each position."""
  return SpreadPair("spread_shared_mapped", "shared_mapped", world_seed)


_BUILDERS = {f.__name__: f for f in (
    grid_equal, grid_finer_source, grid_coarser_source, grid_to_pooled, pooled_to_pooled,
    spread_modes, spread_sphere, spread_per_token, spread_shared, spread_shared_mapped)}
TASKS = {name: inspect.getdoc(f) for name, f in _BUILDERS.items()}   # name -> description
GRID_TASKS = tuple(n for n in TASKS if not n.startswith("spread_"))
SPREAD_TASKS = tuple(n for n in TASKS if n.startswith("spread_"))


def make_task(name: str, world_seed: int = 0) -> GridPair:
  if name not in _BUILDERS:
    raise ValueError(f"unknown synthetic task {name!r}; choose one of {', '.join(TASKS)}")
  return _BUILDERS[name](world_seed)


def _split_seeds(seed: int) -> dict:
  return {"train": seed * 2 + 10, "validation": seed * 2 + 11}


def write_task(out_dir: str, name: str, train_size: int = 2000, validation_size: int = 512,
               seed: int = 0, world_seed: int = 0) -> dict:
  """Writes task ``name`` as a features dataset (same writer and layout as extraction, the
  features ``SOURCE`` and ``TARGET``) and returns its description (``read_task``); idempotent.
  The manifest records the task, so ``task_rows`` regenerates any split's rows, the true
  conditional mean with them, and ``spread_directions`` reads the directions."""
  info = {"name": name, "world_seed": world_seed, "seed": seed,
          "sizes": {"train": train_size, "validation": validation_size}}
  if data_lib.is_complete(out_dir):
    written = read_task(out_dir)
    if {k: written.get(k) for k in info} != info:
      raise ValueError(f"{out_dir} already holds a different dataset "
                       f"({ {k: written.get(k) for k in info} }); choose another directory")
    return written
  task = make_task(name, world_seed)
  info.update(description=TASKS[name], source=SOURCE, target=TARGET,
              source_shape=list(task.source_shape), target_shape=list(task.target_shape),
              spread_directions=(None if task.directions is None
                                 else task.directions.tolist()))
  splits = {}
  for split, size in info["sizes"].items():
    rows = task.rows(size, _split_seeds(seed)[split])
    splits[split] = [{"key": f"{split}-{i:06d}", "caption": "",
                      "features": {SOURCE: rows[SOURCE][i], TARGET: rows[TARGET][i]}}
                     for i in range(size)]
  manifest = {"encoders": {
      SOURCE: {"spec": f"synthetic:{name}:source", "layer": "n/a", "tokens": "patch"},
      TARGET: {"spec": f"synthetic:{name}:target", "layer": "n/a", "tokens": "patch"}},
      "inputs": [f"synthetic(task={name}, seed={seed}, world_seed={world_seed})"],
      "task": info}
  data_lib.write_dataset(out_dir, splits, {SOURCE: task.source_shape, TARGET: task.target_shape},
                         manifest=manifest)
  return info


def read_task(data_dir: str) -> dict:
  """The task record of a dataset written by ``write_task`` (its manifest's ``task``)."""
  with open(os.path.join(data_dir, "manifest.json")) as f:
    manifest = json.load(f)
  if "task" not in manifest:
    raise ValueError(f"{data_dir} was not written by synthetic.write_task")
  return manifest["task"]


def task_rows(info: dict, split: str) -> dict:
  """A written split's rows regenerated in float64 (the dataset stores float16), with the true
  conditional mean that the dataset does not store: {SOURCE, TARGET, CONDITIONAL_MEAN}."""
  task = make_task(info["name"], info["world_seed"])
  return task.rows(info["sizes"][split], _split_seeds(info["seed"])[split])


def spread_directions(info: dict) -> np.ndarray | None:
  """The task's spread directions, [k, dim] or [k, tokens, dim], for
  ``metrics.variance_ratio(..., directions=...)``; None for a task without spread."""
  d = info.get("spread_directions")
  return None if d is None else np.asarray(d, np.float64)
