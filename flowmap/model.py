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
Parameters are float32; matmuls run in ``dtype`` with float32 accumulation. Blocks are stacked
and scanned so compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  source_shape: tuple[int, int]   # (tokens, dim) of the conditioning features
  target_shape: tuple[int, int]   # (tokens, dim) of the generated features
  dim: int = 128
  depth: int = 4
  heads: int = 4
  kv_heads: int = 4
  mlp_ratio: float = 4.0
  dtype: str = "float32"
  remat: str = "none"
  aligned_conditioning: bool = False
  rope_theta: float = 10000.0
  attention: str = "xla"          # "xla": jax.nn.dot_product_attention; "einsum": explicit
  scan_unroll: int = 1            # blocks per scan iteration (1: one compiled block)

  @property
  def cond_dim(self) -> int:
    return min(self.dim, 1024)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def config_from(model_cfg, source_shape, target_shape) -> ModelConfig:
  """Builds a ModelConfig from ``config.model`` (named size, explicit overrides)."""
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
  return ModelConfig(
      source_shape=tuple(source_shape), target_shape=tuple(target_shape), dim=dim,
      depth=depth, heads=heads, kv_heads=kv_heads, mlp_ratio=model_cfg.get("mlp_ratio", 4.0),
      dtype=model_cfg.dtype, remat=model_cfg.remat,
      aligned_conditioning=bool(model_cfg.aligned_conditioning),
      attention=model_cfg.get("attention", "xla"),
      scan_unroll=max(1, min(int(model_cfg.get("scan_unroll", 1)), depth)))


# ----------------------------------------------------------------------------- layers

class Dense(nnx.Module):
  """float32 parameters, matmul in the compute dtype with float32 accumulation."""

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               use_bias: bool = True, zero: bool = False):
    init = nnx.initializers.zeros if zero else nnx.initializers.xavier_uniform()
    self.kernel = nnx.Param(init(rngs.params(), (din, dout), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(self.dtype)


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


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
  """Sinusoidal embedding of t * 1000, so t in [0, 1] spans the usual diffusion range."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * 1000.0)[:, None] * freqs[None]
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


# ----------------------------------------------------------------------------- blocks

def attention(q, k, v, implementation: str):
  """softmax(q k^T / sqrt(d)) v with grouped KV heads; logits and softmax in float32."""
  if implementation == "xla":
    return jax.nn.dot_product_attention(q, k, v)
  b, n, h, d = q.shape
  kvh = k.shape[2]
  q = q.reshape(b, n, kvh, h // kvh, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits / math.sqrt(d), axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v, preferred_element_type=jnp.float32)
  return out.reshape(b, n, h, d).astype(v.dtype)


class Attention(nnx.Module):
  """Self-attention over target tokens plus gated cross-attention to the source tokens."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt, d = cfg.compute_dtype, cfg.dim
    self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, d // cfg.heads
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

  def __call__(self, x, source, target_angles, source_angles):
    b, n, _ = x.shape
    m = source.shape[1]
    hd, kvh = self.head_dim, self.kv_heads
    q, k, v = jnp.split(self.qkv(x), [self.heads * hd, (self.heads + kvh) * hd], axis=-1)
    q = self.q_norm(q.reshape(b, n, self.heads, hd))
    k = self.k_norm(k.reshape(b, n, kvh, hd))
    v = v.reshape(b, n, kvh, hd)
    sk, sv = jnp.split(self.source_kv(source), 2, axis=-1)
    sk = self.source_k_norm(sk.reshape(b, m, kvh, hd))
    sv = sv.reshape(b, m, kvh, hd)
    q_rot = apply_rope(q, target_angles)
    out = attention(q_rot, apply_rope(k, target_angles), v, self.implementation)
    if source_angles is not None:   # both grids: relative positions across the two grids
      cross = attention(q_rot, apply_rope(sk, source_angles), sv, self.implementation)
    else:
      cross = attention(q, sk, sv, self.implementation)
    gate = jnp.tanh(self.cross_gate[...]).astype(out.dtype)[None, None, :, None]
    return self.out((out + gate * cross).reshape(b, n, -1))


class SwiGLU(nnx.Module):
  def __init__(self, dim: int, ratio: float, *, rngs: nnx.Rngs, dtype):
    hidden = int(2 * dim * ratio / 3)
    hidden = 64 * ((hidden + 63) // 64)
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

  def __call__(self, x, source, c, target_angles, source_angles):
    mod = self.modulation(jax.nn.silu(c))[:, None, :]
    scale_attn, gate_attn, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
    h = self.attention(self.attention_norm1(x) * (1 + scale_attn), source,
                       target_angles, source_angles)
    x = x + jnp.tanh(gate_attn) * self.attention_norm2(h)
    h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
    return x + jnp.tanh(gate_mlp) * self.ffn_norm2(h)


# ----------------------------------------------------------------------------- model

class NextDiT(nnx.Module):
  """velocity = model(x_t [B, Nt, Dt], t [B], source [B, Ns, Ds], drop [B] bool)."""

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
    self.source_norm = RMSNorm(ds, dtype=dt)
    self.source_proj = Dense(ds, d, rngs=rngs, dtype=dt)
    self.source_pool = Dense(d, cfg.cond_dim, rngs=rngs, dtype=dt)
    self.null_source = nnx.Param(jnp.zeros((d,), jnp.float32))
    if cfg.aligned_conditioning and not self.grids_aligned(cfg):
      raise ValueError("aligned_conditioning needs source and target on equal square "
                       f"grids; got {cfg.source_shape} and {cfg.target_shape}")
    self.aligned = Dense(d, d, rngs=rngs, dtype=dt) if cfg.aligned_conditioning else None

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
    head_dim = cfg.dim // cfg.heads
    nt, ns = cfg.target_shape[0], cfg.source_shape[0]
    target_pos = grid_positions(nt)
    source_pos = grid_positions(ns, frame=math.isqrt(nt))
    target = jnp.asarray(rope_angles(target_pos, head_dim, cfg.rope_theta))
    if target_pos.shape[1] == 2 and source_pos.shape[1] == 2:
      return target, jnp.asarray(rope_angles(source_pos, head_dim, cfg.rope_theta))
    return target, None

  @staticmethod
  def grids_aligned(cfg: ModelConfig) -> bool:
    nt, ns = cfg.target_shape[0], cfg.source_shape[0]
    return nt == ns and grid_positions(nt).shape[1] == 2

  def __call__(self, x, t, source, drop=None):
    cfg = self.cfg
    dt = cfg.compute_dtype
    s = self.source_proj(self.source_norm(source))
    if drop is not None:
      s = jnp.where(drop[:, None, None], self.null_source[...].astype(dt), s)
    c = self.time_mlp2(jax.nn.silu(self.time_mlp1(timestep_embedding(t))))
    c = c + self.source_pool(jnp.mean(s.astype(jnp.float32), axis=1))
    h = self.in_proj(x)
    if self.aligned is not None:
      h = h + self.aligned(s)

    target_angles, source_angles = self.rope_tables(cfg)

    # A plain lax.scan over the stacked block parameters: one compiled block whatever the
    # depth, and usable inside other traced loops (the ODE sampler).
    block_def, block_state = nnx.split(self.blocks)

    def body(h, state):
      return nnx.merge(block_def, state)(h, s, c, target_angles, source_angles), None
    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat])
    h, _ = jax.lax.scan(body, h, block_state, unroll=cfg.scan_unroll)

    scale = self.final_modulation(jax.nn.silu(c))[:, None, :]
    out = self.final(layer_norm(h) * (1 + scale))
    return out.astype(jnp.float32)


def count_params(model: nnx.Module) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flops(cfg: ModelConfig) -> dict:
  """Model FLOPs per example, counted from the matmuls and the attention (2 per multiply-add;
  norms, RoPE and softmax are left out, as MFU conventions do).

  ``forward`` is one evaluation, ``block`` the share of one block in it, ``train`` a forward
  and backward pass: a backward pass costs two forwards, except for the projections of the
  data (target, source, time), whose input needs no gradient.
  """
  (nt, dt_in), (ns, ds) = cfg.target_shape, cfg.source_shape
  d, cond, hd = cfg.dim, cfg.cond_dim, cfg.dim // cfg.heads
  kv = cfg.kv_heads * hd
  hidden = int(2 * d * cfg.mlp_ratio / 3)
  hidden = 64 * ((hidden + 63) // 64)
  block = 2 * (cond * 4 * d                        # adaLN modulation
               + nt * d * (d + 2 * kv)             # fused q, k, v
               + ns * d * 2 * kv                   # source k, v
               + 2 * nt * nt * d + 2 * nt * ns * d  # q k^T and p v, self and cross
               + nt * d * d                        # out
               + nt * d * 3 * hidden)              # SwiGLU
  data_proj = 2 * (nt * dt_in * d + ns * ds * d + 256 * cond)
  rest = 2 * (cond * cond + d * cond + cond * d + nt * d * dt_in
              + (nt * d * d if cfg.aligned_conditioning else 0))
  forward = data_proj + rest + cfg.depth * block
  return {"forward": forward, "block": block, "train": 3 * forward - data_proj}
