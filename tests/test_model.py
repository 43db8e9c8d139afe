"""Next-DiT: shapes, zero output at init, RoPE, GQA, named sizes."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from flowmap import model as M

CFG = M.ModelConfig(source_shape=(16, 24), target_shape=(16, 12), dim=64, depth=2, heads=4,
                    kv_heads=2)


def inputs(cfg, batch=3, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (batch, *cfg.target_shape))
  t = jax.random.uniform(k[1], (batch,))
  s = jax.random.normal(k[2], (batch, *cfg.source_shape))
  return x, t, s


def run(model, *args):
  """A jitted forward: eager NNX dispatches op by op and is far slower than compiling."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, *args)


def perturbed(model, scale=0.02, seed=1):
  """The same model with every parameter moved off its initial value (zero-inits included)."""
  graphdef, state = nnx.split(model)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


@pytest.mark.parametrize("cfg", [
    CFG,
    dataclasses.replace(CFG, aligned_conditioning=True, source_shape=(16, 24)),
    dataclasses.replace(CFG, source_shape=(4, 24), target_shape=(16, 12)),   # 2x2 -> 4x4
    dataclasses.replace(CFG, source_shape=(1, 24), target_shape=(1, 12)),    # pooled
    dataclasses.replace(CFG, source_shape=(7, 24), target_shape=(5, 12)),    # 1D fallback
])
def test_output_is_zero_at_init_and_shapes_follow_config(cfg):
  model = M.NextDiT(cfg, rngs=nnx.Rngs(0))
  x, t, s = inputs(cfg)
  y = run(model, x, t, s)
  assert y.shape == (3, *cfg.target_shape) and y.dtype == jnp.float32
  assert float(jnp.abs(y).max()) == 0.0
  y = run(perturbed(model), x, t, s)
  assert float(jnp.abs(y).max()) > 0.0


def test_output_depends_on_time_source_and_input_once_trained():
  model = perturbed(M.NextDiT(CFG, rngs=nnx.Rngs(0)), scale=0.2)
  x, t, s = inputs(CFG)
  base = run(model, x, t, s)
  assert float(jnp.abs(run(model, x, t * 0.5, s) - base).max()) > 1e-4
  assert float(jnp.abs(run(model, x, t, s + 1.0) - base).max()) > 1e-4
  assert float(jnp.abs(run(model, x + 1.0, t, s) - base).max()) > 1e-4
  drop = jnp.array([True, False, False])
  dropped = run(model, x, t, s, drop)
  assert float(jnp.abs(dropped[0] - base[0]).max()) > 1e-4
  np.testing.assert_allclose(dropped[1:], base[1:], atol=1e-5)


def test_rows_are_independent():
  model = perturbed(M.NextDiT(CFG, rngs=nnx.Rngs(0)), scale=0.2)
  x, t, s = inputs(CFG, batch=4)
  full = run(model, x, t, s)
  np.testing.assert_allclose(run(model, x[1:2], t[1:2], s[1:2]), full[1:2], atol=1e-5)


@pytest.mark.parametrize("axes", [1, 2])
def test_rope_scores_invariant_to_a_common_shift(axes):
  head_dim = 16
  rng = np.random.default_rng(0)
  pos = rng.integers(0, 8, size=(6, axes)).astype(np.float32)
  shift = rng.integers(1, 5, size=(1, axes)).astype(np.float32)
  q = jnp.asarray(rng.normal(size=(1, 6, 1, head_dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 6, 1, head_dim)), jnp.float32)

  def scores(p):
    a = jnp.asarray(M.rope_angles(p, head_dim, 10000.0))
    qr, kr = M.apply_rope(q, a), M.apply_rope(k, a)
    return jnp.einsum("bqhd,bkhd->qk", qr, kr)
  np.testing.assert_allclose(scores(pos), scores(pos + shift), atol=1e-4)
  # and the rotation really depends on position: unrotated scores differ
  assert float(jnp.abs(scores(pos) - jnp.einsum("bqhd,bkhd->qk", q, k)).max()) > 1e-3


def test_rope_preserves_norm_and_is_identity_at_origin():
  x = jax.random.normal(jax.random.key(0), (2, 4, 3, 8))
  angles = jnp.asarray(M.rope_angles(M.grid_positions(4), 8, 10000.0))
  np.testing.assert_allclose(jnp.linalg.norm(M.apply_rope(x, angles), axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(M.apply_rope(x, angles)[:, 0], x[:, 0], atol=1e-6)


def test_grid_positions_rescale_source_grid_to_target_frame():
  src = M.grid_positions(4, frame=4)     # 2x2 grid seen in a 4x4 frame
  assert src.shape == (4, 2)
  np.testing.assert_allclose(src[0], [0.5, 0.5])
  np.testing.assert_allclose(src[3], [2.5, 2.5])
  assert M.grid_positions(7).shape == (7, 1)


def test_positional_tables_are_not_parameters():
  model = M.NextDiT(CFG, rngs=nnx.Rngs(0))
  names = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]
  assert not any("angle" in n or "rope" in n for n in names)


def test_grouped_query_attention_shrinks_kv_projections():
  model = M.NextDiT(CFG, rngs=nnx.Rngs(0))
  head_dim = CFG.dim // CFG.heads
  qkv = CFG.dim + 2 * CFG.kv_heads * head_dim     # fused q, k, v projection
  assert model.blocks.attention.qkv.kernel.shape == (CFG.depth, CFG.dim, qkv)
  assert model.blocks.attention.source_kv.kernel.shape == (
      CFG.depth, CFG.dim, 2 * CFG.kv_heads * head_dim)


@pytest.mark.parametrize("size,expected", [("tiny", (128, 4, 4)), ("small", (384, 6, 6)),
                                           ("base", (768, 12, 12)), ("large", (1024, 24, 16)),
                                           ("blip3o", (1792, 24, 28))])
def test_named_sizes(size, expected):
  c = ml_collections.ConfigDict(dict(size=size, dim=0, depth=0, heads=0, kv_heads=0,
                                     dtype="float32", remat="none",
                                     aligned_conditioning=False))
  mc = M.config_from(c, (16, 8), (16, 8))
  assert (mc.dim, mc.depth, mc.heads) == expected
  c.dim, c.depth, c.heads = 32, 1, 2
  mc = M.config_from(c, (16, 8), (16, 8))
  assert (mc.dim, mc.depth, mc.heads, mc.kv_heads) == (32, 1, 2, 2)


def test_aligned_conditioning_needs_equal_grids():
  with pytest.raises(ValueError, match="aligned_conditioning"):
    M.NextDiT(dataclasses.replace(CFG, aligned_conditioning=True, source_shape=(4, 24)),
              rngs=nnx.Rngs(0))


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
  model32 = perturbed(M.NextDiT(CFG, rngs=nnx.Rngs(0)), scale=0.1)
  cfg16 = dataclasses.replace(CFG, dtype="bfloat16")
  graphdef16 = nnx.split(M.NextDiT(cfg16, rngs=nnx.Rngs(0)))[0]
  model16 = nnx.merge(graphdef16, nnx.split(model32)[1])
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
  x, t, s = inputs(CFG)
  y32, y16 = run(model32, x, t, s), run(model16, x, t, s)
  assert y16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
  assert rel < 0.05


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_and_einsum_attention_do_not_change_the_function(remat):
  model = perturbed(M.NextDiT(CFG, rngs=nnx.Rngs(0)), scale=0.1)
  state = nnx.split(model)[1]
  x, t, s = inputs(CFG)
  other_cfg = dataclasses.replace(CFG, remat=remat, attention="einsum")
  other = nnx.merge(nnx.split(M.NextDiT(other_cfg, rngs=nnx.Rngs(0)))[0], state)

  np.testing.assert_allclose(run(other, x, t, s), run(model, x, t, s), atol=1e-5)

  def grads(m):
    graphdef, st = nnx.split(m)
    loss = lambda st: jnp.sum(nnx.merge(graphdef, st)(x, t, s) ** 2)
    return jax.jit(jax.grad(loss))(st)
  g1, g2 = grads(model), grads(other)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)
