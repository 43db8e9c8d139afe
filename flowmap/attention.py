"""Attention kernels: softmax(q k^T) v over [batch, heads, tokens, head_dim], with grouped KV
heads (GQA: ``heads`` a multiple of ``kv_heads``) and q already multiplied by 1/sqrt(head_dim).

Implementations, chosen by ``model.attention``:
  * ``einsum``: the plain formulation, logits and softmax in float32; the reference the others
    are tested against. Its backward pass is autodiff's, which saves the probabilities.
  * ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``, the same maths in JAX's
    own formulation (tokens-major layout, so it transposes in and out).
  * ``flash``: a custom VJP for CPUs (FlashAttention-2's recomputation, without tiling: a
    row of 256-1024 keys fits in cache). The forward pass saves only the output and the
    log-sum-exp of every query row; the backward pass recomputes the probabilities, and lays
    every matmul out so that XLA's CPU matmul library (YNNPACK) takes it (see
    ``row_major_transpose``). No [queries, keys] tensor crosses from forward to backward.
  * ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash
    attention on NVIDIA GPUs (bfloat16 or float16, head_dim a multiple of 8).
  * ``auto``: cudnn on a GPU when the dtype and head_dim allow it, flash on CPUs, xla elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "einsum", "flash", "cudnn")


def resolve(implementation: str, backend: str, dtype, head_dim: int) -> str:
  """The implementation ``auto`` stands for on ``backend``; others are checked and returned."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention {implementation!r}; expected one of "
                     f"{list(IMPLEMENTATIONS)}")
  cudnn_fits = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
  if implementation == "auto":
    if backend == "gpu" and cudnn_fits:
      return "cudnn"
    return "flash" if backend == "cpu" else "xla"
  if implementation == "cudnn" and not (backend == "gpu" and cudnn_fits):
    raise ValueError(f"attention 'cudnn' needs a GPU, bfloat16 or float16 and a head_dim "
                     f"multiple of 8; got {backend}, {jnp.dtype(dtype).name}, {head_dim}")
  return implementation


def attend(q, k, v, implementation: str):
  """q [B, H, Nq, D] (pre-scaled), k and v [B, KVH, Nk, D] -> [B, H, Nq, D] in q's dtype.

  ``implementation`` is one of IMPLEMENTATIONS other than ``auto`` (see ``resolve``)."""
  if implementation == "flash":
    return flash(q, k, v)
  if implementation == "einsum":
    return reference(q, k, v)
  if implementation in ("xla", "cudnn"):
    tokens_major = lambda x: jnp.swapaxes(x, 1, 2)
    out = jax.nn.dot_product_attention(tokens_major(q), tokens_major(k), tokens_major(v),
                                       scale=1.0, implementation=implementation)
    return tokens_major(out)
  raise ValueError(f"unknown attention {implementation!r}; expected one of "
                   f"{list(IMPLEMENTATIONS[1:])}")


# ----------------------------------------------------------------------------- layout

def row_major_transpose(x):
  """x with its last two axes swapped, as a real row-major copy.

  XLA's CPU backend hands a matmul to YNNPACK only when the left operand contracts its last
  axis (and no operand is column-major); any other bfloat16 matmul is upcast to float32 and
  sent to Eigen, or, when a later simplification makes it non-canonical, fails at run time
  (``UNIMPLEMENTED: ... DotThunk ... BF16 x BF16 = F32``). A plain ``swapaxes`` is folded into
  the matmul's dimension numbers (it lowers to a column-major view), so the transpose is made
  concrete: the reshape of the column-major view forces a row-major copy, and the optimisation
  barrier keeps XLA from folding it back.
  """
  *lead, m, n = x.shape
  split = 8 if m % 8 == 0 else 1
  t = jnp.swapaxes(x, -1, -2).reshape(*lead, n, m // split, split)
  return jax.lax.optimization_barrier(t).reshape(*lead, n, m)


def _matmul(a, b, contract_b: int):
  """Batched a [..., M, K] @ b over the leading axes, float32 accumulation; b is [..., K, N]
  (``contract_b=-2``) or [..., N, K] (``contract_b=-1``): the layouts YNNPACK takes."""
  batch = tuple(range(a.ndim - 2))
  dims = (((a.ndim - 1,), (b.ndim + contract_b,)), (batch, batch))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _grouped(q, kv_heads: int):
  """[B, H, Nq, D] -> [B, KVH, G * Nq, D]: the queries sharing a KV head as one matrix."""
  b, h, n, d = q.shape
  return q.reshape(b, kv_heads, (h // kv_heads) * n, d)


# ----------------------------------------------------------------------------- reference

def reference(q, k, v):
  """The plain formulation: logits, a float32 softmax, the weighted sum of values."""
  b, h, n, d = q.shape
  qg = _grouped(q, k.shape[1])
  weights = jax.nn.softmax(_matmul(qg, k, -1), axis=-1).astype(v.dtype)
  return _matmul(weights, v, -2).astype(q.dtype).reshape(b, h, n, d)


# ----------------------------------------------------------------------------- flash

@jax.custom_vjp
def flash(q, k, v):
  """softmax(q k^T) v; the backward pass recomputes the probabilities from the log-sum-exp."""
  return _flash_forward(q, k, v)[0]


def _flash_forward(q, k, v):
  b, h, n, d = q.shape
  logits = _matmul(_grouped(q, k.shape[1]), k, -1)            # [B, KVH, G*Nq, Nk] float32
  peak = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - peak)
  total = jnp.sum(p, axis=-1, keepdims=True)
  # Normalised after the values are summed: a pass over [G*Nq, D] instead of [G*Nq, Nk].
  out = (_matmul(p.astype(v.dtype), v, -2) / total).astype(q.dtype)
  lse = (peak + jnp.log(total))[..., 0]                       # [B, KVH, G*Nq] float32
  return out.reshape(b, h, n, d), lse


def _flash_fwd(q, k, v):
  out, lse = _flash_forward(q, k, v)
  return out, (q, k, v, out, lse)


def _flash_bwd(residuals, d_out):
  """FlashAttention-2's backward pass, keys-major: P^T = exp(k q^T - lse) is recomputed in
  the orientation every matmul below wants, so only q-, k- and v-sized tensors are
  transposed."""
  q, k, v, out, lse = residuals
  b, h, n, d = q.shape
  kvh = k.shape[1]
  qg, dog = _grouped(q, kvh), _grouped(d_out.astype(q.dtype), kvh)
  p_t = jnp.exp(_matmul(k, qg, -1) - lse[:, :, None, :])     # [B, KVH, Nk, G*Nq] float32
  dv = _matmul(p_t.astype(v.dtype), dog, -2)                  # P^T dO
  dp_t = _matmul(v, dog, -1)                                  # (dO v^T)^T
  delta = jnp.sum(dog.astype(jnp.float32) * _grouped(out, kvh).astype(jnp.float32), -1)
  ds_t = (p_t * (dp_t - delta[:, :, None, :])).astype(q.dtype)
  dk = _matmul(ds_t, qg, -2)                                  # dS^T q
  dq_t = jax.lax.optimization_barrier(_matmul(row_major_transpose(k), ds_t, -2))  # k^T dS^T
  dq = jnp.swapaxes(dq_t, -1, -2).reshape(b, h, n, d)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


flash.defvjp(_flash_fwd, _flash_bwd)
