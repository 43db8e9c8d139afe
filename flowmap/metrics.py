"""Metrics, in numpy and float64: generated against true features in the raw target space.

No JAX here: a figure is computed on the host from arrays gathered batch by batch, so it does
not depend on the batch size, the device count or the backend. ``Metrics.add`` takes one batch
at a time and keeps sums, merged moments and the pooled vectors, never the rows themselves, so
evaluation holds one batch in float64 at a time.

Features are ``[rows, tokens, dim]``; a generated batch is either the same shape (one sample per
row) or ``[rows, K, tokens, dim]`` (K samples per row).

How to read the figures
-----------------------
Pointwise figures compare each generated row with its own true row. They reward the conditional
mean E[target | source]: where the target spreads around a source-dependent centre, a perfect
sampler has twice the mean's expected squared error, so these figures cannot tell a good sampler
from a regressor.

- ``cosine_token``: mean over tokens and images of the cosine between generated and true token.
- ``cosine_global``: mean over images of the cosine between the mean-pooled vectors.
- ``mse``: mean squared error per element.
- ``r2``: 1 - SSE / SST, SST the squared deviation of the true rows from the evaluated set's mean
  at each (token, dim). Unlike cosine it is not inflated by a large common offset: predicting the
  evaluated set's mean scores exactly 0 (pooled CLIP embeddings: the mean alone has cosine 0.9).
- ``recall_at_1``: the pooled generated vector of image i retrieves, by cosine, image i's pooled
  true vector among all evaluated images (ties go to the lowest index, so a constant predictor
  scores 1/n).

Distribution-level figures compare the set of generated rows with the set of true rows. They
reward a faithful sampler; a regressor scores badly wherever the target spreads given the source.

- ``fd_pooled``: Frechet distance between the pooled generated and pooled true vectors (0 for
  equal means and covariances; lower is better). ``fd_tokens``: the same at each token position
  across images, averaged over positions. When dim is above ``FD_POOLED_DIM`` (pooled) or
  ``FD_TOKEN_DIM`` (per position), both sets go through one fixed seeded orthonormal projection
  first: the figure is the Frechet distance of a random linear view of that size. The sizes keep
  the covariances estimable from a few hundred images (512 images at 256 x 256 or 64 x 64) and
  the cost low. Even two independent draws of the truth score above 0 (the estimate is biased
  upwards, more so with fewer images), so compare figures at equal image counts on the same
  target, never with FIDs reported elsewhere.
- ``variance_ratio``: variance across images of each generated (token, dim) coordinate over
  that of the truth, averaged over coordinates (those with zero true variance are left out). 1
  for a faithful sampler; a regressor keeps only Var(E[target | source]), so it reads 1 minus
  the share of the variance that the source does not determine; above 1 is over-dispersed.
  ``variance_ratio_below_half``: the share of coordinates whose ratio is below 0.5, where the
  spread collapsed. ``variance_ratio_along`` (when ``directions`` are given): the same ratio of
  variances of the projections on given directions, averaged, e.g. on the directions along which
  a task's target is known to spread.
- ``density`` and ``coverage`` (Naeem et al. 2020, k nearest neighbours, k = ``NEAREST_K``) of
  the pooled generated vectors against the pooled true ones. Each true vector's ball reaches its
  k-th nearest true neighbour. density: how many balls a generated vector falls in, over k,
  averaged (fidelity); coverage: the share of balls holding at least one generated vector
  (diversity). For two samples of one distribution density is 1 in expectation and coverage
  1 - prod_{j=1..k} (N - j) / (N + M - j) (N true, M generated vectors; 0.969 at N = M = 512,
  k = 5); disjoint sets score 0. Density well above 1 means generated vectors crowd where true
  ones are dense, a sign of collapse towards the centre, not of a better sampler. In high
  dimension the balls are wide and a regressor's outputs lie inside the true cloud, so coverage
  does not catch a collapse (in the tests' 32-dim Gaussian case the conditional mean covers
  every ball, at density 3.5, and a faithful sampler 98%, at density 1.1): read both next to the
  variance ratio and the Frechet distances.

Figures over K >= 2 samples per row (every other figure scores the first sample of each row, so
it reads as a one-sample evaluation would):

- ``energy_score``: E||X - y|| - E||X - X'|| / 2 over the samples X, X' of a row and its true
  features y (each row's whole ``tokens x dim`` array is one vector), with the unbiased estimate
  of the second term, averaged over rows; lower is better. It is a proper scoring rule: in
  expectation the true conditional distribution scores best, so it rewards samples that are both
  close and as spread as the truth. K copies of the mean score the mean's distance ||m - y||.
- ``spread_skill``: sqrt((K + 1) / K * mean sample variance / mean squared error of the sample
  mean), over every element. 1 for calibrated samples; below 1 over-confident (too little
  spread for the error made), above 1 over-dispersed.

Cost at 512 images of 256 x 1024, batches of 64, measured in CPU seconds on one core (one BLAS
thread): 6.4 s in all for one sample per row, of which the pointwise figures' float64 casts and
passes (as before) about 3.3 s, the per-coordinate moments behind r2 and the variance ratio
1.6 s, fd_tokens' 1024 -> 64 projection of every token 1.3 s and its 256 Frechet distances of
64 x 64 0.2 s; fd_pooled, density, coverage and recall work on the pooled [512, 1024] vectors
(under 0.1 s). K = 4 samples per row add 2.5 s for energy_score and spread_skill (plus the cast
of a four times larger batch). Kept between batches: about 35 MB (the pooled vectors, the
per-coordinate and per-position moments); the peak is one batch in float64. Multithreaded BLAS
on cores that other processes keep busy can make the eigendecompositions many times slower;
one BLAS thread per process is the safe setting there.
"""

from __future__ import annotations

import functools

import numpy as np

METRICS = ("cosine_token", "cosine_global", "mse", "r2", "recall_at_1", "fd_pooled", "fd_tokens",
           "variance_ratio", "variance_ratio_below_half", "density", "coverage")
SAMPLE_METRICS = ("energy_score", "spread_skill")   # with K >= 2 samples per row
FD_POOLED_DIM = 256
FD_TOKEN_DIM = 64
PROJECTION_SEED = 0
NEAREST_K = 5


def cosine(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  num = (a * b).sum(axis)
  den = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
  return num / np.maximum(den, 1e-12)


def _ratio(num, den) -> float:
  """num / den, NaN where the denominator is 0 (a figure that the data cannot define)."""
  return float(num / den) if den != 0 else float("nan")


# ----------------------------------------------------------------------------- Frechet distance

def _trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> np.ndarray:
  """tr sqrt(cov_a cov_b) for PSD matrices, stacked on leading axes.

  cov_a cov_b is not symmetric, and its general square root has complex rounding parts; its
  eigenvalues are those of R cov_a R with R = sqrt(cov_b), which is symmetric PSD, so two
  symmetric eigendecompositions give the trace with no complex arithmetic. Eigenvalues that
  rounding pushes below 0 are clipped. The root is taken of cov_b: pass the truth there, whose
  covariance is the one less likely to be singular.
  """
  w, v = np.linalg.eigh(cov_b)
  root = (v * np.sqrt(np.clip(w, 0.0, None))[..., None, :]) @ np.swapaxes(v, -1, -2)
  m = root @ cov_a @ root
  m = (m + np.swapaxes(m, -1, -2)) / 2
  return np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum(-1)


def _frechet(mean_a, cov_a, mean_b, cov_b) -> np.ndarray:
  """Frechet distance between Gaussians with these moments (stacked on leading axes)."""
  fd = (((mean_a - mean_b) ** 2).sum(-1) + np.trace(cov_a, axis1=-2, axis2=-1)
        + np.trace(cov_b, axis1=-2, axis2=-1) - 2 * _trace_sqrt_product(cov_a, cov_b))
  return np.maximum(fd, 0.0)   # a squared distance; rounding can leave -1e-15


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """||mean_a - mean_b||^2 + tr(S_a + S_b - 2 sqrt(S_a S_b)) between two sets of vectors
  [N, D] (covariances with N - 1). Symmetric in theory; pass the reference set second (see
  ``_trace_sqrt_product``). Accurate to rounding when the covariances are well conditioned; a
  singular one costs about half the digits, as for any matrix square root."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"frechet_distance takes two [N, D] arrays, got {a.shape} and {b.shape}")
  if min(len(a), len(b)) < 2:
    return float("nan")
  ma, mb = a.mean(0), b.mean(0)
  ca, cb = a - ma, b - mb
  return float(_frechet(ma, ca.T @ ca / (len(a) - 1), mb, cb.T @ cb / (len(b) - 1)))


@functools.lru_cache(maxsize=None)
def random_projection(dim: int, size: int) -> np.ndarray:
  """A fixed [dim, size] matrix with orthonormal columns, seeded by (PROJECTION_SEED, dim,
  size): every evaluation of a target of this width sees the same random view."""
  rng = np.random.default_rng([PROJECTION_SEED, dim, size])
  q, _ = np.linalg.qr(rng.standard_normal((dim, size)))
  q.setflags(write=False)
  return q


def _project(x: np.ndarray, size: int) -> np.ndarray:
  """x [..., D] in the random size-dim view when D > size; unchanged otherwise."""
  return x @ random_projection(x.shape[-1], size) if x.shape[-1] > size else x


# ----------------------------------------------------------------------------- other figures

def r2(generated: np.ndarray, true: np.ndarray) -> float:
  """Explained variance over every element: 1 - SSE / SST around the true set's own mean."""
  generated = np.asarray(generated, np.float64)
  true = np.asarray(true, np.float64)
  total = ((true - true.mean(0)) ** 2).sum()
  return _ratio(total - ((generated - true) ** 2).sum(), total)


def _projections(x: np.ndarray, directions: np.ndarray) -> np.ndarray:
  """x [N, tokens, dim] on the directions: [k, tokens, dim] (directions in the whole feature
  array) gives [N, k]; [k, dim] (one direction applied to every token) gives [N, tokens, k]."""
  if directions.ndim == x.ndim and directions.shape[1:] == x.shape[1:]:
    return np.tensordot(x, directions, axes=((1, 2), (1, 2)))
  if directions.ndim == 2 and directions.shape[1] == x.shape[-1]:
    return x @ directions.T
  raise ValueError(f"directions {directions.shape} fit neither [k, tokens, dim] nor [k, dim] "
                   f"for features {x.shape[1:]}")


def variance_ratio(generated: np.ndarray, true: np.ndarray,
                   directions: np.ndarray | None = None) -> np.ndarray:
  """Variance across rows of each generated coordinate over the truth's: [tokens, dim], or, on
  directions (see ``_projections``), [k] or [tokens, k]. NaN where the truth does not vary."""
  generated = np.asarray(generated, np.float64)
  true = np.asarray(true, np.float64)
  if directions is not None:
    directions = np.asarray(directions, np.float64)
    generated, true = _projections(generated, directions), _projections(true, directions)
  var_true = true.var(0)
  return np.where(var_true > 0, generated.var(0) / np.where(var_true > 0, var_true, 1), np.nan)


def _ensemble_rows(samples: np.ndarray, true: np.ndarray):
  """Per row of K >= 2 samples [N, K, ...] against true [N, ...]: the energy score, the sum
  over elements of the unbiased sample variance, and the sample mean's squared error.

  Everything comes from each row's squared distances, taken from one small Gram matmul per row
  (a row's figures do not depend on the rows batched with it, and no centred copy of the
  samples is made): sum_k ||x_k - m||^2 = sum_kl ||x_k - x_l||^2 / 2K, and
  ||m - y||^2 = mean_k ||x_k - y||^2 - that / K. Identical samples give exactly zero spread.
  """
  n, k = samples.shape[:2]
  x = samples.reshape(n, k, -1)
  y = true.reshape(n, -1, 1)
  gram = x @ np.swapaxes(x, 1, 2)
  sq = np.einsum("nkk->nk", gram)
  to_true = np.clip(sq - 2 * (x @ y)[..., 0] + (y[..., 0] ** 2).sum(-1, keepdims=True), 0, None)
  between = np.clip(sq[:, :, None] + sq[:, None, :] - 2 * gram, 0, None) * (1 - np.eye(k))
  energy = np.sqrt(to_true).mean(1) - np.sqrt(between).sum((1, 2)) / (2 * k * (k - 1))
  spread = between.sum((1, 2)) / (2 * k * (k - 1))
  error = np.clip(to_true.mean(1) - between.sum((1, 2)) / (2 * k * k), 0, None)
  return energy, spread, error


def energy_score(samples: np.ndarray, true: np.ndarray) -> float:
  """Mean over rows of E||X - y|| - E||X - X'|| / 2 from K >= 2 samples [N, K, ...] of each row
  against true [N, ...]. The spread term averages over the K (K - 1) distinct pairs, the
  unbiased estimate, so that the expected score is the proper score's at any K."""
  samples, true = _check_samples(samples, true)
  return float(_ensemble_rows(samples, true)[0].mean())


def _spread_skill(spread: float, error: float, k: int) -> float:
  """For calibrated samples E[squared error of the K-sample mean] = (K + 1) / K E[variance],
  so the corrected ratio reads 1 at any K."""
  return float(np.sqrt(_ratio((k + 1) / k * spread, error)))


def spread_skill(samples: np.ndarray, true: np.ndarray) -> float:
  """Spread-skill ratio of K >= 2 samples [N, K, ...] against true [N, ...], summed over every
  element: 1 when calibrated, below 1 over-confident, above 1 over-dispersed."""
  samples, true = _check_samples(samples, true)
  _, spread, error = _ensemble_rows(samples, true)
  return _spread_skill(spread.sum(), error.sum(), samples.shape[1])


def _check_samples(samples, true) -> tuple[np.ndarray, np.ndarray]:
  samples = np.asarray(samples, np.float64)
  true = np.asarray(true, np.float64)
  if samples.shape[:1] + samples.shape[2:] != true.shape or samples.shape[1] < 2:
    raise ValueError(f"samples {samples.shape} should be [rows, K >= 2, ...] for true "
                     f"{true.shape}")
  return samples, true


def density_coverage(generated: np.ndarray, true: np.ndarray,
                     nearest_k: int = NEAREST_K) -> tuple[float, float]:
  """Density and coverage (Naeem et al. 2020) of generated [M, D] against true [N, D] vectors,
  with closed balls (a generated vector equal to a true one is inside its ball). NaN when there
  are no more than k true vectors."""
  generated = np.asarray(generated, np.float64)
  true = np.asarray(true, np.float64)
  if len(true) <= nearest_k:
    return float("nan"), float("nan")
  true_sq = (true ** 2).sum(1)
  among_true = true_sq[:, None] + true_sq[None, :] - 2 * true @ true.T
  np.fill_diagonal(among_true, np.inf)
  radius = np.partition(among_true, nearest_k - 1, axis=1)[:, nearest_k - 1]
  to_true = (generated ** 2).sum(1)[:, None] + true_sq[None, :] - 2 * generated @ true.T
  inside = np.clip(to_true, 0.0, None) <= radius[None, :]       # [M, N]
  return (float(inside.sum() / (nearest_k * len(generated))),
          float(inside.any(0).mean()))


# ----------------------------------------------------------------------------- accumulator

class _Moments:
  """Count, mean and centred sum of squares (``outer``: of outer products over the last axis)
  of rows added in batches, merged with Chan et al.'s update, so the result does not depend on
  how the rows were split, up to rounding, and no row is kept."""

  def __init__(self, outer: bool = False):
    self.outer = outer
    self.n, self.mean, self.m2 = 0, 0.0, 0.0

  def _square(self, x, y):
    return x[..., :, None] * y[..., None, :] if self.outer else x * y

  def add(self, x: np.ndarray) -> None:
    n = len(x)
    mean = x.mean(0)
    centred = x - mean
    if self.outer:
      rows_last = np.moveaxis(centred, 0, -1)
      m2 = rows_last @ np.swapaxes(rows_last, -1, -2)
    else:
      m2 = np.einsum("i...,i...->...", centred, centred)
    total = self.n + n
    delta = mean - self.mean
    self.m2 = self.m2 + m2 + self._square(delta, delta) * (self.n * n / total)
    self.mean = self.mean + delta * (n / total)
    self.n = total

  def covariance(self) -> np.ndarray:
    return self.m2 / (self.n - 1)


class Metrics:
  """Accumulates generated vs true raw targets batch by batch; ``result()`` gives every figure
  of the module docstring.

  ``add(generated, true)``: true [B, tokens, dim]; generated the same shape, or
  [B, K, tokens, dim] for K samples per row (then the other figures score sample 0).
  ``directions``: [k, tokens, dim] or [k, dim], for ``variance_ratio_along``.

  Kept between batches: float64 sums, per-coordinate moments ([tokens, dim], both sides),
  per-position moments of the projected tokens ([tokens, 64, 64]), and the pooled vectors
  ([rows, dim], both sides), which recall, density, coverage and fd_pooled need whole.
  """

  def __init__(self, directions: np.ndarray | None = None, nearest_k: int = NEAREST_K):
    self.directions = None if directions is None else np.asarray(directions, np.float64)
    self.nearest_k = nearest_k
    self.samples = None
    self.rows = 0
    self.token_cos_sum = 0.0
    self.tokens = 0
    self.sq_err_sum = 0.0
    self.elements = 0
    self.pooled_generated, self.pooled_true = [], []
    self.coords = {"generated": _Moments(), "true": _Moments()}
    self.positions = {"generated": _Moments(outer=True), "true": _Moments(outer=True)}
    self.along = {"generated": _Moments(), "true": _Moments()}
    self.energy_sum = 0.0
    self.spread_sum = self.mean_err_sum = 0.0

  def add(self, generated: np.ndarray, true: np.ndarray) -> None:
    generated = np.asarray(generated, np.float64)
    true = np.asarray(true, np.float64)
    if true.ndim != 3:
      raise ValueError(f"true {true.shape} should be [rows, tokens, dim]")
    samples = generated.shape[1] if generated.ndim == 4 else 1
    first = generated[:, 0] if generated.ndim == 4 else generated
    if first.shape != true.shape:
      raise ValueError(f"generated {generated.shape} does not fit true {true.shape}: give "
                       f"[rows, tokens, dim] or [rows, K, tokens, dim]")
    if self.samples not in (None, samples):
      raise ValueError(f"every batch needs the same samples per row: {self.samples}, then "
                       f"{samples}")
    self.samples = samples
    if samples > 1:
      energy, spread, error = _ensemble_rows(generated, true)
      self.energy_sum += float(energy.sum())
      self.spread_sum += float(spread.sum())
      self.mean_err_sum += float(error.sum())
    generated = first
    cos = cosine(generated, true)
    self.token_cos_sum += float(cos.sum())
    self.tokens += cos.size
    self.sq_err_sum += float(((generated - true) ** 2).sum())
    self.elements += generated.size
    self.rows += generated.shape[0]
    self.pooled_generated.append(generated.mean(1))
    self.pooled_true.append(true.mean(1))
    for side, x in (("generated", generated), ("true", true)):
      self.coords[side].add(x)
      self.positions[side].add(_project(x, FD_TOKEN_DIM))
      if self.directions is not None:
        self.along[side].add(_projections(x, self.directions))

  def result(self) -> dict:
    g = np.concatenate(self.pooled_generated)
    t = np.concatenate(self.pooled_true)
    gn = g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12)
    tn = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    retrieved = np.argmax(gn @ tn.T, axis=1)
    true_m2 = self.coords["true"].m2
    ratios = self._variance_ratios(self.coords)
    density, coverage = density_coverage(g, t, self.nearest_k)
    out = {
        "cosine_token": self.token_cos_sum / self.tokens,
        "cosine_global": float(cosine(g, t).mean()),
        "mse": self.sq_err_sum / self.elements,
        "r2": _ratio(true_m2.sum() - self.sq_err_sum, true_m2.sum()),
        "recall_at_1": float(np.mean(retrieved == np.arange(len(g)))),
        "fd_pooled": frechet_distance(_project(g, FD_POOLED_DIM), _project(t, FD_POOLED_DIM)),
        "fd_tokens": self._fd_tokens(),
        "variance_ratio": float(np.mean(ratios)) if ratios.size else float("nan"),
        "variance_ratio_below_half": (float(np.mean(ratios < 0.5)) if ratios.size
                                      else float("nan")),
        "density": density,
        "coverage": coverage,
    }
    if self.directions is not None:
      along = self._variance_ratios(self.along)
      out["variance_ratio_along"] = float(np.mean(along)) if along.size else float("nan")
    if self.samples > 1:
      out["energy_score"] = self.energy_sum / self.rows
      out["spread_skill"] = _spread_skill(self.spread_sum, self.mean_err_sum, self.samples)
    return out

  def _fd_tokens(self) -> float:
    gen, true = self.positions["generated"], self.positions["true"]
    if self.rows < 2:
      return float("nan")
    return float(_frechet(gen.mean, gen.covariance(), true.mean, true.covariance()).mean())

  def _variance_ratios(self, moments: dict) -> np.ndarray:
    """Generated over true variance of each coordinate the truth varies in (flat)."""
    gen, true = np.ravel(moments["generated"].m2), np.ravel(moments["true"].m2)
    if self.rows < 2:
      return np.zeros(0)
    keep = true > 0
    return gen[keep] / true[keep]


def score(generated: np.ndarray, true: np.ndarray, directions: np.ndarray | None = None,
          nearest_k: int = NEAREST_K) -> dict:
  """Every figure of one generated set against its true set, as one batch."""
  m = Metrics(directions, nearest_k)
  m.add(generated, true)
  return m.result()
