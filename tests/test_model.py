"""Next-DiT: shapes, zero output at init, RoPE, GQA, named sizes; bfloat16 forward and backward
against float32; the source context; dtype=auto and flowmap's XLA flags (flowmap.platform)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core

from flowmap import model as M
from flowmap import platform as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def model_config(**overrides):
  c = dict(size="tiny", dim=0, depth=0, heads=0, kv_heads=0, dtype="float32", remat="none",
           aligned_conditioning=False)
  c.update(overrides)
  return ml_collections.ConfigDict(c)


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
  c = model_config(size=size)
  mc = M.config_from(c, (16, 8), (16, 8))
  assert (mc.dim, mc.depth, mc.heads) == expected
  c.dim, c.depth, c.heads = 32, 1, 2
  mc = M.config_from(c, (16, 8), (16, 8))
  assert (mc.dim, mc.depth, mc.heads, mc.kv_heads) == (32, 1, 2, 2)


@pytest.mark.parametrize("source_shape,target_shape", [
    ((16, 24), (16, 12)), ((64, 24), (16, 12)), ((4, 24), (16, 12)), ((1, 24), (16, 12)),
    ((16, 24), (1, 12)), ((7, 24), (5, 12))],
    ids=["equal", "finer", "coarser", "pooled-to-grid", "grid-to-pooled", "1d"])
def test_every_layout_gets_a_per_position_source_path(source_shape, target_shape):
  """aligned_conditioning resamples the projected source onto the target positions (any
  layouts), a prior adds a fitted estimate there; both run at every layout, a
  dropped row sees neither, and the paths are local: a source token reaches only the target
  positions that resample it."""
  cfg = dataclasses.replace(CFG, source_shape=source_shape, target_shape=target_shape,
                            aligned_conditioning=True, prior=True)
  model = perturbed(M.NextDiT(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  context = jax.jit(lambda st, s, d, p: nnx.merge(graphdef, st).source_context(s, d, p))
  x, t, s = inputs(cfg)
  prior = jax.random.normal(jax.random.key(5), (3, *target_shape))
  drop = jnp.array([False, True, False])
  a = context(state, s, drop, prior)["aligned"]
  assert a.shape == (3, target_shape[0], cfg.dim)
  b = context(state, s, drop, prior + 1.0)["aligned"]
  assert not np.allclose(a[0], b[0]) and np.allclose(a[1], b[1])   # row 1 dropped
  moved = s.at[:, 0].add(3.0)
  c = context(state, moved, jnp.zeros(3, bool), prior)["aligned"]
  d = context(state, s, jnp.zeros(3, bool), prior)["aligned"]
  reached = np.abs(np.asarray(c - d)).max((0, 2)) > 1e-6
  expected = M.NextDiT.resampling(cfg)[:, 0] > 0
  np.testing.assert_array_equal(reached, np.asarray(expected))
  y = run(model, x, t, s, None, prior)
  assert y.shape == (3, *target_shape) and np.isfinite(np.asarray(y)).all()


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


def grads_of(model, x, t, s):
  graphdef, state = nnx.split(model)
  loss = lambda st: jnp.sum(nnx.merge(graphdef, st)(x, t, s) ** 2)
  return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.parametrize("remat,attention", [("none", "flash"), ("none", "xla"),
                                             ("full", "flash"), ("dots", "einsum")])
def test_remat_and_attention_kernels_do_not_change_the_function(remat, attention):
  reference_cfg = dataclasses.replace(CFG, attention="einsum")
  model = perturbed(M.NextDiT(reference_cfg, rngs=nnx.Rngs(0)), scale=0.1)
  state = nnx.split(model)[1]
  x, t, s = inputs(CFG)
  other_cfg = dataclasses.replace(CFG, remat=remat, attention=attention)
  other = nnx.merge(nnx.split(M.NextDiT(other_cfg, rngs=nnx.Rngs(0)))[0], state)

  np.testing.assert_allclose(run(other, x, t, s), run(model, x, t, s), atol=1e-5)
  (_, g1), (_, g2) = grads_of(model, x, t, s), grads_of(other, x, t, s)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("din,dout,bias", [(24, 40, True), (40, 24, False)])
def test_linear_gradients_equal_autodiff_of_the_plain_matmul(din, dout, bias):
  """Both layouts of the CPU kernel gradient (x or dy transposed) and the direct contraction
  other backends use, with and without a bias."""
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (3, 16, din))
  kernel = jax.random.normal(k[1], (din, dout))
  b = jax.random.normal(k[2], (dout,)) if bias else None
  dy = jax.random.normal(k[3], (3, 16, dout))
  plain = lambda x, w, b: jnp.dot(x, w) + (0.0 if b is None else b)
  expected = jax.vjp(plain, x, kernel, b)[1](dy)
  out, pullback = jax.vjp(jax.jit(M.linear), x, kernel, b)
  np.testing.assert_allclose(out, plain(x, kernel, b), rtol=1e-5, atol=1e-5)
  for got, want in zip(pullback(dy), expected):
    assert (got is None) == (want is None)
    if want is not None:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  rows_x, rows_dy = x.reshape(-1, din), dy.reshape(-1, dout)
  np.testing.assert_allclose(M._kernel_gradient_direct(rows_x, rows_dy), expected[1],
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(jax.jit(M._kernel_gradient_row_major)(rows_x, rows_dy),
                             expected[1], rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- bfloat16

# Large enough that XLA hands its matmuls to YNNPACK (which takes bfloat16 only in some
# layouts): the size at which the known bfloat16 failure would show.
BF16_CFG = M.ModelConfig(source_shape=(16, 48), target_shape=(16, 32), dim=64, depth=2,
                         heads=4, kv_heads=2)


def dot_operand_dtypes(jaxpr):
  """The operand dtypes of every matmul in a jaxpr, sub-jaxprs (scan, cond) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield tuple(v.aval.dtype for v in eqn.invars)
    for sub in jax_core.jaxprs_in_params(eqn.params):
      yield from dot_operand_dtypes(sub)


def test_backward_matmuls_run_in_bfloat16_and_parameter_gradients_stay_float32():
  cfg = dataclasses.replace(BF16_CFG, dtype="bfloat16")
  graphdef, state = nnx.split(M.NextDiT(cfg, rngs=nnx.Rngs(0)))
  x, t, s = inputs(cfg)
  loss = lambda st: jnp.mean(nnx.merge(graphdef, st)(x, t, s) ** 2)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(state).jaxpr
  dtypes = list(dot_operand_dtypes(jaxpr))
  # forward and backward: 3 matmuls per Dense, 6 per attention, far more than the forward's
  assert len(dtypes) > 60
  bf16 = jnp.dtype(jnp.bfloat16)
  assert set(dtypes) == {(bf16, bf16)}, set(dtypes)
  value, grads = jax.jit(jax.value_and_grad(loss))(state)
  assert value.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_bfloat16_train_step_runs_on_this_cpu_and_follows_float32():
  """Values and gradients of the whole model in bfloat16 against float32, compiled for this
  machine: a bfloat16 matmul that falls out of YNNPACK would fail here at run time
  (UNIMPLEMENTED ... DotThunk ... BF16 x BF16 = F32)."""
  model32 = perturbed(M.NextDiT(BF16_CFG, rngs=nnx.Rngs(0)), scale=0.1)
  state = nnx.split(model32)[1]
  model16 = nnx.merge(nnx.split(M.NextDiT(dataclasses.replace(BF16_CFG, dtype="bfloat16"),
                                          rngs=nnx.Rngs(0)))[0], state)
  x, t, s = inputs(BF16_CFG, batch=4)
  (loss32, g32), (loss16, g16) = grads_of(model32, x, t, s), grads_of(model16, x, t, s)
  assert abs(float(loss16) / float(loss32) - 1) < 0.03
  flat32, flat16 = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(g)]) for g in (g32, g16))
  assert float(jnp.linalg.norm(flat16 - flat32) / jnp.linalg.norm(flat32)) < 0.05
  cosine = jnp.dot(flat16, flat32) / (jnp.linalg.norm(flat16) * jnp.linalg.norm(flat32))
  assert float(cosine) > 0.998


# ----------------------------------------------------------------------------- context

@pytest.mark.parametrize("cfg", [
    CFG,
    dataclasses.replace(CFG, dtype="bfloat16"),
    dataclasses.replace(CFG, aligned_conditioning=True),
    dataclasses.replace(CFG, source_shape=(7, 24), target_shape=(5, 12)),    # 1D fallback
    dataclasses.replace(CFG, source_shape=(1, 24), target_shape=(1, 12)),    # pooled
], ids=["grid", "bfloat16", "aligned", "1d", "pooled"])
def test_source_context_then_velocity_equals_the_call_exactly(cfg):
  model = perturbed(M.NextDiT(cfg, rngs=nnx.Rngs(0)), scale=0.1)
  graphdef, state = nnx.split(model)
  x, t, s = inputs(cfg)
  drop = jnp.array([True, False, False])
  call = jax.jit(lambda st, x, t, s, d: nnx.merge(graphdef, st)(x, t, s, d))
  context_fn = jax.jit(lambda st, s, d: nnx.merge(graphdef, st).source_context(s, d))
  velocity_fn = jax.jit(lambda st, x, t, c: nnx.merge(graphdef, st).velocity(x, t, c))
  context = context_fn(state, s, drop)
  kv_shape = (cfg.depth, 3, cfg.kv_heads, cfg.source_shape[0], cfg.head_dim)
  assert context["source_k"].shape == context["source_v"].shape == kv_shape
  assert context["condition"].shape == (3, cfg.cond_dim)
  assert ("aligned" in context) == cfg.aligned_conditioning
  np.testing.assert_array_equal(velocity_fn(state, x, t, context), call(state, x, t, s, drop))
  # one context serves every time and every x_t
  np.testing.assert_array_equal(velocity_fn(state, 2 * x, 1 - t, context),
                                call(state, 2 * x, 1 - t, s, drop))


def test_swiglu_hidden_size_is_one_function_for_the_layer_and_the_flop_count():
  model = M.NextDiT(CFG, rngs=nnx.Rngs(0))
  hidden = M.swiglu_hidden(CFG.dim, CFG.mlp_ratio)
  assert hidden % 64 == 0 and hidden >= 2 * CFG.dim * CFG.mlp_ratio / 3
  assert model.blocks.feed_forward.w2.kernel.shape == (CFG.depth, hidden, CFG.dim)
  wider = dataclasses.replace(CFG, mlp_ratio=8.0)
  extra = M.swiglu_hidden(CFG.dim, 8.0) - hidden
  block = M.flops(wider)["block"] - M.flops(CFG)["block"]
  assert block == 2 * CFG.target_shape[0] * CFG.dim * 3 * extra


# ----------------------------------------------------------------------------- config

def test_config_from_resolves_auto_and_refuses_unknown_names():
  mc = M.config_from(model_config(), (16, 8), (16, 8))
  assert mc.attention == M.ModelConfig((16, 8), (16, 8)).attention_implementation()
  assert mc.attention in M.ATTENTION and mc.attention != "auto"
  mc = M.config_from(model_config(dtype="auto", attention="einsum"), (16, 8), (16, 8))
  assert mc.dtype == P.resolve_dtype("auto", jax.default_backend())
  assert mc.attention == "einsum"
  with pytest.raises(ValueError, match=r"'auto', 'xla', 'einsum', 'flash', 'cudnn'"):
    M.config_from(model_config(attention="fused"), (16, 8), (16, 8))
  with pytest.raises(ValueError, match=r"'auto', 'float32', 'bfloat16', 'float16'"):
    M.config_from(model_config(dtype="half"), (16, 8), (16, 8))


# ----------------------------------------------------------------------------- platform

def test_cpu_features_and_dtype_auto(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f "
                     "avx512_bf16 amx_tile amx_bf16 rdrand\n\nprocessor\t: 1\n")
  features = P.cpu_features(str(cpuinfo))
  assert features == {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile",
                      "amx_bf16"}
  assert P.cpu_features(str(tmp_path / "missing")) == frozenset()
  avx2 = {"avx", "avx2", "fma"}
  assert P.native_bf16(features) and P.native_bf16({"avx512_bf16"})
  assert P.native_bf16({"amx_bf16"}) and not P.native_bf16(avx2 | {"avx512f"})
  assert P.resolve_dtype("auto", "cpu", avx2) == "float32"
  assert P.resolve_dtype("auto", "cpu", {"avx512f", "avx512_bf16"}) == "bfloat16"
  assert P.resolve_dtype("auto", "gpu", avx2) == "bfloat16"
  assert P.resolve_dtype("auto", "tpu", avx2) == "bfloat16"
  assert P.resolve_dtype("float32", "gpu") == "float32"
  assert P.resolve_dtype("bfloat16", "cpu", avx2) == "bfloat16"
  assert P.describe_cpu(avx2) == "avx avx2 fma (bfloat16 emulated)"
  with pytest.raises(ValueError, match="model.dtype"):
    P.resolve_dtype("half", "cpu")


def test_set_xla_flags_appends_and_keeps_the_users_flags():
  native, avx2 = {"avx512f", "avx512_bf16"}, {"avx", "avx2", "fma"}
  flags = list(P.CPU_XLA_FLAGS)
  assert flags and P.cpu_xla_flags(native) == tuple(flags) == P.cpu_xla_flags(avx2)
  env = {}
  assert P.set_xla_flags(env, avx2) == flags and env["XLA_FLAGS"].split() == flags
  env = {}
  assert P.set_xla_flags(env, native) == flags and env["XLA_FLAGS"].split() == flags
  assert P.set_xla_flags(env, native) == [] and env["XLA_FLAGS"].split() == flags
  names = [f.split("=")[0] for f in flags]
  user = ["--xla_force_host_platform_device_count=8"] + [f"{n}=user" for n in names]
  env = {"XLA_FLAGS": " ".join(user)}
  assert P.set_xla_flags(env, native) == [] and env["XLA_FLAGS"].split() == user
  env = {"XLA_FLAGS": user[0]}
  P.set_xla_flags(env, native)
  assert env["XLA_FLAGS"].split() == [user[0], *flags]
  env = {"FLOWMAP_XLA_FLAGS": "0"}
  assert P.set_xla_flags(env, native) == [] and "XLA_FLAGS" not in env


FLAG_PROBE = """
import json, sys
from flowmap import platform
if sys.argv[1] == "flowmap":
  platform.set_xla_flags()
import jax, jax.numpy as jnp
from flax import nnx
from flowmap import model as M
results = {"flags": __import__("os").environ.get("XLA_FLAGS", "")}
for dtype in ("float32", "bfloat16"):
  cfg = M.ModelConfig(source_shape=(16, 48), target_shape=(16, 32), dim=64, depth=1, heads=4,
                      kv_heads=2, dtype=dtype)
  graphdef, state = nnx.split(M.NextDiT(cfg, rngs=nnx.Rngs(0)))
  state = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), state)
  k = jax.random.split(jax.random.key(0), 3)
  x, s = jax.random.normal(k[0], (4, 16, 32)), jax.random.normal(k[2], (4, 16, 48))
  t = jax.random.uniform(k[1], (4,))
  loss = lambda st: jnp.mean((nnx.merge(graphdef, st)(x, t, s) - x) ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss))(state)
  norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)))
  results[dtype] = {"loss": float(value), "grad_norm": float(norm)}
cfg = M.ModelConfig(source_shape=(16, 24), target_shape=(16, 12), dim=64, depth=2, heads=4,
                    kv_heads=2)
model = M.NextDiT(cfg, rngs=nnx.Rngs(0))
graphdef, state = nnx.split(model)
s = jax.random.normal(jax.random.key(1), (512, 16, 24))
x = jax.random.normal(jax.random.key(2), (512, 16, 12))
context = model.source_context(s)
jitted = jax.jit(lambda st, x, c: nnx.merge(graphdef, st).velocity(x, jnp.zeros(512), c))
error = jnp.abs(jitted(state, x, context) - model.velocity(x, jnp.zeros(512), context)).max()
results["batch512_max_error"] = float(error) if jnp.isfinite(error) else 1e30
print(json.dumps(results))
"""


def test_flowmaps_xla_flags_keep_the_numerics():
  """A fresh process with and without flowmap's CPU XLA flags: the same loss and gradient
  norm in float32 and bfloat16, to the rounding a different fusion of the same maths makes."""
  results = {}
  for mode in ("plain", "flowmap"):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if mode == "plain":
      env["FLOWMAP_XLA_FLAGS"] = "0"
    proc = subprocess.run([sys.executable, "-c", FLAG_PROBE, mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
  assert results["plain"]["flags"] == ""
  # Without the flags XLA's CPU fusions return inf for the batch of 512 (jaxlib 0.10.2); with
  # them the jitted velocity equals the eager one. A newer jaxlib that fixes it passes too.
  assert results["flowmap"]["batch512_max_error"] < 1e-4
  assert results["flowmap"]["flags"].split() == list(P.CPU_XLA_FLAGS)
  for dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):
    for key in ("loss", "grad_norm"):
      assert results["flowmap"][dtype][key] == pytest.approx(results["plain"][dtype][key],
                                                             rel=tol), (dtype, key)


def test_untrained_model_with_a_prior_samples_the_gaussian_model():
  """With a prior the model's base velocity is the exact velocity of x1 ~ N(prior,
  prior_std^2): at initialisation (zero output layer) its one-step mean estimate is the prior
  and integrating it from noise gives samples with the prior's mean and spread, per
  dimension; a dropped row falls back to N(0, 1)."""
  from flowmap import flow
  cfg = dataclasses.replace(CFG, prior=True)
  model = M.NextDiT(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  n = 4096
  prior = jnp.broadcast_to(jnp.linspace(-2, 2, 12), (n, 16, 12))
  std = jnp.broadcast_to(jnp.linspace(0.2, 1.5, 12), (n, 1, 12))
  source = jax.random.normal(jax.random.key(1), (n, *cfg.source_shape))
  drop = jnp.arange(n) >= n // 2

  @jax.jit
  def sample(noise):
    m = nnx.merge(graphdef, state)
    context = m.source_context(source, drop, prior, std)
    mean_estimate = noise + m.velocity(noise, jnp.zeros(n), context)
    return mean_estimate, flow.sample(lambda x, t: m.velocity(x, t, context), noise, 32,
                                      "heun")
  mean_estimate, x = sample(jax.random.normal(jax.random.key(2), (n, 16, 12)))
  kept, dropped = np.asarray(x[: n // 2]), np.asarray(x[n // 2:])
  np.testing.assert_allclose(np.asarray(mean_estimate[: n // 2]), np.asarray(prior[: n // 2]),
                             atol=1e-5)
  standard_error = np.linspace(0.2, 1.5, 12) / np.sqrt(kept.shape[0] * kept.shape[1])
  np.testing.assert_array_less(np.abs(kept.mean((0, 1)) - np.linspace(-2, 2, 12)),
                               5 * standard_error)
  np.testing.assert_allclose(kept.std((0, 1)), np.linspace(0.2, 1.5, 12), rtol=0.03)
  np.testing.assert_allclose(dropped.mean((0, 1)), 0.0, atol=0.02)
  np.testing.assert_allclose(dropped.std((0, 1)), 1.0, rtol=0.03)


def test_interval_input_starts_at_zero_and_forward_mode_kernels_give_the_same_model():
  """model.interval (meanflow): the interval's embedding is zero at initialisation, so the
  untrained model's average velocity is its instantaneous one whatever s; once trained it
  depends on s. Inside forward_mode_kernels the model (plain matmul, XLA attention) gives the
  same values and takes jax.jvp, which the custom-VJP kernels refuse."""
  cfg = dataclasses.replace(CFG, interval=True, attention="flash")
  model = M.NextDiT(cfg, rngs=nnx.Rngs(0))
  x, t, s = inputs(cfg)
  context = model.source_context(s)
  end = jnp.minimum(t + 0.3, 1.0)
  np.testing.assert_array_equal(np.asarray(model.velocity(x, t, context, end)),
                                np.asarray(model.velocity(x, t, context)))
  model = perturbed(model)
  context = model.source_context(s)
  a = model.velocity(x, t, context, end)
  assert not np.allclose(np.asarray(a), np.asarray(model.velocity(x, t, context)))
  with M.forward_mode_kernels():
    b, tangent = jax.jvp(lambda x, t: model.velocity(x, t, context, end), (x, t),
                         (jnp.ones_like(x), jnp.ones_like(t)))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert np.isfinite(np.asarray(tangent)).all()
  with pytest.raises(TypeError):
    jax.jvp(lambda x: model.velocity(x, t, context, end), (x,), (jnp.ones_like(x),))
