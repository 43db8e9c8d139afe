"""Next-DiT (Lumina-Next) in Flax NNX, conditioned on source-encoder tokens.

Reading guide, matching the paper:
  * target tokens -> linear in-projection; time t -> sinusoid(t * 1000) -> MLP; the condition
    vector c = time embedding + projection of the mean-pooled source tokens;
  * every block: x += tanh(g_attn) * RMSNorm(Attn(RMSNorm(x) * (1 + s_attn)))
                 x += tanh(g_mlp)  * RMSNorm(SwiGLU(RMSNorm(x) * (1 + s_mlp)))
    with (s_attn, g_attn, s_mlp, g_mlp) = Linear(SiLU(c)), zero-initialised (adaLN-Zero);
  * attention: QK-RMSNorm, 2D RoPE on grid tokens, optional grouped KV heads, and a
    cross-attention to the projected source tokens added through a zero-initialised tanh gate;
  * final layer: norm, adaLN scale, linear, both zero-initialised, so the output is exactly
    zero at initialisation.
Parameters are float32; matmuls run in ``dtype`` with float32 accumulation, in the backward
pass too (``linear``); norms, softmax and the loss stay float32. Blocks are stacked and
scanned so compile time does not grow with depth.

Everything the source alone decides (its projection, its share of c, every block's
cross-attention keys and values) is ``NextDiT.source_context``; ``NextDiT.velocity`` takes it,
so an ODE sampler computes it once per call instead of once per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowmap import attention as attention_lib
from flowmap import linear as linear_lib
from flowmap import platform as platform_lib

SIZES = {  # dim, depth, heads, kv_heads
    "tiny": (128, 4, 4, 4),
    "small": (384, 6, 6, 6),
    "base": (768, 12, 12, 12),
    "large": (1024, 24, 16, 16),
    "blip3o": (1792, 24, 28, 4),
}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION = attention_lib.IMPLEMENTATIONS
DTYPES = platform_lib.DTYPES


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  source_shape: tuple[int, int]   # (tokens, dim) of the conditioning features
  target_shape: tuple[int, int]   # (tokens, dim) of the generated features
  dim: int = 128
  depth: int = 4
  heads: int = 4
  kv_heads: int = 4
  mlp_ratio: float = 4.0
  dtype: str = "float32"          # compute dtype (config_from resolves "auto")
  remat: str = "none"
  aligned_conditioning: bool = False   # the source resampled onto each target position
  prior: bool = False          # corrects a Gaussian model around a fitted estimate (an input)
  interval: bool = False       # a second time input, the interval's end (flow.objective=meanflow)
  rope_theta: float = 10000.0
  attention: str = "auto"         # attention.IMPLEMENTATIONS; "auto" picks per backend
  scan_unroll: int = 1            # blocks per scan iteration (1: one compiled block)

  @property
  def cond_dim(self) -> int:
    return min(self.dim, 1024)

  @property
  def time_scale(self) -> float:
    """The embeddings see t * 1000 (the diffusion convention), except in a MeanFlow model
    (``interval``), which sees t and the interval unscaled, as MeanFlow's reference code
    does: its training target holds the derivative of the network along time, and through
    sinusoids of up to 1000 radians per unit time that derivative is large and noisy
    (measured on the sphere task: a training loss of 5.2 against 0.20, and 2-evaluation
    samples with 1.57x the true spread against 0.99x)."""
    return 1.0 if self.interval else 1000.0

  @property
  def head_dim(self) -> int:
    return self.dim // self.heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def attention_implementation(self, backend: Optional[str] = None) -> str:
    """The attention kernel this config runs on ``backend`` (default: JAX's default)."""
    return attention_lib.resolve(self.attention, backend or jax.default_backend(),
                                 self.compute_dtype, self.head_dim)


def config_from(model_cfg, source_shape, target_shape) -> ModelConfig:
  """Builds a ModelConfig from ``config.model`` (named size, explicit overrides), with
  ``dtype`` and ``attention`` resolved for the default backend (``auto`` made concrete);
  an unknown value is a ValueError naming the valid ones."""
  if model_cfg.size not in SIZES:
    raise ValueError(f"unknown model size {model_cfg.size!r}; expected one of {list(SIZES)}")
  dim, depth, heads, kv_heads = SIZES[model_cfg.size]
  dim = model_cfg.get("dim") or dim
  depth = model_cfg.get("depth") or depth
  if model_cfg.get("heads"):
    heads = kv_heads = model_cfg.heads
  kv_heads = model_cfg.get("kv_heads") or kv_heads
  if model_cfg.remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat {model_cfg.remat!r}; expected one of {list(REMAT_POLICIES)}")
  backend = jax.default_backend()
  cfg = ModelConfig(
      source_shape=tuple(source_shape), target_shape=tuple(target_shape), dim=dim,
      depth=depth, heads=heads, kv_heads=kv_heads, mlp_ratio=model_cfg.get("mlp_ratio", 4.0),
      dtype=platform_lib.resolve_dtype(model_cfg.get("dtype", "auto"), backend),
      remat=model_cfg.remat, aligned_conditioning=bool(model_cfg.aligned_conditioning),
      prior=model_cfg.get("prior", "none") != "none",
      interval=bool(model_cfg.get("interval", False)),
      attention=model_cfg.get("attention", "auto"),
      scan_unroll=max(1, min(int(model_cfg.get("scan_unroll", 1)), depth)))
  return dataclasses.replace(cfg, attention=cfg.attention_implementation(backend))


# ----------------------------------------------------------------------------- layers

_FORWARD_MODE = [False]


@contextlib.contextmanager
def forward_mode_kernels():
  """While tracing inside this block the model uses kernels that forward-mode autodiff
  (``jax.jvp``, the MeanFlow objective) accepts: the plain matmul instead of ``linear``'s
  custom VJP, XLA attention instead of the custom-VJP flash kernel or cuDNN. The same maths;
  reverse mode through the result still works."""
  before = _FORWARD_MODE[0]
  _FORWARD_MODE[0] = True
  try:
    yield
  finally:
    _FORWARD_MODE[0] = before


def _plain_linear(x, kernel, bias):
  y = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias
  return y.astype(x.dtype)


def linear(x, kernel, bias):
  """x @ kernel + bias in x's dtype, float32 accumulation; kernel and bias float32 (with a
  custom VJP, except inside ``forward_mode_kernels``)."""
  if _FORWARD_MODE[0]:
    return _plain_linear(x, kernel, bias)
  return _custom_linear(x, kernel, bias)


@jax.custom_vjp
def _custom_linear(x, kernel, bias):
  """x @ kernel + bias in x's dtype, float32 accumulation; kernel and bias float32.

  A custom VJP so that the backward pass runs in x's dtype as well: the cotangent arrives in
  x's dtype (autodiff of a float32 result would make every backward matmul float32), and the
  kernel's gradient x^T dy is laid out as XLA's CPU matmul library takes it."""
  return _plain_linear(x, kernel, bias)


def _linear_fwd(x, kernel, bias):
  return _plain_linear(x, kernel, bias), (x, kernel, bias)


def _kernel_gradient_row_major(x, dy):
  """x^T dy [din, dout] in float32 from x [rows, din], dy [rows, dout], for CPUs.

  Contracting the rows of both operands is a layout XLA's CPU matmul library refuses (see
  attention.row_major_transpose), so the narrower operand is copied transposed first: x when
  din <= dout, else dy, computing (dy^T x)^T (a weights-sized transpose at the end, which the
  barrier keeps XLA from folding back into the product)."""
  if x.shape[1] <= dy.shape[1]:
    return jnp.dot(attention_lib.row_major_transpose(x), dy, preferred_element_type=jnp.float32)
  transposed = jnp.dot(attention_lib.row_major_transpose(dy), x,
                       preferred_element_type=jnp.float32)
  return jax.lax.optimization_barrier(transposed).T


def _kernel_gradient_direct(x, dy):
  """x^T dy as one contraction over the rows: GPU and TPU matmuls take any layout."""
  return jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _linear_bwd(residuals, dy):
  x, kernel, bias = residuals
  dy = dy.astype(x.dtype)
  dx = jax.lax.dot_general(dy, kernel.astype(x.dtype), (((dy.ndim - 1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32).astype(x.dtype)
  rows_x, rows_dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  d_kernel = jax.lax.platform_dependent(rows_x, rows_dy, cpu=_kernel_gradient_row_major,
                                        default=_kernel_gradient_direct)
  d_bias = None if bias is None else jnp.sum(rows_dy.astype(jnp.float32), axis=0)
  return dx, d_kernel, d_bias


_custom_linear.defvjp(_linear_fwd, _linear_bwd)


class Dense(nnx.Module):
  """float32 parameters, matmul in the compute dtype with float32 accumulation (``linear``)."""

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               use_bias: bool = True, zero: bool = False):
    init = nnx.initializers.zeros if zero else nnx.initializers.xavier_uniform()
    self.kernel = nnx.Param(init(rngs.params(), (din, dout), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x):
    bias = None if self.bias is None else self.bias[...]
    return linear(x.astype(self.dtype), self.kernel[...], bias)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(self.dtype)


def layer_norm(x, eps: float = 1e-6):
  """Non-affine LayerNorm of the final layer (the affine part comes from adaLN)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, -1, keepdims=True)
  var = jnp.var(x32, -1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0, scale: float = 1000.0):
  """Sinusoidal embedding of t * scale: 1000 (flowmap's convention) spans the usual
  diffusion range with t in [0, 1]; see ``ModelConfig.time_scale``."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * scale)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)


# ----------------------------------------------------------------------------- RoPE

def grid_positions(tokens: int, frame: Optional[int] = None) -> np.ndarray:
  """(row, col) of each token of a square grid, or (index,) when tokens is not a square.

  ``frame`` rescales a grid of side g to a grid of side ``frame`` so that a source grid
  and a target grid of different resolutions share one coordinate system.
  """
  side = math.isqrt(tokens)
  if side * side != tokens or tokens == 1:
    return np.arange(tokens, dtype=np.float32)[:, None]
  rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
  pos = np.stack([rows.ravel(), cols.ravel()], -1).astype(np.float32)
  if frame is not None and frame != side:
    pos = (pos + 0.5) * frame / side - 0.5
  return pos


def rope_angles(positions: np.ndarray, head_dim: int, theta: float) -> np.ndarray:
  """Rotation angles [tokens, head_dim // 2]: the frequency pairs are split evenly between
  the position axes (rows and columns for a grid). A constant, never a parameter."""
  axes = positions.shape[1]
  pairs = head_dim // 2
  per_axis = pairs // axes
  angles = []
  for a in range(axes):
    n = per_axis if a < axes - 1 else pairs - per_axis * (axes - 1)
    freqs = 1.0 / theta ** (np.arange(n, dtype=np.float64) * 2 / (2 * n))
    angles.append(positions[:, a:a + 1].astype(np.float64) * freqs[None])
  return np.concatenate(angles, -1).astype(np.float32)


def apply_rope(x, angles):
  """Rotates consecutive pairs of x [batch, tokens, heads, head_dim] by ``angles``."""
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x32 = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
  real, imag = x32[..., 0], x32[..., 1]
  out = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], -1)
  return out.reshape(x.shape).astype(x.dtype)


def heads_major(x):
  """[batch, tokens, heads, head_dim] -> [batch, heads, tokens, head_dim], attention's layout."""
  return jnp.swapaxes(x, 1, 2)


# ----------------------------------------------------------------------------- blocks

class Attention(nnx.Module):
  """Self-attention over target tokens plus gated cross-attention to the source tokens."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt, d = cfg.compute_dtype, cfg.dim
    self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
    kv = self.kv_heads * self.head_dim
    # q, k, v in one matmul (and the source's k, v in another): fewer, larger matmuls.
    self.qkv = Dense(d, d + 2 * kv, rngs=rngs, dtype=dt, use_bias=False)
    self.q_norm = RMSNorm(self.head_dim, dtype=dt)
    self.k_norm = RMSNorm(self.head_dim, dtype=dt)
    self.source_kv = Dense(d, 2 * kv, rngs=rngs, dtype=dt, use_bias=False)
    self.source_k_norm = RMSNorm(self.head_dim, dtype=dt)
    self.cross_gate = nnx.Param(jnp.zeros((self.heads,), jnp.float32))
    self.out = Dense(d, d, rngs=rngs, dtype=dt, use_bias=False)
    self.implementation = cfg.attention

  def source_keys_values(self, projected, source_angles):
    """The cross-attention's keys (normalised, rotated on grids) and values [B, KVH, Ns,
    head_dim] from ``projected`` = self.source_kv(source tokens) [B, Ns, 2 * KVH * head_dim]:
    functions of the source alone, computed once per sampler call (NextDiT.source_context
    runs the projection of every block as one matmul)."""
    b, m, _ = projected.shape
    sk, sv = jnp.split(projected, 2, axis=-1)
    sk = self.source_k_norm(sk.reshape(b, m, self.kv_heads, self.head_dim))
    if source_angles is not None:   # both grids: relative positions across the two grids
      sk = apply_rope(sk, source_angles)
    return heads_major(sk), heads_major(sv.reshape(b, m, self.kv_heads, self.head_dim))

  def __call__(self, x, target_angles, source_k, source_v, rotate_cross: bool):
    b, n, _ = x.shape
    hd, kvh = self.head_dim, self.kv_heads
    implementation = attention_lib.resolve(self.implementation, jax.default_backend(),
                                           x.dtype, hd)
    if _FORWARD_MODE[0] and implementation in ("flash", "cudnn"):
      implementation = "xla"
    q, k, v = jnp.split(self.qkv(x), [self.heads * hd, (self.heads + kvh) * hd], axis=-1)
    # 1/sqrt(head_dim) is folded into q, where it costs nothing next to the norm and RoPE.
    q = self.q_norm(q.reshape(b, n, self.heads, hd)) * jnp.asarray(hd ** -0.5, x.dtype)
    k = self.k_norm(k.reshape(b, n, kvh, hd))
    q_rot = heads_major(apply_rope(q, target_angles))
    out = attention_lib.attend(q_rot, heads_major(apply_rope(k, target_angles)),
                               heads_major(v.reshape(b, n, kvh, hd)), implementation)
    cross = attention_lib.attend(q_rot if rotate_cross else heads_major(q), source_k,
                                 source_v, implementation)
    gate = jnp.tanh(self.cross_gate[...]).astype(out.dtype)[None, :, None, None]
    return self.out(jnp.swapaxes(out + gate * cross, 1, 2).reshape(b, n, -1))


def swiglu_hidden(dim: int, ratio: float) -> int:
  """SwiGLU's hidden width: 2/3 of ratio * dim (the same parameters as a GELU MLP of that
  ratio), rounded up to a multiple of 64 as Lumina-Next does."""
  hidden = int(2 * dim * ratio / 3)
  return 64 * ((hidden + 63) // 64)


class SwiGLU(nnx.Module):
  def __init__(self, dim: int, ratio: float, *, rngs: nnx.Rngs, dtype):
    hidden = swiglu_hidden(dim, ratio)
    self.w13 = Dense(dim, 2 * hidden, rngs=rngs, dtype=dtype, use_bias=False)  # gate, up
    self.w2 = Dense(hidden, dim, rngs=rngs, dtype=dtype, use_bias=False)

  def __call__(self, x):
    gate, up = jnp.split(self.w13(x), 2, axis=-1)
    return self.w2(jax.nn.silu(gate) * up)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt, d = cfg.compute_dtype, cfg.dim
    self.attention = Attention(cfg, rngs=rngs)
    self.feed_forward = SwiGLU(d, cfg.mlp_ratio, rngs=rngs, dtype=dt)
    self.attention_norm1 = RMSNorm(d, dtype=dt)
    self.attention_norm2 = RMSNorm(d, dtype=dt)
    self.ffn_norm1 = RMSNorm(d, dtype=dt)
    self.ffn_norm2 = RMSNorm(d, dtype=dt)
    self.modulation = Dense(cfg.cond_dim, 4 * d, rngs=rngs, dtype=dt, zero=True)

  def __call__(self, x, c, target_angles, source_k, source_v, rotate_cross: bool):
    mod = self.modulation(jax.nn.silu(c))[:, None, :]
    scale_attn, gate_attn, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
    h = self.attention(self.attention_norm1(x) * (1 + scale_attn), target_angles,
                       source_k, source_v, rotate_cross)
    x = x + jnp.tanh(gate_attn) * self.attention_norm2(h)
    h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
    return x + jnp.tanh(gate_mlp) * self.ffn_norm2(h)


# ----------------------------------------------------------------------------- model

class NextDiT(nnx.Module):
  """velocity = model(x_t [B, Nt, Dt], t [B], source [B, Ns, Ds], drop [B] bool), float32.

  The same in two stages, for samplers that evaluate many times per source:
    context = model.source_context(source, drop)   # once per call
    velocity = model.velocity(x_t, t, context)     # once per evaluation
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, d = cfg.compute_dtype, cfg.dim
    (nt, dt_in), (ns, ds) = cfg.target_shape, cfg.source_shape
    if d % cfg.heads or cfg.heads % cfg.kv_heads or (d // cfg.heads) % 4:
      raise ValueError(f"dim {d} must split into {cfg.heads} heads of a multiple of 4, "
                       f"and heads into {cfg.kv_heads} KV groups")
    self.in_proj = Dense(dt_in, d, rngs=rngs, dtype=dt)
    self.time_mlp1 = Dense(256, cfg.cond_dim, rngs=rngs, dtype=dt)
    self.time_mlp2 = Dense(cfg.cond_dim, cfg.cond_dim, rngs=rngs, dtype=dt)
    # MeanFlow's second time input: the interval s - t, embedded like t; zero at
    # initialisation, so the model starts as an instantaneous velocity model.
    self.interval_mlp1 = Dense(256, cfg.cond_dim, rngs=rngs, dtype=dt) if cfg.interval else None
    self.interval_mlp2 = (Dense(cfg.cond_dim, cfg.cond_dim, rngs=rngs, dtype=dt, zero=True)
                          if cfg.interval else None)
    self.source_norm = RMSNorm(ds, dtype=dt)
    self.source_proj = Dense(ds, d, rngs=rngs, dtype=dt)
    self.source_pool = Dense(d, cfg.cond_dim, rngs=rngs, dtype=dt)
    self.null_source = nnx.Param(jnp.zeros((d,), jnp.float32))
    # Direct per-position paths from the source, whatever the two token layouts: the source
    # resampled onto the target's positions (identity for equal grids, area averaging from a
    # finer grid, interpolation from a coarser one, the mean for a pooled target, a copy of a
    # pooled source), and the fitted estimate of the target (the prior: the closed-form
    # linear map's or the MLP's).
    self.aligned = Dense(d, d, rngs=rngs, dtype=dt) if cfg.aligned_conditioning else None
    self.prior_in = Dense(dt_in, d, rngs=rngs, dtype=dt) if cfg.prior else None

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(cfg, rngs=rngs)
    self.blocks = make_blocks(rngs)

    self.final_modulation = Dense(cfg.cond_dim, d, rngs=rngs, dtype=dt, zero=True)
    self.final = Dense(d, dt_in, rngs=rngs, dtype=dt, zero=True)

  @staticmethod
  def rope_tables(cfg: ModelConfig):
    """RoPE angles of the target tokens and, when both are grids, of the source tokens in
    the target grid's coordinates. Trace-time constants, never parameters."""
    nt, ns = cfg.target_shape[0], cfg.source_shape[0]
    target_pos = grid_positions(nt)
    source_pos = grid_positions(ns, frame=math.isqrt(nt))
    target = jnp.asarray(rope_angles(target_pos, cfg.head_dim, cfg.rope_theta))
    if target_pos.shape[1] == 2 and source_pos.shape[1] == 2:
      return target, jnp.asarray(rope_angles(source_pos, cfg.head_dim, cfg.rope_theta))
    return target, None

  @staticmethod
  def resampling(cfg: ModelConfig):
    """[Nt, Ns]: the source tokens carried onto the target's positions. A constant."""
    return jnp.asarray(linear_lib.resampling_matrix(cfg.source_shape[0], cfg.target_shape[0]),
                       jnp.float32)

  def source_context(self, source, drop=None, prior=None, prior_std=None) -> dict:
    """The time-independent half of the network: source [B, Ns, Ds] (raw model input),
    drop [B] bool or None (rows that see the learned null source instead, for classifier-free
    guidance), prior [B, Nt, Dt] (the fitted estimate of the target, the linear map's or the
    MLP's, in the model's space; only with ``prior``, zero for dropped rows), prior_std
    [B, 1, Dt] (the estimate's residual standard deviation in that space; one for dropped
    rows) -> a dict of arrays,
    B leading or second:
      ``condition``   [B, cond_dim] float32: the pooled source's share of c;
      ``aligned``     [B, Nt, dim]: the source resampled onto each target position, added
                      there (only with aligned_conditioning), plus the projected prior;
      ``source_k``, ``source_v``  [depth, B, kv_heads, Ns, head_dim]: every block's
                      cross-attention keys (normalised, rotated on grids) and values.
    Costs depth x B x Ns x 2 x kv_heads x head_dim of memory in the compute dtype."""
    cfg = self.cfg
    s = self.source_proj(self.source_norm(source))
    if drop is not None:
      s = jnp.where(drop[:, None, None], self.null_source[...].astype(s.dtype), s)
    context = {"condition": self.source_pool(jnp.mean(s.astype(jnp.float32), axis=1))
               .astype(jnp.float32)}
    per_position = []
    if self.aligned is not None:
      if cfg.source_shape[0] == cfg.target_shape[0]:   # the identity: no averaging to do
        on_target = s
      else:   # a constant average of neighbouring tokens, in float32
        on_target = jnp.einsum("ts,bsd->btd", self.resampling(cfg),
                               s.astype(jnp.float32)).astype(s.dtype)
      per_position.append(self.aligned(on_target))
    if self.prior_in is not None:
      if prior is None:
        raise ValueError("this model corrects a fitted estimate of the target (prior): pass it")
      if prior_std is None:
        prior_std = jnp.ones((prior.shape[0], 1, prior.shape[-1]), jnp.float32)
      prior_std = jnp.broadcast_to(prior_std, (prior.shape[0], 1, prior.shape[-1]))
      if drop is not None:
        prior = jnp.where(drop[:, None, None], 0.0, prior)
        prior_std = jnp.where(drop[:, None, None], 1.0, prior_std)
      per_position.append(self.prior_in(prior))
      context["prior"] = prior.astype(jnp.float32)
      context["prior_std"] = jnp.maximum(prior_std.astype(jnp.float32), PRIOR_STD_FLOOR)
    if per_position:
      context["aligned"] = sum(per_position)
    # Every block's source projection as one matmul: the stacked kernels [depth, dim, 2kv]
    # side by side as [dim, depth * 2kv].
    kernels = self.blocks.attention.source_kv.kernel[...]
    depth, _, width = kernels.shape
    projected = linear(s, jnp.transpose(kernels, (1, 0, 2)).reshape(cfg.dim, -1), None)
    projected = projected.reshape(*s.shape[:2], depth, width)
    _, source_angles = self.rope_tables(cfg)
    block_def, block_state = nnx.split(self.blocks)

    def keys_values(state, projected):
      return nnx.merge(block_def, state).attention.source_keys_values(projected, source_angles)
    context["source_k"], context["source_v"] = jax.vmap(keys_values, in_axes=(0, 2))(
        block_state, projected)
    return context

  def velocity(self, x, t, context: dict, s=None):
    """x_t [B, Nt, Dt], t [B] in [0, 1], context from ``source_context`` -> the predicted
    velocity [B, Nt, Dt], float32. With ``interval`` (MeanFlow) and ``s`` [B] >= t: the
    average velocity from t to s, (x_s - x_t) / (s - t); s = None (or s = t) is the
    instantaneous velocity."""
    cfg = self.cfg
    scale = cfg.time_scale
    c = self.time_mlp2(jax.nn.silu(self.time_mlp1(timestep_embedding(t, scale=scale))))
    if self.interval_mlp1 is not None:
      s = t if s is None else s
      c = c + self.interval_mlp2(jax.nn.silu(self.interval_mlp1(
          timestep_embedding(s - t, scale=scale))))
    c = (c.astype(jnp.float32) + context["condition"]).astype(cfg.compute_dtype)
    h = self.in_proj(x)
    if "aligned" in context:
      h = h + context["aligned"]

    target_angles, source_angles = self.rope_tables(cfg)
    rotate_cross = source_angles is not None

    # A plain lax.scan over the stacked block parameters: one compiled block whatever the
    # depth, and usable inside other traced loops (the ODE sampler).
    block_def, block_state = nnx.split(self.blocks)

    def body(h, xs):
      state, source_k, source_v = xs
      block = nnx.merge(block_def, state)
      return block(h, c, target_angles, source_k, source_v, rotate_cross), None
    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat])
    h, _ = jax.lax.scan(body, h, (block_state, context["source_k"], context["source_v"]),
                        unroll=cfg.scan_unroll)

    scale = self.final_modulation(jax.nn.silu(c))[:, None, :]
    out = self.final(layer_norm(h) * (1 + scale)).astype(jnp.float32)
    if "prior" in context:
      out = out + gaussian_velocity(x, t, context["prior"], context["prior_std"], s)
    return out

  def __call__(self, x, t, source, drop=None, prior=None, prior_std=None, s=None):
    return self.velocity(x, t, self.source_context(source, drop, prior, prior_std), s)


PRIOR_STD_FLOOR = 1e-2


def gaussian_velocity(x, t, mean, std, s=None):
  """The exact rectified-flow velocity E[x1 - noise | x_t] when x1 ~ N(mean, std^2) per
  dimension: the base a model with a prior corrects. With ``s``, the exact average velocity
  (x_s - x_t) / (s - t) along that Gaussian model's ODE (the base of a MeanFlow model): the
  ODE keeps (x - t mean) / sd(t) fixed, sd(t)^2 = (1 - t)^2 + t^2 std^2. With a fitted
  estimate (the linear map's or the MLP's) as the mean and its residual spread as the std,
  the untrained model already is that Gaussian model: its one-step estimate x + v(x, 0) is
  the estimate and its samples spread like the estimate's residuals, and the network learns
  what the estimate misses.
  x [B, Nt, Dt], t [B], mean [B, Nt, Dt], std [B, 1, Dt] or broadcastable."""
  x = x.astype(jnp.float32)
  column = lambda a: jnp.reshape(a.astype(jnp.float32), (-1,) + (1,) * (x.ndim - 1))
  t = column(t)
  var = jnp.square(std)
  sd2_t = jnp.square(1 - t) + t * t * var
  instantaneous = mean + (t * var - (1 - t)) * (x - t * mean) / sd2_t
  if s is None:
    return instantaneous
  s = column(s)
  h = s - t
  short = jnp.abs(h) < 1e-4
  h_safe = jnp.where(short, 1.0, h)   # both branches stay finite, for autodiff too
  x_s = s * mean + jnp.sqrt((jnp.square(1 - s) + s * s * var) / sd2_t) * (x - t * mean)
  return jnp.where(short, instantaneous, (x_s - x) / h_safe)


def flops(cfg: ModelConfig) -> dict:
  """Model FLOPs per example, counted from the matmuls and the attention (2 per multiply-add;
  norms, RoPE and softmax are left out, as MFU conventions do).

  ``forward`` is one evaluation, ``block`` the share of one block in it, ``train`` a forward
  and backward pass: a backward pass costs two forwards, except for the projections of the
  data (target, source, time), whose input needs no gradient.
  """
  (nt, dt_in), (ns, ds) = cfg.target_shape, cfg.source_shape
  d, cond, hd = cfg.dim, cfg.cond_dim, cfg.head_dim
  kv = cfg.kv_heads * hd
  hidden = swiglu_hidden(d, cfg.mlp_ratio)
  block = 2 * (cond * 4 * d                        # adaLN modulation
               + nt * d * (d + 2 * kv)             # fused q, k, v
               + ns * d * 2 * kv                   # source k, v
               + 2 * nt * nt * d + 2 * nt * ns * d  # q k^T and p v, self and cross
               + nt * d * d                        # out
               + nt * d * 3 * hidden)              # SwiGLU
  data_proj = 2 * (nt * dt_in * d + ns * ds * d + 256 * cond
                   + (nt * dt_in * d if cfg.prior else 0))
  rest = 2 * (cond * cond + d * cond + cond * d + nt * d * dt_in
              + ((nt * ns * d + nt * d * d) if cfg.aligned_conditioning else 0))
  forward = data_proj + rest + cfg.depth * block
  return {"forward": forward, "block": block, "train": 3 * forward - data_proj}
