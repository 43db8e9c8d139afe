"""Mesh and shardings: one train step gives the same numbers on 1 device, on data=8 and on
data=2 x fsdp=4; fsdp really splits parameters, moments and EMA; checkpoints move between
device counts; mixed precision keeps the state in float32.

The 8-device cases run in one subprocess (tests/sharding_steps.py), since the device count
is fixed once JAX starts; the tests here read what it wrote.
"""

import json
import os
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from conftest import PATIENT_COLLECTIVES, ROOT
from flowmap import checkpoint as checkpoint_lib
from flowmap import sampling
from flowmap import model as model_lib
from flowmap import sharding
from flowmap import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sharding_steps  # noqa: E402

# LLVM optimisation off: a third of the compile time, and the partitioning under test (the
# HLO passes) is unchanged; every layout is compiled alike.
EIGHT_DEVICES = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                 + PATIENT_COLLECTIVES)


# ----------------------------------------------------------------------------- unit

def test_mesh_shape_fills_minus_one_and_refuses_what_does_not_cover_the_devices():
  cfg = lambda d, f: ml_collections.ConfigDict({"data": d, "fsdp": f})
  assert sharding.mesh_shape(cfg(-1, 1), 8) == (8, 1)
  assert sharding.mesh_shape(cfg(2, -1), 8) == (2, 4)
  assert sharding.mesh_shape(cfg(-1, 4), 8) == (2, 4)
  for bad in (cfg(3, -1), cfg(2, 2), cfg(-1, -1), cfg(0, -1), cfg(-1, 16)):
    with pytest.raises(ValueError):
      sharding.mesh_shape(bad, 8)


def test_mesh_axes_are_auto_so_the_compiler_inserts_the_fsdp_collectives():
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
  assert mesh.axis_names == ("data", "fsdp")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_fsdp_splits_the_largest_divisible_dimension_and_replicates_small_arrays():
  big = sharding.FSDP_MIN_SIZE
  assert sharding.fsdp_spec((big // 64, 64), 1) == P()
  assert sharding.fsdp_spec((64, 32), 4) == P()                   # below the threshold
  assert sharding.fsdp_spec((128, 1024), 4) == P(None, "fsdp")
  assert sharding.fsdp_spec((1024, 128), 4) == P("fsdp", None)
  assert sharding.fsdp_spec((1026, 128), 4) == P(None, "fsdp")     # 1026 % 4 != 0
  assert sharding.fsdp_spec((1023, 127), 4) == P()                 # nothing divides


def test_state_shardings_never_split_the_scanned_layer_axis():
  mesh = AbstractMesh((2, 4), ("data", "fsdp"))
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  tree = {"params": {"blocks": {"w": shape(64, 16, 32)}, "head": shape(64, 16, 32)},
          "opt_state": ({"mu": {"blocks": {"w": shape(64, 16, 32)}}},)}
  specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(tree, mesh))
  assert specs["params"]["blocks"]["w"] == P(None, None, "fsdp")
  assert specs["params"]["head"] == P("fsdp", None, None)
  assert specs["opt_state"][0]["mu"]["blocks"]["w"] == P(None, None, "fsdp")


def test_initialize_distributed_wants_all_three_flags_and_is_a_no_op_alone(monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "1")
  sharding.initialize_distributed()             # one process: nothing to start
  assert not jax.distributed.is_initialized()
  for args in (("localhost:1234", 2, -1), ("", 2, 0), ("localhost:1234", 0, 0),
               ("localhost:1234", 2, 2)):
    with pytest.raises(ValueError, match="--coordinator_address"):
      sharding.initialize_distributed(*args)


@pytest.mark.parametrize("tasks,nodes,gpus,want", [
    ("4", "4", "8", list(range(8))),     # one task per node: it drives every GPU
    ("32", "4", "8", None),              # one task per GPU: JAX's SLURM_LOCALID choice
    ("4", "4", "", None),                # no GPUs known: JAX's default
])
def test_under_srun_one_task_per_node_gets_every_gpu_of_its_node(monkeypatch, tasks, nodes,
                                                                 gpus, want):
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(sharding.glob, "glob", lambda pattern: [])
  for k, v in {"SLURM_NTASKS": tasks, "SLURM_STEP_NUM_NODES": nodes,
               "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_GPUS_ON_NODE": gpus,
               "CUDA_VISIBLE_DEVICES": ""}.items():
    monkeypatch.setenv(k, v)
  sharding.initialize_distributed()
  assert calls == [{"local_device_ids": want}]
  monkeypatch.delenv("SLURM_STEP_NODELIST")   # the batch script itself: one process
  sharding.initialize_distributed()
  assert len(calls) == 1


# ----------------------------------------------------------------------------- mixed precision

def _model_and_step(dtype: str, remat: str = "none"):
  c = sharding_steps.config()
  c.model.dtype, c.model.remat = dtype, remat
  model_cfg = model_lib.config_from(c.model, sharding_steps.SOURCE_SHAPE,
                                    sharding_steps.TARGET_SHAPE)
  tx = train.make_optimizer(c)
  graphdef, _, shapes = train.abstract_state(model_cfg, tx, 0)
  batch = {"source": jax.ShapeDtypeStruct((8, *sharding_steps.SOURCE_SHAPE), jnp.float32),
           "target": jax.ShapeDtypeStruct((8, *sharding_steps.TARGET_SHAPE), jnp.float32)}
  return graphdef, shapes, train.make_train_step(c, graphdef, tx), batch


def _equations(jaxpr):
  yield from jaxpr.eqns
  for sub in jax.extend.core.subjaxprs(jaxpr):
    yield from _equations(sub)


def test_bf16_compute_runs_every_forward_matmul_in_bf16_with_dense_layers_accumulating_in_f32():
  graphdef, shapes, _, batch = _model_and_step("bfloat16")
  velocity = sampling.make_velocity(graphdef)
  t = jax.ShapeDtypeStruct((8,), jnp.float32)
  closed = jax.make_jaxpr(velocity)(shapes["params"], batch["target"], t, batch["source"])
  dots = [e for e in _equations(closed.jaxpr) if e.primitive.name == "dot_general"]
  # (equal token counts: the aligned path needs no float32 resampling of the source)
  assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  accumulating = [e for e in dots if e.params["preferred_element_type"] == jnp.float32]
  assert len(accumulating) >= len(dots) // 2    # every Dense; attention keeps its own
  assert closed.out_avals[0].dtype == jnp.float32   # the loss sees a float32 velocity


def test_bf16_compute_keeps_state_loss_and_norms_in_f32():
  _, shapes, step, batch = _model_and_step("bfloat16")
  state, metrics = jax.eval_shape(step, shapes, batch)
  assert jax.tree.map(lambda a: a.dtype, state) == jax.tree.map(lambda a: a.dtype, shapes)
  assert {a.dtype for a in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
  for k in ("loss", "grad_norm", "param_norm", "update_ratio", "velocity_cosine"):
    assert metrics[k].dtype == jnp.float32, k


@pytest.mark.slow
def test_bf16_trains_the_demo_to_within_001_of_float32_held_out_cosine(tmp_path):
  """The demo (model, batch, lr) shortened to 80 steps, on a smaller dataset and held-out
  set; the full demo was compared by hand (bf16 and float32 agreed to within 0.001)."""
  from configs import demo
  results = {}
  for dtype in ("float32", "bfloat16"):
    c = demo.get_config()
    c.model.dtype = dtype
    c.data.dir = str(tmp_path / "float32" / "data") if dtype == "bfloat16" else ""
    c.data.synthetic.train_size = 512
    c.data.synthetic.validation_size = 64
    c.model.prior = "none"   # from scratch, so that both dtypes have to learn
    c.train.steps = 80
    c.train.warmup_steps = 20
    c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 80
    c.eval.num_images = 64
    c.eval.baselines = ()
    results[dtype] = train.train_and_evaluate(c, str(tmp_path / dtype))
  f32, bf16 = (results[d]["eval/cosine_token"] for d in ("float32", "bfloat16"))
  assert f32 > results["float32"]["baseline/mean_cosine_token"] + 0.15   # it has learned
  assert abs(bf16 - f32) < 0.01, (bf16, f32)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_wraps_the_scanned_block_in_the_named_policy(remat):
  policies = []
  for name in (remat, "none"):
    _, shapes, step, batch = _model_and_step("float32", name)
    closed = jax.make_jaxpr(step)(shapes, batch)
    policies.append([e.params["policy"] for e in _equations(closed.jaxpr)
                     if e.primitive.name in ("remat2", "checkpoint")])
  assert policies[0] and all(p is model_lib.REMAT_POLICIES[remat] for p in policies[0])
  assert not policies[1]


# ----------------------------------------------------------------------------- 8 devices

def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _one_device_state():
  """A train state of the worker's model with arbitrary values, on this process's first
  device: the checkpoint that the 8-device worker restores."""
  c = sharding_steps.config()
  model_cfg = model_lib.config_from(c.model, sharding_steps.SOURCE_SHAPE,
                                    sharding_steps.TARGET_SHAPE)
  _, _, shapes = train.abstract_state(model_cfg, train.make_optimizer(c), 0)
  rng = np.random.default_rng(7)
  values = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
  return shapes, jax.device_put(values, jax.devices()[0])


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
  out = tmp_path_factory.mktemp("eight_devices")
  shapes, state = _one_device_state()
  saver = checkpoint_lib.Checkpointer(str(out / "from_one"))
  saver.save(5, state, force=True)
  saver.close()
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {EIGHT_DEVICES}")
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharding_steps.py"),
                           str(out)], env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  arrays = dict(np.load(out / "results.npz"))
  with open(out / "results.json") as f:
    report = json.load(f)
  return {"dir": out, "arrays": arrays, "report": report, "saved": _flat(state),
          "shapes": shapes}


def _layout(eight, name, part="state"):
  prefix = f"{name}/{part}"
  return {k[len(prefix):]: v for k, v in eight["arrays"].items() if k.startswith(prefix)}


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize("layout", ["data8", "fsdp"])
def test_sharded_step_matches_one_device(eight, layout):
  np.testing.assert_allclose(eight["arrays"][f"{layout}/losses"],
                             eight["arrays"]["one/losses"], rtol=1e-6)
  _assert_trees_close(_layout(eight, layout), _layout(eight, "one"))


def test_grad_accumulation_of_4_micro_batches_of_8_matches_the_batch_of_32(eight):
  np.testing.assert_allclose(eight["arrays"]["fsdp_accum4/losses"],
                             eight["arrays"]["one/losses"], rtol=1e-6)
  _assert_trees_close(_layout(eight, "fsdp_accum4"), _layout(eight, "one"))


def test_state_created_on_the_fsdp_mesh_equals_the_one_device_init(eight):
  created = {k[len("created/"):]: v for k, v in eight["arrays"].items()
             if k.startswith("created/")}
  initial = {k[len("initial/"):]: v for k, v in eight["arrays"].items()
             if k.startswith("initial/")}
  _assert_trees_close(created, initial, rtol=0, atol=0)


def test_fsdp_splits_parameters_moments_and_ema_and_data8_replicates(eight):
  layouts = eight["report"]["layouts"]
  fsdp, shards = layouts["fsdp"]["specs"], layouts["fsdp"]["shard_shapes"]
  full = {k: v.shape for k, v in _layout(eight, "fsdp").items()}
  split = {k for k, spec in fsdp.items() if "fsdp" in spec}
  for k, spec in fsdp.items():
    if int(np.prod(full[k])) >= sharding.FSDP_MIN_SIZE:
      assert k in split, (k, spec)
      axis = spec.index("fsdp")
      assert shards[k][axis] * 4 == full[k][axis] and shards[k][:axis] == list(full[k][:axis])
      if "['blocks']" in k:
        assert axis != 0, k    # the scanned layer axis stays whole
  kinds = {k.split("]")[0] + "]" for k in split}
  assert kinds == {"['params']", "['ema']", "['opt_state']"}
  assert any(".mu[" in k for k in split) and any(".nu[" in k for k in split)
  for k in split:   # a moment or the EMA is split exactly like its parameter
    param = "['params']" + k[k.index("['", 3):] if not k.startswith("['params']") else k
    assert fsdp[k] == fsdp[param], k
  assert not any("fsdp" in s for s in layouts["data8"]["specs"].values())


def test_step_donates_the_state_keeps_its_shardings_and_compiles_once(eight):
  for name, layout in eight["report"]["layouts"].items():
    assert layout["donated"], name
    assert layout["shardings_kept"], name
    assert layout["compilations"] == 1, name


def test_checkpoint_saved_on_8_devices_restores_on_1(eight):
  shapes = eight["shapes"]
  one = sharding.replicated(sharding.make_mesh(
      ml_collections.ConfigDict({"data": 1, "fsdp": 1}), jax.devices()[:1]))
  reader = checkpoint_lib.Checkpointer(str(eight["dir"] / "to_one"), read_only=True)
  step, restored = reader.restore(jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), shapes))
  reader.close()
  assert step == 2
  assert all(x.sharding.num_devices == 1 for x in jax.tree.leaves(restored))
  _assert_trees_close(_flat(restored), _layout(eight, "fsdp"), rtol=0, atol=0)


def test_checkpoint_saved_on_1_device_restores_on_8(eight):
  restored = {k[len("restored/"):]: v for k, v in eight["arrays"].items()
              if k.startswith("restored/")}
  _assert_trees_close(restored, eight["saved"], rtol=0, atol=0)
  assert any("fsdp" in spec for spec in eight["report"]["restored_specs"].values())
