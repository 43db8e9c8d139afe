"""Attention kernels: every implementation this machine runs against the plain formulation,
values and gradients, float32 and bfloat16, with grouped KV heads and with more or fewer keys
than queries; the choice of kernel per backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowmap import attention as A

# (batch, heads, kv_heads, queries, keys, head_dim)
SHAPES = {
    "self": (2, 4, 4, 16, 16, 16),
    "gqa": (2, 4, 2, 16, 16, 16),
    "cross_fewer_keys": (2, 4, 2, 16, 9, 16),
    "cross_more_keys": (1, 6, 3, 5, 24, 8),
}
TOLERANCE = {"float32": 2e-5, "bfloat16": 3e-2}   # relative to the largest entry
CPU_IMPLEMENTATIONS = ("einsum", "xla", "flash")


def qkv(shape, dtype, seed=0):
  b, h, kvh, nq, nk, d = shape
  k = jax.random.split(jax.random.key(seed), 4)
  # Pre-scaled q, and logits of a few units: softmax neither flat nor one-hot.
  q = 2.0 * jax.random.normal(k[0], (b, h, nq, d)) / np.sqrt(d)
  keys = jax.random.normal(k[1], (b, kvh, nk, d))
  values = jax.random.normal(k[2], (b, kvh, nk, d))
  cotangent = jax.random.normal(k[3], (b, h, nq, d))
  cast = lambda x: x.astype(dtype)
  return cast(q), cast(keys), cast(values), cotangent


def plain(q, k, v):
  """softmax(q k^T) v written out head by head in float32, KV head i // group for head i."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[1] // k.shape[1]
  out = np.zeros(q.shape)
  for b in range(q.shape[0]):
    for h in range(q.shape[1]):
      logits = q[b, h] @ k[b, h // group].T
      w = np.exp(logits - logits.max(-1, keepdims=True))
      out[b, h] = (w / w.sum(-1, keepdims=True)) @ v[b, h // group]
  return out


def value_and_grads(implementation, q, k, v, cotangent):
  def f(q, k, v):
    out = A.attend(q, k, v, implementation)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out
  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def close(actual, expected, tol):
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(actual, expected, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_every_cpu_implementation_matches_the_plain_formulation(shape, dtype):
  q, k, v, cotangent = qkv(SHAPES[shape], jnp.dtype(dtype))
  expected = plain(q, k, v)
  # Gradients to compare with: autodiff of the plain formulation (``einsum``) in float32.
  f32 = lambda x: x.astype(jnp.float32)
  _, grads32 = value_and_grads("einsum", f32(q), f32(k), f32(v), cotangent)
  for implementation in CPU_IMPLEMENTATIONS:
    out, grads = value_and_grads(implementation, q, k, v, cotangent)
    assert out.shape == q.shape and out.dtype == q.dtype, implementation
    close(out, expected, TOLERANCE[dtype])
    for name, g, ref in zip("qkv", grads, grads32):
      assert g.dtype == q.dtype, (implementation, name)
      close(g, np.asarray(ref, np.float64), TOLERANCE[dtype])


def test_flash_gradients_equal_the_reference_to_float32_rounding():
  """The recomputation in flash's backward pass is the same maths, not an approximation."""
  q, k, v, cotangent = qkv(SHAPES["gqa"], jnp.float32, seed=3)
  _, reference = value_and_grads("einsum", q, k, v, cotangent)
  _, flash = value_and_grads("flash", q, k, v, cotangent)
  for a, b in zip(flash, reference):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


def test_flash_saves_the_output_and_log_sum_exp_not_the_probabilities():
  b, h, kvh, nq, _, _ = SHAPES["cross_fewer_keys"]
  q, k, v, _ = qkv(SHAPES["cross_fewer_keys"], jnp.float32)
  _, residuals = A._flash_fwd(q, k, v)
  shapes = sorted(tuple(r.shape) for r in jax.tree.leaves(residuals))
  # q, k, v, the output, and one log-sum-exp per query row: nothing [queries, keys]-sized.
  assert shapes == sorted([q.shape, k.shape, v.shape, q.shape, (b, kvh, h // kvh * nq)])


def test_row_major_transpose_is_a_transpose():
  x = jnp.arange(2 * 24 * 5, dtype=jnp.float32).reshape(2, 24, 5)
  np.testing.assert_array_equal(jax.jit(A.row_major_transpose)(x), np.swapaxes(x, -1, -2))
  y = jnp.arange(7 * 3, dtype=jnp.bfloat16).reshape(7, 3)   # rows not a multiple of 8
  np.testing.assert_array_equal(jax.jit(A.row_major_transpose)(y), np.asarray(y).T)


def test_auto_picks_per_backend_and_unknown_names_are_refused():
  assert A.resolve("auto", "cpu", jnp.float32, 64) == "flash"
  assert A.resolve("auto", "cpu", jnp.bfloat16, 64) == "flash"
  assert A.resolve("auto", "gpu", jnp.bfloat16, 64) == "cudnn"
  assert A.resolve("auto", "gpu", jnp.float32, 64) == "xla"      # cuDNN wants half precision
  assert A.resolve("auto", "gpu", jnp.bfloat16, 20) == "xla"     # and head_dim % 8 == 0
  assert A.resolve("auto", "tpu", jnp.bfloat16, 64) == "xla"
  for name in ("xla", "einsum", "flash"):
    assert A.resolve(name, "cpu", jnp.float32, 64) == name
  with pytest.raises(ValueError, match="needs a GPU"):
    A.resolve("cudnn", "cpu", jnp.bfloat16, 64)
  with pytest.raises(ValueError, match=r"'auto', 'xla', 'einsum', 'flash', 'cudnn'"):
    A.resolve("fused", "cpu", jnp.float32, 64)
