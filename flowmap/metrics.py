"""Metrics, in numpy and float64: generated against true features in the raw target space.

No JAX here: a figure is computed on the host from gathered arrays, so it does not depend on
the batch size, the device count or the backend.
"""

from __future__ import annotations

import numpy as np

METRICS = ("cosine_token", "cosine_global", "mse", "recall_at_1")


def cosine(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  num = (a * b).sum(axis)
  den = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
  return num / np.maximum(den, 1e-12)


class Metrics:
  """Accumulates generated vs true raw targets batch by batch; ``result()`` gives the figures.

  recall_at_1: the pooled generated vector of image i retrieves, by cosine, image i's pooled
  true vector among all evaluated images (ties go to the lowest index, so a constant
  predictor scores 1/n).
  """

  def __init__(self):
    self.rows = 0
    self.token_cos_sum = 0.0
    self.tokens = 0
    self.sq_err_sum = 0.0
    self.elements = 0
    self.pooled_generated, self.pooled_true = [], []

  def add(self, generated: np.ndarray, true: np.ndarray) -> None:
    generated = np.asarray(generated, np.float64)
    true = np.asarray(true, np.float64)
    if generated.shape != true.shape:
      raise ValueError(f"generated {generated.shape} and true {true.shape} differ")
    cos = cosine(generated, true)
    self.token_cos_sum += float(cos.sum())
    self.tokens += cos.size
    self.sq_err_sum += float(((generated - true) ** 2).sum())
    self.elements += generated.size
    self.rows += generated.shape[0]
    self.pooled_generated.append(generated.mean(1))
    self.pooled_true.append(true.mean(1))

  def result(self) -> dict:
    g = np.concatenate(self.pooled_generated)
    t = np.concatenate(self.pooled_true)
    gn = g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12)
    tn = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    retrieved = np.argmax(gn @ tn.T, axis=1)
    return {
        "cosine_token": self.token_cos_sum / self.tokens,
        "cosine_global": float(cosine(g, t).mean()),
        "mse": self.sq_err_sum / self.elements,
        "recall_at_1": float(np.mean(retrieved == np.arange(len(g)))),
    }


def score(generated: np.ndarray, true: np.ndarray) -> dict:
  m = Metrics()
  m.add(generated, true)
  return m.result()
